"""``sagkit sample --video``: the tiny random AnimateDiff pipeline from the command line, a
saved video pipeline of each kind from the folder in the variable, and one-line errors."""

import json

import pytest
from helpers import exit_code, one_line_error
from PIL import Image

from sagkit.lab.cli import main
from sagkit.lab.sample import CLIP_PATH_VARIABLE, FPS, SD_PATH_VARIABLE, VIDEO_PATH_VARIABLE


def run(argv) -> int:
    return exit_code(main, argv)


def gif_frames(path) -> list:
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append((gif.size, gif.info.get("duration")))
        return frames


def test_tiny_run_writes_videos(tmp_path, style):
    argv = ["sample", "a fox", "--tiny", "--video", "--style", str(style), "--steps", "2"]
    argv += ["--n", "2", "--num-frames", "3", "--num-images", "2", "--decode-chunk-size", "2"]
    assert run([*argv, "--out", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    paths = sorted(tmp_path.glob("*.gif"))
    assert [p.name for p in paths] == ["sag-seed0-000.gif", "sag-seed0-001.gif"]
    assert gif_frames(paths[0]) == [((16, 16), 1000 // FPS)] * 3
    record = json.loads(paths[1].with_suffix(".json").read_text())
    assert (record["video"], record["index"], record["num_images"]) == (paths[1].name, 1, 2)
    assert record["frames"] == {"num_frames": 3, "decode_chunk_size": 2, "fps": FPS}
    assert record["loss"] == {"name": "FrameAverage(StyleLoss)", "layer": 2}
    assert (record["guidance"]["guidance"], record["guidance"]["n"]) == ("sag", 2)


@pytest.mark.parametrize("kind", ["animatediff", "text-to-video"])
def test_run_from_saved_folders(monkeypatch, tmp_path, style, kind):
    """The loading path: a video pipeline of either kind and a CLIP saved to folders, given by
    the variables (the image pipeline's variable is not read)."""
    from sagkit.sd.tiny import tiny_clip_vision
    from sagkit.sd.tiny_video import tiny_animatediff, tiny_text_to_video

    build = {"animatediff": tiny_animatediff, "text-to-video": tiny_text_to_video}[kind]
    build(latent_size=4).save_pretrained(tmp_path / "video")
    tiny_clip_vision().save_pretrained(tmp_path / "clip")
    monkeypatch.setenv(VIDEO_PATH_VARIABLE, str(tmp_path / "video"))
    monkeypatch.setenv(CLIP_PATH_VARIABLE, str(tmp_path / "clip"))
    monkeypatch.setenv(SD_PATH_VARIABLE, str(tmp_path / "nowhere"))
    argv = ["sample", "a fox", "--video", "--style", str(style), "--guidance", "freedom"]
    argv += ["--steps", "2", "--num-frames", "2", "--out", str(tmp_path / "out")]
    assert run([*argv, "--device", "cpu", "--no-progress"]) == 0
    (path,) = (tmp_path / "out").glob("*.gif")
    assert path.name == "freedom-seed0-000.gif" and gif_frames(path) == [((8, 8), 1000 // FPS)] * 2


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--num-frames", "3"], "--num-frames"),  # a video option without --video
        (["--decode-chunk-size", "3"], "--video"),
        (["--video", "--num-frames", "0"], "--num-frames"),
        (["--video", "--decode-chunk-size", "0"], "--decode-chunk-size"),
        (["--video", "--sd", "no/such/folder"], "--sd"),
    ],
)
def test_errors_are_one_line_naming_the_option(capsys, monkeypatch, style, extra, names):
    monkeypatch.delenv(VIDEO_PATH_VARIABLE, raising=False)
    argv = ["sample", "a fox", "--tiny", "--device", "cpu", "--style", str(style), *extra]
    if "--sd" in extra:
        argv.remove("--tiny")
    assert run(argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("sagkit") and names in line


def test_the_video_folder_is_required_and_named(capsys, monkeypatch, style):
    monkeypatch.delenv(VIDEO_PATH_VARIABLE, raising=False)
    monkeypatch.setenv(SD_PATH_VARIABLE, ".")  # an image pipeline's folder is not a video one
    assert run(["sample", "a fox", "--video", "--style", str(style), "--device", "cpu"]) == 2
    line = one_line_error(capsys)
    assert "--sd" in line and VIDEO_PATH_VARIABLE in line
