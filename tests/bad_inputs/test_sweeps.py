"""Evaluation sweeps never reuse the wrong shards: the hostile cases, one row each.

Rows (id: before → after; W silently wrong, B obscure error, G already a clear error):

- ``other-target``: W → refused (accuracy 0.0 from target 3's shard where 0.5 is right)
- ``same-name-twice-in-one-sweep``: W → refused (the second task read the first's shards)
- ``other-reference``: W → refused
- ``other-mask``: W → refused
- ``reference-only-inside-the-loss``: W → refused (a style loss's image, seen in its closure)
- ``other-loss-function``: W → refused
- ``other-partial-argument``: W → refused (a ``functools.partial``'s keyword)
- ``other-object-attribute``: W → refused (a bound method's object)
- ``other-numpy-array-in-the-loss``: W → refused
- ``other-model-weights``: W → refused
- ``other-classifier-in-the-loss``: W → refused
- ``other-sagkit-version``: W → refused
- ``truncated-shard``: B → refused, delete it (was a bare JSONDecodeError)
- ``shard-not-json``: B → refused, delete it (JSONDecodeError)
- ``shard-not-an-object``: B → refused, delete it (TypeError: list indices)
- ``shard-missing-samples``: B → refused, delete it (KeyError)
- ``shard-missing-settings``: B → refused, delete it (KeyError)
- ``shard-samples-cut-short``: B → refused, delete it (binascii's "Incorrect padding")
- ``shard-settings-not-an-object``: G → refused, delete it (was: "other settings")
- ``shard-dtype-unknown``: B → refused, delete it (TypeError of view())
- ``shard-a-folder``: B → refused, delete it (IsADirectoryError)
- ``shard-one-sample-of-two``: B → refused, delete it (an eigh failure in the FD)
- ``shard-seconds-negative``: W → refused, delete it (a negative s/sample)
- ``shard-loss-cut-short``: W → refused, delete it (a row of 1 loss for 2 samples)
- ``out-dir-a-file``: B → ValueError naming out_dir (FileExistsError of mkdir)
- ``out-dir-below-a-file``: B → ValueError naming out_dir (NotADirectoryError)
- ``out-dir-a-number``: B → TypeError naming out_dir (Path's TypeError)
- ``tasks-one-task-not-a-list``: B → TypeError naming tasks ("has no len()")
- ``tasks-entry-a-loss``: B → TypeError naming tasks (AttributeError: no attribute 'name')
- ``task-name-with-a-slash``: B → ValueError naming tasks (FileNotFoundError of a .tmp file)
- ``seed-a-string``: W → ValueError naming seed (ran with the noise of no integer seed)
- ``num-samples-a-string``: G → G
- ``batch-size-zero``: G → G
- ``batch-size-a-float``: G → G

Each row of :data:`ROWS` is ``(id, before, call, exception, message)`` as in
``tests/test_bad_inputs.py``, which runs them: ``before`` is the outcome class measured on the code before the
shard key covered the task, the model and the version; ``call`` a thunk that makes the bad
call, and the row passes when it raises ``exception`` with a message matching ``message``
(which names the argument or the file). Every silently wrong case is now a refusal, never a
recomputation. The cases whose answer is a correct result are plain tests below: matching
shards reused bit for bit (with every kind of loss rebuilt), a shard of another batch size
reused exactly (the batch size only cuts the ranges, which the key holds), a refusal changing
no file, a missing ``out_dir`` created. The sweeps are tiny: 2 samples of FreeDoM, 4 steps,
the shipped digits model and classifier.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import sagkit as sk
from sagkit.digits.data import digits_dataset
from sagkit.guidance import losses
from sagkit.lab.evaluation import GuidanceTask, evaluate_guidance

RUN = {"methods": ("freedom",), "num_samples": 2, "steps": 4, "batch_size": 2}
SHARD = "class__rms-n1__000000-000002.json"  # the one shard of the "class" task in RUN
CUSTOM = "custom__rms-n1__000000-000002.json"
FOLDERS = tempfile.TemporaryDirectory(prefix="sagkit-hostile-sweeps-")


# --- inputs, built once ---------------------------------------------------------------------
@functools.cache
def digits():
    return sk.digits.load_pretrained("digits", device="cpu")


@functools.cache
def classifier():
    return sk.digits.load_classifier("digits", device="cpu")


@functools.cache
def nudged(which: str):
    """A copy of the digits model or classifier with its first weight moved by 1e-3."""
    module = copy.deepcopy(digits() if which == "model" else classifier())
    with torch.no_grad():
        next(module.parameters()).add_(1e-3)
    return module


@functools.cache
def images():
    """Held-out digits (N, 1, 16, 16) and their labels."""
    return digits_dataset("test")


@functools.cache
def same_digit_pair() -> tuple[int, int]:
    """Two held-out images of the same digit: references that differ at the same label."""
    labels = images()[1]
    first = int(labels[0])
    return 0, next(i for i in range(1, len(labels)) if int(labels[i]) == first)


def class_task(target: int = 3, *, name: str = "class", judge=None) -> GuidanceTask:
    return GuidanceTask(name, losses.target_class(judge or classifier(), target), target)


def identity_task(index: int) -> GuidanceTask:
    ref, label = images()[0][index], int(images()[1][index])
    return GuidanceTask("identity", losses.feature_match(classifier(), ref), label, ref)


def inpaint_task(top: bool) -> GuidanceTask:
    ref, label = images()[0][0], int(images()[1][0])
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    mask = mask if top else 1 - mask
    return GuidanceTask("inpaint", losses.masked_reconstruction(ref, mask), label, ref, mask)


def style_task(index: int) -> GuidanceTask:
    """The reference only inside the loss: the task itself carries none."""
    return GuidanceTask("style", losses.style(classifier(), images()[0][index]))


def brightness(x):
    return (x.mean((1, 2, 3)) - 0.5) ** 2


def darkness(x):
    return (x.mean((1, 2, 3)) + 0.5) ** 2


def offset(x, *, to):
    return (x.mean((1, 2, 3)) - to) ** 2


class Offset:
    """A loss as a bound method: its object's attributes are its parameters."""

    def __init__(self, to: float):
        self.to = to

    def loss(self, x):
        return offset(x, to=self.to)


