"""``sagkit sample``: one-line errors for missing weights and inputs, and a run on the tiny
random pipeline, from the command line and from a saved pipeline folder."""

import pytest
from helpers import exit_code, one_line_error
from PIL import Image

from sagkit.lab.cli import main
from sagkit.lab.sample import CLIP_PATH_VARIABLE, SD_PATH_VARIABLE


def run(argv) -> int:
    return exit_code(main, argv)


@pytest.mark.parametrize(
    "extra, names",
    [
        ([], "--sd"),  # no pipeline folder given
        (["--sd", "no/such/folder"], "--sd"),
        (["--sd", "."], "--clip"),
        (["--tiny", "--style", "no/such.png"], "--style"),
        (["--tiny", "--guidance", "sag"], "--style"),  # guidance needs a style image
        (["--tiny", "--n", "0"], "--n"),
        (["--tiny", "--preset", "nope"], "--preset"),
        (["--tiny", "--seed", "-1"], "--seed"),  # torch would alias it to 2**64 - 1
        (["--tiny", "--seed", str(2**64)], "--seed"),  # torch's overflow message
    ],
)
def test_errors_are_one_line_naming_the_option(capsys, monkeypatch, style, extra, names):
    monkeypatch.delenv(SD_PATH_VARIABLE, raising=False)
    monkeypatch.delenv(CLIP_PATH_VARIABLE, raising=False)
    argv = ["sample", "a fox", "--device", "cpu", *extra]
    if "--style" not in extra and names != "--style":
        argv += ["--style", str(style)]
    assert run(argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("sagkit") and names in line


def test_tiny_run_writes_images(capsys, tmp_path, style):
    argv = ["sample", "a fox", "--tiny", "--style", str(style), "--steps", "3", "--n", "2"]
    argv += ["--num-images", "2", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert run([*argv, "--no-progress"]) == 0
    paths = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in paths] == ["sag-seed0-000.png", "sag-seed0-001.png"]
    assert Image.open(paths[0]).size == (32, 32)
    sidecars = sorted(
        (tmp_path / "out").glob("*.json")
    )  # their contents: tests/bad_inputs/test_sd.py
    assert [p.stem for p in sidecars] == [p.stem for p in paths]


def test_run_from_saved_folders(monkeypatch, tmp_path, style):
    """The loading path: a pipeline and a CLIP saved to folders, given by the variables."""
    from sagkit.sd.tiny import tiny_clip_vision, tiny_pipeline

    tiny_pipeline(latent_size=8).save_pretrained(tmp_path / "sd")
    tiny_clip_vision().save_pretrained(tmp_path / "clip")
    monkeypatch.setenv(SD_PATH_VARIABLE, str(tmp_path / "sd"))
    monkeypatch.setenv(CLIP_PATH_VARIABLE, str(tmp_path / "clip"))
    argv = ["sample", "a fox", "--style", str(style), "--preset", "freedom-paper"]
    argv += ["--steps", "4", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert run(argv) == 0
    (path,) = (tmp_path / "out").glob("*.png")
    assert path.name == "freedom-paper-seed0-000.png" and Image.open(path).size == (16, 16)
