"""Hostile inputs on the Stable Diffusion surfaces (the CLIP losses, the guided pipeline,
``sagkit sample``), one row each: the clear error each now gets. Rows, as ``id  before → after``
(before: W silently wrong, B obscure error, G already a clear error, measured on the code before
these checks; after: the exception, SystemExit for ``sagkit sample``: exit 2 with one line on
stderr naming the option):

    style-reference-uint8               W → TypeError
    similarity-reference-uint8          W → TypeError
    style-reference-0-255               W → ValueError
    similarity-reference-0-255          W → ValueError
    style-reference-nan                 W → ValueError
    style-reference-empty               B → ValueError
    style-reference-rgba                G → ValueError
    similarity-reference-batch-2        G → ValueError
    style-reference-list                B → TypeError
    preprocess-height-0                 B → ValueError
    preprocess-width-0                  B → ValueError
    style-images-empty                  B → ValueError
    preprocess-uint8                    W → TypeError
    style-images-1-channel              G → ValueError
    similarity-images-3d                G → ValueError
    aesthetic-images-rgba               G → ValueError
    text-embeds-too-wide                B → ValueError
    text-embeds-1d                      G → ValueError
    text-embeds-batch-3-for-2           B → ValueError
    aesthetic-head-3-scores             B → ValueError
    aesthetic-head-not-callable         B → TypeError
    aesthetic-head-wrong-input          B → ValueError
    pipe-prompt-empty-list              B → ValueError
    encode-prompt-empty-list            B → ValueError
    pipe-prompt-int                     B → TypeError
    pipe-prompt-list-of-int             B → TypeError
    pipe-num-images-0                   B → ValueError
    pipe-num-images-negative            B → ValueError
    pipe-num-images-float               B → ValueError
    pipe-3-generators-for-1-image       W → ValueError
    pipe-1-generator-list-for-2-images  W → ValueError
    noise-3-generators-for-1-image      W → ValueError
    pipe-generator-int                  B → TypeError
    pipe-latents-3-channels             B → ValueError
    pipe-latents-rank-3                 B → ValueError
    pipe-latents-list                   B → TypeError
    pipe-prompt-embeds-other-width      B → ValueError
    pipe-prompt-embeds-rank-2           B → ValueError
    pipe-prompt-embeds-integer          B → TypeError
    pipe-negative-embeds-other-width    B → ValueError
    pipe-latents-batch                  G → ValueError
    pipe-height-other-than-latents      W → ValueError
    pipe-height-0                       W → ValueError
    pipe-width-float                    B → ValueError
    pipe-height-7                       G → ValueError
    pipe-output-type                    G → ValueError
    sample-seed-2**64                   B → SystemExit
    sample-seed-negative                W → SystemExit
    sample-seed-not-int                 G → SystemExit
    sample-out-is-a-file                B → SystemExit
    sample-out-under-a-file             B → SystemExit
    sample-second-run-same-folder       W → SystemExit
    sample-num-images-0                 G → SystemExit
    sample-style-not-an-image           G → SystemExit

Each row of :data:`ROWS` is ``(id, before, call, exception, message)`` as in
tests/test_bad_inputs.py: ``call`` a thunk that makes the bad call, and the row passes when it
raises ``exception`` with a message matching ``message`` (which names the argument). The cases
whose answer is a correct result (the sidecar, ``--overwrite``, a negative prompt for a batch of
``prompt_embeds``, the valid inputs beside the refused ones) are the plain tests at the end.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import exit_code, one_line_error, write_style_image
from PIL import Image

from sagkit.lab.cli import main as cli_main
from sagkit.sd.clip import (
    AestheticLoss,
    ImageSimilarityLoss,
    StyleLoss,
    TextSimilarityLoss,
    cosine_distance,
    preprocess,
)
from sagkit.sd.pipeline import GuidedStableDiffusion
from sagkit.sd.tiny import tiny_clip_vision, tiny_pipeline

EMBED = 16  # the tiny CLIP's projection width


# --- inputs, built once ---------------------------------------------------------------------
@functools.cache
def vision():
    return tiny_clip_vision()


@functools.cache
def guided():
    return GuidedStableDiffusion.from_pipe(tiny_pipeline(latent_size=8))


@functools.cache
def workdir() -> Path:
    """A scratch folder for the command-line rows, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="sagkit-hostile-sd-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def style_file() -> Path:
    return write_style_image(workdir() / "style.png")