def weighted(pixel_weights: np.ndarray):
    """A loss closing over a numpy array, a module, a class, and itself."""
    array_module, tensor_class = np, torch.Tensor

    def loss(x):
        assert callable(loss) and isinstance(x, tensor_class)
        w = torch.as_tensor(array_module.asarray(pixel_weights)).to(x)
        return (w * x).flatten(1).sum(1) ** 2

    return loss


def pixel_weights(corner: int) -> np.ndarray:
    w = np.zeros((16, 16))
    w[corner:, corner:] = 1.0
    return w


def sweep(tasks, out_dir=None, *, model=None, **options):
    """``evaluate_guidance`` of RUN (with ``options``) on the digits model and classifier."""
    return evaluate_guidance(
        model or digits(), classifier(), tasks=tasks, out_dir=out_dir, **(RUN | options)
    )


WRITTEN = {
    "class": lambda: [class_task(3)],
    "identity": lambda: [identity_task(same_digit_pair()[0])],
    "inpaint": lambda: [inpaint_task(top=True)],
    "style": lambda: [style_task(same_digit_pair()[0])],
    "custom": lambda: [GuidanceTask("custom", brightness)],
    "partial": lambda: [GuidanceTask("custom", functools.partial(offset, to=0.5))],
    "method": lambda: [GuidanceTask("custom", Offset(0.5).loss)],
    "array": lambda: [GuidanceTask("custom", weighted(pixel_weights(0)))],
}


@functools.cache
def written(name: str, version: str | None = None) -> Path:
    """A folder holding the shards of the reference run ``name`` (made once; copy to edit)."""
    out = Path(tempfile.mkdtemp(dir=FOLDERS.name)) / "shards"
    if version is None:
        sweep(WRITTEN[name](), out)
    else:
        with mock.patch("sagkit.lab.evaluation.__version__", version):
            sweep(WRITTEN[name](), out)
    return out


def copy_of(name: str, version: str | None = None) -> Path:
    """A fresh copy of :func:`written`'s folder."""
    return Path(shutil.copytree(written(name, version), tempfile.mkdtemp(dir=FOLDERS.name) + "/s"))


def edited(change) -> Path:
    """A copy of the "class" folder whose shard file is rewritten by ``change(text) -> text``."""
    out = copy_of("class")
    path = out / SHARD
    path.write_text(change(path.read_text()))
    return out


def edited_record(change) -> Path:
    """A copy of the "class" folder whose shard's JSON record is edited in place by ``change``."""

    def rewrite(text):
        record = json.loads(text)
        change(record)
        return json.dumps(record)

    return edited(rewrite)


def fewer_sample_bytes(record):
    s = record["samples"]
    s["base64"] = s["base64"][: len(s["base64"]) // 2]


def one_sample_of_two(record):
    """The first sample alone, its bytes and shape consistent: a shard of another range."""
    s = record["samples"]
    raw = base64.b64decode(s["base64"])
    s["base64"] = base64.b64encode(raw[: len(raw) // 2]).decode()
    s["shape"][0] = 1


def a_folder_at_the_shard() -> Path:
    out = copy_of("class")
    (out / SHARD).unlink()
    (out / SHARD).mkdir()
    return out


def a_file() -> Path:
    path = Path(tempfile.mkdtemp(dir=FOLDERS.name)) / "not-a-folder"
    path.write_text("x")
    return path


def other_settings(*diffs: str, shard: str = SHARD) -> str:
    """The refusal of a shard of other settings: its path, then each ``key: stored vs now``."""
    return rf"{re.escape(shard)} was written with other settings \(.*" + ".*".join(diffs)


def unreadable(what: str, shard: str = SHARD) -> str:
    return rf"{re.escape(shard)} is not a readable shard file \(.*{what}.*\); delete it"


DIGEST = r'"[0-9a-f]{16}" vs "[0-9a-f]{16}"'
OUT_DIR = r"out_dir"

# --- the table ------------------------------------------------------------------------------
ROWS = [
    # W: a folder of another target's shards gave that target's samples and numbers.
    (
        "other-target",
        "W",
        lambda: sweep([class_task(5)], copy_of("class")),
        ValueError,
        other_settings(r"task\.label: 3 vs 5", rf"task\.loss\.closure\.label\.tensor: {DIGEST}"),
    ),
    (
        "same-name-twice-in-one-sweep",
        "W",
        lambda: sweep([class_task(3), class_task(5)], Path(tempfile.mkdtemp(dir=FOLDERS.name))),
        ValueError,
        r"tasks must have distinct names: 'class' is the name of entries 0 and 1",
    ),
    (
        "other-reference",
        "W",
        lambda: sweep([identity_task(same_digit_pair()[1])], copy_of("identity")),
        ValueError,
        other_settings(rf"task\.reference: {DIGEST}", shard="identity__rms-n1__000000-000002.json"),
    ),
    (
        "other-mask",
        "W",
        lambda: sweep([inpaint_task(top=False)], copy_of("inpaint")),
        ValueError,
        other_settings(rf"task\.mask: {DIGEST}", shard="inpaint__rms-n1__000000-000002.json"),
    ),
    (
        "reference-only-inside-the-loss",
        "W",
        lambda: sweep([style_task(same_digit_pair()[1])], copy_of("style")),
        ValueError,
        other_settings(
            rf"task\.loss\.closure\.ref\.tensor: {DIGEST}",
            shard="style__rms-n1__000000-000002.json",
        ),
    ),
    (
        "other-loss-function",
        "W",
        lambda: sweep([GuidanceTask("custom", darkness)], copy_of("custom")),
        ValueError,
        other_settings(
            r'task\.loss\.function: "[\w.]*brightness" vs "[\w.]*darkness"',
            shard=CUSTOM,
        ),
    ),
    (
        "other-partial-argument",
        "W",
        lambda: sweep(
            [GuidanceTask("custom", functools.partial(offset, to=-0.5))], copy_of("partial")
        ),
        ValueError,
        other_settings(r'task\.loss\.keywords\.to: "0\.5" vs "-0\.5"', shard=CUSTOM),
    ),
    (
        "other-object-attribute",
        "W",
        lambda: sweep([GuidanceTask("custom", Offset(-0.5).loss)], copy_of("method")),
        ValueError,
        other_settings(r'task\.loss\.of\.attributes\.to: "0\.5" vs "-0\.5"', shard=CUSTOM),
    ),
    (
        "other-numpy-array-in-the-loss",
        "W",
        lambda: sweep([GuidanceTask("custom", weighted(pixel_weights(8)))], copy_of("array")),
        ValueError,
        other_settings(rf"task\.loss\.closure\.pixel_weights\.array: {DIGEST}", shard=CUSTOM),
    ),
    (
        "other-model-weights",
        "W",
        lambda: sweep([class_task(3)], copy_of("class"), model=nudged("model")),
        ValueError,
        other_settings(rf"model\.weights: {DIGEST}"),
    ),
    (
        "other-classifier-in-the-loss",
        "W",
        lambda: sweep([class_task(3, judge=nudged("classifier"))], copy_of("class")),
        ValueError,
        other_settings(rf"task\.loss\.closure\.classifier\.weights: {DIGEST}"),
    ),
    (
        "other-sagkit-version",
        "W",
        lambda: sweep([class_task(3)], copy_of("class", version="0.1.0")),
        ValueError,
        other_settings(rf'version: "0\.1\.0" vs "{re.escape(sk.__version__)}"'),
    ),
    # B: a damaged shard file gave a bare JSONDecodeError, KeyError or shape error, no path.
    (
        "truncated-shard",
        "B",
        lambda: sweep([class_task(3)], edited(lambda text: text[: len(text) // 2])),
        ValueError,
        unreadable("not JSON"),
    ),
    (
        "shard-not-json",
        "B",
        lambda: sweep([class_task(3)], edited(lambda text: "results: pending\n")),
        ValueError,
        unreadable("not JSON"),
    ),
    (
        "shard-not-an-object",
        "B",
        lambda: sweep([class_task(3)], edited(lambda text: "[1, 2]")),
        ValueError,
        unreadable("not a JSON object"),
    ),
    (
        "shard-missing-samples",
        "B",
        lambda: sweep([class_task(3)], edited_record(lambda r: r.pop("samples"))),
        ValueError,
        unreadable("samples"),
    ),
    (
        "shard-missing-settings",
        "B",
        lambda: sweep([class_task(3)], edited_record(lambda r: r.pop("settings"))),
        ValueError,
        unreadable("settings"),
    ),
    (
        "shard-samples-cut-short",
        "B",
        lambda: sweep([class_task(3)], edited_record(fewer_sample_bytes)),
        ValueError,
        unreadable("samples"),
    ),
    (
        "shard-settings-not-an-object",
        "G",
        lambda: sweep([class_task(3)], edited_record(lambda r: r.update(settings="class"))),
        ValueError,
        unreadable("settings is not a JSON object"),
    ),
    (
        "shard-dtype-unknown",
        "B",
        lambda: sweep([class_task(3)], edited_record(lambda r: r["samples"].update(dtype="os"))),
        ValueError,
        unreadable("samples: 'os' is not a dtype"),
    ),
    (
        "shard-a-folder",
        "B",
        lambda: sweep([class_task(3)], a_folder_at_the_shard()),
        ValueError,
        unreadable("cannot be read"),
    ),
    # B: one sample for a range of two: an eigh failure deep in the Fréchet distance.
    (
        "shard-one-sample-of-two",
        "B",
        lambda: sweep([class_task(3)], edited_record(one_sample_of_two)),
        ValueError,
        unreadable("samples: 1, expected 2"),
    ),
    # W: a negative time, or one loss for two samples: a negative s/sample, a row of one
    # per-sample loss, silently.
    (
        "shard-seconds-negative",
        "W",
        lambda: sweep([class_task(3)], edited_record(lambda r: r.update(seconds=-1.0))),
        ValueError,
        unreadable("seconds must be a number >= 0, got -1.0"),
    ),
    (
        "shard-loss-cut-short",
        "W",
        lambda: sweep([class_task(3)], edited_record(lambda r: r["loss"].pop())),
        ValueError,
        unreadable("loss"),
    ),
    # B: out_dir a file, below a file or a number: the bare OSError of mkdir, Path's TypeError.
    (
        "out-dir-a-file",
        "B",
        lambda: sweep([class_task(3)], a_file()),
        ValueError,
        OUT_DIR + r": .*not-a-folder' is a file, not a folder",
    ),
    (
        "out-dir-below-a-file",
        "B",
        lambda: sweep([class_task(3)], a_file() / "shards"),
        ValueError,
        OUT_DIR + r": cannot create the folder .*not-a-folder/shards",
    ),
    (
        "out-dir-a-number",
        "B",
        lambda: sweep([class_task(3)], 3),
        TypeError,
        OUT_DIR + r" must be a folder path \(a str or path\), got 3",
    ),
    # tasks that are not tasks, and names that cannot be file names
    (
        "tasks-one-task-not-a-list",
        "B",
        lambda: sweep(class_task(3)),
        TypeError,
        r"tasks must be a sequence of GuidanceTask, got one GuidanceTask",
    ),
    (
        "tasks-entry-a-loss",
        "B",
        lambda: sweep([brightness]),
        TypeError,
        r"tasks entries must be GuidanceTask, got function",
    ),
    (
        "task-name-with-a-slash",
        "B",
        lambda: sweep([class_task(3, name="class/3")], Path(tempfile.mkdtemp(dir=FOLDERS.name))),
        ValueError,
        r"tasks entries' names must be non-empty strings without '/'.*got 'class/3'",
    ),
    # the counts and the seed
    (
        "seed-a-string",
        "W",
        lambda: sweep([class_task(3)], seed="0"),
        ValueError,
        r"seed must be an integer >= 0, got '0'",
    ),
    (
        "num-samples-a-string",
        "G",
        lambda: sweep([class_task(3)], num_samples="2"),
        ValueError,
        r"num_samples must be an integer >= 1, got '2'",
    ),
    (
        "batch-size-zero",
        "G",
        lambda: sweep([class_task(3)], batch_size=0),
        ValueError,
        r"batch_size must be an integer >= 1, got 0",
    ),
    (
        "batch-size-a-float",
        "G",
        lambda: sweep([class_task(3)], batch_size=2.0),
        ValueError,
        r"batch_size must be an integer >= 1, got 2\.0",
    ),
]


def test_the_rows_are_unique_and_classified():
    ids = [c[0] for c in ROWS]
    assert len(ids) == len(set(ids))
    assert {c[1] for c in ROWS} == {"W", "B", "G"}
    listed = re.findall(r"^- ``([\w-]+)``: ([WBG]) → ", __doc__, flags=re.M)
    assert listed == [(c[0], c[1]) for c in ROWS]  # the docstring lists every row as measured


# --- the cases whose answer is a correct result, not an error ------------------------------
def test_matching_shards_are_reused_bit_for_bit(caplog):
    """Rebuilt, equal task, model and loss (new objects, a fresh load of the weights): every
    shard is loaded, none computed, and the rows equal those of the run that wrote them."""
    out = copy_of("class")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    first = sweep([class_task(3)])
    model = sk.digits.load_pretrained("digits", device="cpu")
    with caplog.at_level("INFO", logger="sagkit.lab.evaluation"):
        again = sweep([class_task(3)], out, model=model)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"rank 0 loaded {SHARD}"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["per_sample"], b["per_sample"])
        assert (a["loss"], a["accuracy"], a["fd"]) == (b["loss"], b["accuracy"], b["fd"])


@pytest.mark.parametrize("name", list(WRITTEN))
def test_a_rebuilt_loss_of_every_kind_finds_its_shards(name, caplog):
    """The fingerprint of a loss is a function of what it is, not of which object it is: the
    tasks rebuilt (closures, a partial, a bound method, a numpy array, a cycle) load every
    shard of the run that wrote them."""
    out = copy_of(name)
    with caplog.at_level("INFO", logger="sagkit.lab.evaluation"):
        sweep(WRITTEN[name](), out)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"rank 0 loaded {p.name}" for p in sorted(out.iterdir())]


def test_a_shard_of_another_batch_size_is_reused_exactly(caplog):
    """The batch size only cuts the samples into ranges, and a shard's numbers depend on its
    range alone: shard [2, 3) of a run in shards of 2 is reused by a run in shards of 1 and
    equals the one that run computes itself."""
    out = Path(tempfile.mkdtemp(dir=FOLDERS.name))
    sweep([class_task(3)], out, num_samples=3, batch_size=2)
    with caplog.at_level("INFO", logger="sagkit.lab.evaluation"):
        reused = sweep([class_task(3)], out, num_samples=3, batch_size=1)[0]
    loaded = [r.getMessage() for r in caplog.records if " loaded " in r.getMessage()]
    assert loaded == ["rank 0 loaded class__rms-n1__000002-000003.json"]
    fresh = sweep([class_task(3)], num_samples=3, batch_size=1)[0]
    assert torch.equal(reused["per_sample"], fresh["per_sample"])


def test_a_refused_sweep_changes_no_file():
    out = copy_of("class")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="other settings"):
        sweep([class_task(5)], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_missing_out_dir_is_created(tmp_path):
    out = tmp_path / "a" / "b"
    sweep([class_task(3)], out)
    assert [p.name for p in out.iterdir()] == [SHARD]


def test_an_out_dir_that_cannot_be_written_is_refused(monkeypatch, tmp_path):
    """``os.access`` says no, as for a folder without write permission (stood in for: root,
    who runs some test machines, may write anywhere)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(
        ValueError, match=OUT_DIR + rf": the folder '{re.escape(str(tmp_path))}' is not writable"
    ):
        sweep([class_task(3)], tmp_path)