def images(batch=2, channels=3, size=(20, 24), seed=0):
    """Images in [-1, 1], (B, C, H, W), float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, *size, generator=g) * 2 - 1


def pixels_uint8(size=(20, 24)):
    """One image in 0..255, (3, H, W), uint8."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)


def style(reference):
    """The style loss against ``reference`` on a batch of valid images."""
    return StyleLoss(vision(), reference)(images())


def similarity(reference):
    return ImageSimilarityLoss(vision(), reference)(images())


def run(prompt="a fox", **kwargs):
    """The tiny guided pipeline, 2 steps, latents out."""
    kwargs = {"steps": 2, "output_type": "latent", "progress": False, **kwargs}
    return guided()(prompt, **kwargs)


def generators(k):
    return [torch.Generator().manual_seed(i) for i in range(k)]


def with_loss(**kwargs):
    return run(loss_fn=StyleLoss(vision(), images(1)[0]), window=(0, 1), **kwargs)


def cli(argv, expected):
    """``sagkit sample`` with ``argv`` (tiny components, no progress bar); raises
    ``SystemExit("exit N: <stderr>")`` with its exit status and stderr when stderr is one line,
    so that a row can match the status and the option the line names."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli_main(["sample", *argv, "--tiny", "--device", "cpu", "--no-progress"])
        except SystemExit as exit_:
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    text = lines[0] if len(lines) == 1 else f"{len(lines)} lines on stderr"
    raise SystemExit(f"exit {code}: {text}" if code == expected else f"unexpected exit {code}")


def unguided(out, *argv):
    return ["a fox", "--guidance", "none", "--steps", "2", "--out", str(out), *argv]


def run_twice(name):
    """Two runs with different prompts into the same folder: the second must not overwrite."""
    out = workdir() / name
    with contextlib.redirect_stderr(io.StringIO()):
        first = cli_main(["sample", *unguided(out), "--tiny", "--device", "cpu", "--no-progress"])
    assert first == 0
    argv = unguided(out)
    argv[0] = "a lighthouse"
    cli(argv, 2)


def a_file(name) -> Path:
    path = workdir() / name
    path.write_text("not a folder")
    return path


REFERENCE = r"reference must be .*\[-1, 1\]"

# --- the table ------------------------------------------------------------------------------
ROWS = [
    # CLIP losses: the reference image
    (
        "style-reference-uint8",
        "W",
        lambda: style(pixels_uint8()),
        TypeError,
        REFERENCE + r".*x / 127\.5 - 1",
    ),
    (
        "similarity-reference-uint8",
        "W",
        lambda: similarity(pixels_uint8()),
        TypeError,
        REFERENCE + r".*x / 127\.5 - 1",
    ),
    (
        "style-reference-0-255",
        "W",
        lambda: style(pixels_uint8().float()),
        ValueError,
        REFERENCE + r".*x / 127\.5 - 1",
    ),
    (
        "similarity-reference-0-255",
        "W",
        lambda: similarity(pixels_uint8().float()),
        ValueError,
        REFERENCE + r".*x / 127\.5 - 1",
    ),
    (
        "style-reference-nan",
        "W",
        lambda: style(torch.full((3, 20, 24), float("nan"))),
        ValueError,
        "reference .*NaN",
    ),
    (
        "style-reference-empty",
        "B",
        lambda: style(torch.zeros(3, 0, 24)),
        ValueError,
        r"reference must .*H, W >= 1.*\(1, 3, 0, 24\)",
    ),
    (
        "style-reference-rgba",
        "G",
        lambda: style(images(1, channels=4)),
        ValueError,
        r"reference must be one image \(3, H, W\)",
    ),
    (
        "similarity-reference-batch-2",
        "G",
        lambda: similarity(images(2)),
        ValueError,
        r"reference must be one image \(3, H, W\)",
    ),
    (
        "style-reference-list",
        "B",
        lambda: style([[[0.0]]]),
        TypeError,
        "reference must be a torch.Tensor",
    ),
    # CLIP losses: the images
    (
        "preprocess-height-0",
        "B",
        lambda: preprocess(torch.zeros(1, 3, 0, 8), size=32),
        ValueError,
        r"images must .*H, W >= 1.*\(1, 3, 0, 8\)",
    ),
    (
        "preprocess-width-0",
        "B",
        lambda: preprocess(torch.zeros(1, 3, 8, 0), size=32),
        ValueError,
        r"images must .*H, W >= 1.*\(1, 3, 8, 0\)",
    ),
    (
        "style-images-empty",
        "B",
        lambda: StyleLoss(vision(), images(1)[0])(torch.zeros(2, 3, 0, 0)),
        ValueError,
        r"images must .*H, W >= 1",
    ),
    (
        "preprocess-uint8",
        "W",
        lambda: preprocess(pixels_uint8()[None], size=32),
        TypeError,
        r"images must be floating point .*\[-1, 1\].*uint8",
    ),
    (
        "style-images-1-channel",
        "G",
        lambda: StyleLoss(vision(), images(1)[0])(images(channels=1)),
        ValueError,
        r"images must have shape \(B, 3, H, W\)",
    ),
    (
        "similarity-images-3d",
        "G",
        lambda: ImageSimilarityLoss(vision(), images(1)[0])(images(1)[0]),
        ValueError,
        r"images must have shape \(B, 3, H, W\)",
    ),
    (
        "aesthetic-images-rgba",
        "G",
        lambda: AestheticLoss(vision(), torch.nn.Linear(EMBED, 1))(images(channels=4)),
        ValueError,
        r"images must have shape \(B, 3, H, W\)",
    ),
    # CLIP losses: text embeddings and the aesthetic head, checked when the loss is built
    (
        "text-embeds-too-wide",
        "B",
        lambda: TextSimilarityLoss(vision(), torch.randn(1, 2 * EMBED))(images()),
        ValueError,
        rf"text_embeds must have width E = {EMBED}.*got \(1, 32\)",
    ),
    (
        "text-embeds-1d",
        "G",
        lambda: TextSimilarityLoss(vision(), torch.randn(EMBED))(images()),
        ValueError,
        r"text_embeds must have shape \(1, E\) or \(B, E\)",
    ),
    (
        "text-embeds-batch-3-for-2",
        "B",
        lambda: TextSimilarityLoss(vision(), torch.randn(3, EMBED))(images(2)),
        ValueError,
        "text_embeds .*batch 3.*2 images",
    ),
    (
        "aesthetic-head-3-scores",
        "B",
        lambda: AestheticLoss(vision(), torch.nn.Linear(EMBED, 3))(images()),
        ValueError,
        r"head must map .*\(B, 1\) or \(B,\).*got \(2, 3\)",
    ),
    (
        "aesthetic-head-not-callable",
        "B",  # AttributeError: 'float' object has no attribute 'parameters'
        lambda: AestheticLoss(vision(), 3.0),
        TypeError,
        r"head must be a module or function of embeddings, got float",
    ),
    (
        "aesthetic-head-wrong-input",
        "B",
        lambda: AestheticLoss(vision(), torch.nn.Linear(2 * EMBED, 1))(images()),
        ValueError,
        rf"head must map .*\(B, {EMBED}\).*fails",
    ),
    # the guided pipeline
    ("pipe-prompt-empty-list", "B", lambda: run([]), ValueError, "prompt must be .*non-empty"),
    (
        "encode-prompt-empty-list",
        "B",
        lambda: guided().encode([]),
        ValueError,
        "prompt must be .*non-empty",
    ),
    ("pipe-prompt-int", "B", lambda: run(3), TypeError, "prompt must be a string"),
    (
        "pipe-prompt-list-of-int",
        "B",
        lambda: run(["a fox", 3]),
        TypeError,
        "prompt must be a string",
    ),
    (
        "pipe-num-images-0",
        "B",
        lambda: run(num_images_per_prompt=0),
        ValueError,
        "num_images_per_prompt must be an integer >= 1, got 0",
    ),
    (
        "pipe-num-images-negative",
        "B",
        lambda: run(num_images_per_prompt=-2),
        ValueError,
        "num_images_per_prompt must be an integer >= 1, got -2",
    ),
    (
        "pipe-num-images-float",
        "B",
        lambda: run(num_images_per_prompt=1.5),
        ValueError,
        "num_images_per_prompt must be an integer >= 1, got 1.5",
    ),
    (
        "pipe-3-generators-for-1-image",
        "W",
        lambda: run(generator=generators(3)),
        ValueError,
        "generator .*list of 3.*batch of 1",
    ),
    (
        "pipe-1-generator-list-for-2-images",
        "W",
        lambda: run(num_images_per_prompt=2, generator=generators(1)),
        ValueError,
        "generator .*list of 1.*batch of 2",
    ),
    (
        "noise-3-generators-for-1-image",
        "W",
        lambda: guided().initial_noise(1, height=16, width=16, generator=generators(3)),
        ValueError,
        "generator .*list of 3.*batch of 1",
    ),
    (
        "pipe-generator-int",
        "B",
        lambda: run(generator=0),
        TypeError,
        "generator must be a torch.Generator",
    ),
    (
        "pipe-latents-3-channels",
        "B",
        lambda: with_loss(latents=torch.randn(1, 3, 8, 8)),
        ValueError,
        r"latents must have shape \(1, 4, h, w\).*\(1, 3, 8, 8\)",
    ),
    (
        "pipe-latents-rank-3",
        "B",
        lambda: with_loss(latents=torch.randn(1, 4, 8)),
        ValueError,
        r"latents must have shape \(1, 4, h, w\).*\(1, 4, 8\)",
    ),
    (
        "pipe-latents-list",
        "B",
        lambda: run(latents=[[0.0]]),
        TypeError,
        "latents must be a torch.Tensor",
    ),
    (
        "pipe-prompt-embeds-other-width",
        "B",  # the text encoder's "Sequence length must be less than max_position_embeddings"
        lambda: run(None, prompt_embeds=torch.randn(1, 8, 16)),
        ValueError,
        r"prompt_embeds must have shape \(B, L, 32\) .*cross_attention_dim.*got \(1, 8, 16\)",
    ),
    (
        "pipe-prompt-embeds-rank-2",
        "B",  # "not enough values to unpack (expected 3, got 2)"
        lambda: run(None, prompt_embeds=torch.randn(8, 32)),
        ValueError,
        r"prompt_embeds must have shape \(B, L, 32\)",
    ),
    (
        "pipe-prompt-embeds-integer",
        "B",
        lambda: run(None, prompt_embeds=torch.zeros(1, 8, 32, dtype=torch.long)),
        TypeError,
        r"prompt_embeds must be a floating tensor \(B, L, 32\)",
    ),
    (
        "pipe-negative-embeds-other-width",
        "B",  # "The expanded size of the tensor (32) must match the existing size (16)"
        lambda: run(negative_prompt_embeds=torch.randn(1, 8, 16)),
        ValueError,
        r"negative_prompt_embeds must have shape \(B, L, 32\)",
    ),
    (
        "pipe-latents-batch",
        "G",
        lambda: run(["a", "b"], latents=torch.randn(1, 4, 8, 8)),
        ValueError,
        "latents must have batch size 2",
    ),
    (
        "pipe-height-other-than-latents",
        "W",
        lambda: run(height=32, latents=torch.randn(1, 4, 8, 8)),
        ValueError,
        r"height must be 16 for latents of shape \(1, 4, 8, 8\).*got 32",
    ),
    ("pipe-height-0", "W", lambda: run(height=0), ValueError, "height must be .*, got 0"),
    ("pipe-width-float", "B", lambda: run(width=16.0), ValueError, "width must be .*, got 16.0"),
    ("pipe-height-7", "G", lambda: run(height=7), ValueError, "multiples of 2"),
    ("pipe-output-type", "G", lambda: run(output_type="jpeg"), ValueError, "output_type"),
    # sagkit sample
    (
        "sample-seed-2**64",
        "B",
        lambda: cli([*unguided(workdir() / "a"), "--seed", str(2**64)], 2),
        SystemExit,
        r"exit 2: sagkit.*--seed must be an integer in \[0, 2\*\*64\)",
    ),
    (
        "sample-seed-negative",
        "W",
        lambda: cli([*unguided(workdir() / "b"), "--seed", "-1"], 2),
        SystemExit,
        r"exit 2: sagkit.*--seed must be an integer in \[0, 2\*\*64\), got -1",
    ),
    (
        "sample-seed-not-int",
        "G",
        lambda: cli([*unguided(workdir() / "c"), "--seed", "x"], 2),
        SystemExit,
        "exit 2: sagkit.*--seed",
    ),
    (
        "sample-out-is-a-file",
        "B",
        lambda: cli(unguided(a_file("out-file")), 2),
        SystemExit,
        "exit 2: sagkit.*--out: .*out-file.* is a file",
    ),
    (
        "sample-out-under-a-file",
        "B",
        lambda: cli(unguided(a_file("blocker") / "sub"), 2),
        SystemExit,
        "exit 2: sagkit.*--out: cannot create",
    ),
    (
        "sample-second-run-same-folder",
        "W",
        lambda: run_twice("twice"),
        SystemExit,
        r"exit 2: sagkit.*--out: .*none-seed0-000\.png.* exist.*--overwrite",
    ),
    (
        "sample-num-images-0",
        "G",
        lambda: cli([*unguided(workdir() / "d"), "--num-images", "0"], 2),
        SystemExit,
        "exit 2: sagkit.*--num-images",
    ),
    (
        "sample-style-not-an-image",
        "G",
        lambda: cli(["a fox", "--style", str(a_file("style.txt")), "--steps", "2"], 2),
        SystemExit,
        "exit 2: sagkit.*--style: cannot read an image",
    ),
]


def test_rows_are_listed_in_the_docstring():
    """Each row once, in the module docstring as ``id  before → exception``."""
    ids = [c[0] for c in ROWS]
    assert len(ids) == len(set(ids))
    assert {c[1] for c in ROWS} <= {"W", "H", "B", "G"}
    listed = re.findall(r"^    (\S+) +([WHBG]) → (\w+)$", __doc__, flags=re.MULTILINE)
    assert listed == [(c[0], c[1], c[3].__name__) for c in ROWS]


# --- the cases whose answer is a correct result, not an error ------------------------------
def sample_argv(out, *extra):
    argv = ["sample", "a fox", "--tiny", "--device", "cpu", "--no-progress", "--out", str(out)]
    return [*argv, "--style", str(style_file()), *extra]


def test_sidecar_records_what_ran_and_reproduces_the_image(monkeypatch, tmp_path):
    """Was W: no record of the run. The JSON beside each image holds the configuration the
    pipeline ran with (captured from the call), and rerunning with its values gives the same
    pixels."""
    import sagkit
    from sagkit.sd import pipeline

    ran = []

    def recording(*args, config, **kwargs):
        ran.append(config)
        return guided_sample(*args, config=config, **kwargs)

    guided_sample = pipeline.guided_sample
    monkeypatch.setattr(pipeline, "guided_sample", recording)
    options = ["--steps", "3", "--n", "2", "--window", "0", "1", "--seed", "7"]
    options += ["--num-images", "2", "--negative-prompt", "blurry"]
    assert cli_main(sample_argv(tmp_path / "a", *options)) == 0
    (config,) = ran
    for i in range(2):
        record = json.loads((tmp_path / "a" / f"sag-seed7-{i:03d}.json").read_text())
        assert record["image"] == f"sag-seed7-{i:03d}.png" and record["index"] == i
        assert record["guidance"] == json.loads(json.dumps(config.describe()))
        assert (record["prompt"], record["negative_prompt"]) == ("a fox", "blurry")
        assert (record["seed"], record["num_images"], record["preset"]) == (7, 2, None)
        assert (record["dtype"], record["device"], record["weights"]) == ("float32", "cpu", "tiny")
        assert record["sagkit"] == sagkit.__version__
        assert record["style"] == str(style_file().resolve())
        assert record["loss"] == {"name": "StyleLoss", "layer": 2}
    g = record["guidance"]
    assert (g["guidance"], g["steps"], g["n"], g["window"]) == ("sag", 3, 2, [0.0, 1.0])
    assert g["cfg_scale"] == 7.5 and g["sampler"]["class"] == "DDIMScheduler"  # the pipeline's
    again = ["--steps", str(g["steps"]), "--n", str(g["n"]), "--window", *map(str, g["window"])]
    again += ["--seed", str(record["seed"]), "--num-images", str(record["num_images"])]
    again += ["--negative-prompt", record["negative_prompt"], "--cfg-scale", str(g["cfg_scale"])]
    assert cli_main(sample_argv(tmp_path / "b", *again)) == 0
    for i in range(2):
        name = f"sag-seed7-{i:03d}.png"
        first, second = (np.asarray(Image.open(tmp_path / d / name)) for d in "ab")
        assert np.array_equal(first, second)
    assert ran[1].describe() == config.describe()


def test_existing_files_are_kept_unless_overwrite(capsys, tmp_path):
    """Was W (a second run overwrote): refused naming the files, which stay as they were;
    ``--overwrite`` replaces them."""
    out = tmp_path / "out"
    argv = ["--guidance", "none", "--steps", "2"]
    assert cli_main(sample_argv(out, *argv)) == 0
    png, sidecar = out / "none-seed0-000.png", out / "none-seed0-000.json"
    before = png.read_bytes(), sidecar.read_text()
    capsys.readouterr()
    argv[0:0] = ["--negative-prompt", "blurry"]
    assert exit_code(cli_main, sample_argv(out, *argv)) == 2
    line = one_line_error(capsys)
    assert "none-seed0-000.png" in line and "none-seed0-000.json" in line and "--overwrite" in line
    assert (png.read_bytes(), sidecar.read_text()) == before
    assert cli_main(sample_argv(out, *argv, "--overwrite")) == 0
    assert json.loads(sidecar.read_text())["negative_prompt"] == "blurry"
    assert sorted(p.name for p in out.iterdir()) == sorted([png.name, sidecar.name])


def test_unwritable_out_is_refused_naming_it(monkeypatch, tmp_path):
    """An existing folder without write permission (os.access answers for the user; as root
    every folder is writable, so its answer is stood in for here)."""
    from sagkit.lab import sample

    monkeypatch.setattr(sample.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"^--out: the folder .* is not writable$"):
        sample.output_folder(tmp_path, ["x.png"])


def test_negative_prompt_serves_a_batch_of_prompt_embeds():
    """Was B (a (1, L, D/B) negative embedding, then the UNet's error): with B prompts (a list
    or ``prompt_embeds``), one negative prompt or one negative embedding serves them all."""
    prompts = ["a fox", "a lighthouse"]
    cond, null = guided().encode(prompts, negative_prompt="blurry")
    assert cond.shape[0] == 2 and null.shape[0] == 1
    cond2, null2 = guided().encode(prompts, negative_prompt_embeds=null)
    assert torch.equal(cond2, cond) and torch.equal(null2, null)
    for negative in ({"negative_prompt": "blurry"}, {"negative_prompt_embeds": null}):
        cond2, null2 = guided().encode(prompt_embeds=cond, num_images_per_prompt=2, **negative)
        assert torch.equal(null2, null) and torch.equal(cond2, cond.repeat_interleave(2, 0))
    one = run(prompts, negative_prompt="blurry", generator=generators(2))
    two = run(prompt=None, prompt_embeds=cond, negative_prompt_embeds=null, generator=generators(2))
    assert torch.equal(one.images, two.images)


def test_valid_inputs_next_to_the_refused_ones_pass():
    """The checks refuse only what they name: a reference at exactly ±1 (what ``x / 127.5 - 1``
    gives for 0 and 255) and a bfloat16 one, one text embedding per image, a head returning
    (B,), one generator per image, a height of the VAE's factor."""
    from sagkit.lab.sample import read_image

    reference = read_image(style_file())
    assert (float(reference.min()), float(reference.max())) == (-1.0, 1.0)
    assert StyleLoss(vision(), reference)(images()).shape == (2,)
    assert StyleLoss(vision(), reference.bfloat16())(images()).shape == (2,)
    e = ImageSimilarityLoss(vision(), reference).embed(images())
    assert torch.equal(TextSimilarityLoss(vision(), e)(images()), cosine_distance(e, e))
    flat = torch.nn.Sequential(torch.nn.Linear(EMBED, 1), torch.nn.Flatten(0))
    assert AestheticLoss(vision(), flat)(images()).shape == (2,)
    out = run(num_images_per_prompt=2, generator=generators(2), height=2, width=4)
    assert out.images.shape == (2, 4, 1, 2)


def test_text_width_and_head_are_checked_when_the_loss_is_built():
    """Not at the first call inside a sampler: building the loss raises."""
    with pytest.raises(ValueError, match="text_embeds must have width"):
        TextSimilarityLoss(vision(), torch.randn(1, 2 * EMBED))
    with pytest.raises(ValueError, match="head must map"):
        AestheticLoss(vision(), torch.nn.Linear(EMBED, 3))


def test_a_function_as_the_aesthetic_head():
    """A head that is a function, not a module, scores in the embeddings' dtype."""
    loss = AestheticLoss(vision(), lambda e: e.sum(-1))
    assert loss(images()).shape == (2,)
