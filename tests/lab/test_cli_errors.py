"""Command-line errors: one line on stderr, exit 2 for usage and 1 for failures, no traceback
unless --debug; ``sagkit report`` keeps every finished section when another one fails."""

import pytest
import torch
from helpers import exit_code as run
from helpers import one_line_error

from sagkit.lab.cli import main
from sagkit.lab.report import ReportError, write_report


def train_main(argv):
    """``sagkit train`` with ``argv``."""
    return main(["train", *argv])


@pytest.mark.parametrize(
    "argv, names",
    [
        (["bench", "--model", "mixture", "--ns", "0"], "--ns"),
        (["bench", "--model", "mixture", "--batch", "0"], "--batch"),
        (["bench", "--model", "mixture", "--repeats", "0"], "--repeats"),
        (["bench", "--model", "mixture", "--ns", "x"], "--ns"),
        (["bench", "--model", "vae"], "--model"),
        (["report", "--sections", "nope"], "--sections"),
    ],
)
def test_usage_errors_exit_2_in_one_line(capsys, argv, names):
    assert run(main, argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("sagkit") and names in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert run(main, ["bench", "--model", "mixture", "--ns", "2", "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_line_error(capsys)


def test_unwritable_out_is_a_failure_in_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = [
        "report",
        "--out",
        str(blocker / "sub"),
        "--sections",
        "misalignment",
        "--device",
        "cpu",
    ]
    assert run(main, argv) == 1
    assert "failed" in one_line_error(capsys)


def test_debug_shows_the_exception(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        main(["--debug", "report", "--out", str(blocker / "sub"), "--sections", "misalignment"])


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_train_refuses_non_positive_steps(capsys, tmp_path, steps):
    argv = ["digits-classifier", "--steps", steps, "--out", str(tmp_path)]
    assert run(train_main, argv) == 2
    assert "--steps" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())


def test_train_refuses_the_shipped_weights(capsys):
    from sagkit.digits.models import DATA_DIR

    assert run(train_main, ["digits-classifier", "--steps", "1", "--out", str(DATA_DIR)]) == 2
    assert "--overwrite-shipped" in one_line_error(capsys)


@pytest.mark.parametrize(
    "command", [["train", "digits-classifier", "--steps", "1"], ["report"], ["sample", "a fox"]]
)
def test_an_empty_out_is_refused_before_any_work(capsys, monkeypatch, tmp_path, command):
    """``--out ""`` is not the current folder: nothing is trained or written there."""
    monkeypatch.chdir(tmp_path)
    assert run(main, [*command, "--out", ""]) == 2
    line = one_line_error(capsys)
    assert "--out" in line and "must name a folder" in line and "''" in line, line
    assert not any(tmp_path.iterdir())


def test_report_keeps_finished_sections_and_records_a_failure(monkeypatch, tmp_path, capsys):
    from sagkit.lab import report

    def first(out_dir, fast, device):
        return "## first\n\nfirst done\n"

    def broken(out_dir, fast, device):
        assert "first done" in (out_dir / "report.md").read_text()  # written as it finished
        raise RuntimeError("boom\nsecond line")

    def last(out_dir, fast, device):
        return "## last\n\nlast done\n"

    for name, fn in (("first", first), ("broken", broken), ("last", last)):
        monkeypatch.setitem(report.SECTIONS, name, fn)
    with pytest.raises(ReportError, match="broken"):
        write_report(out_dir=tmp_path, sections=["first", "broken", "last"], device="cpu")
    text = (tmp_path / "report.md").read_text()
    assert "first done" in text and "last done" in text
    assert "**This section failed**: RuntimeError: boom second line" in text

    capsys.readouterr()
    argv = ["report", "--out", str(tmp_path / "cli"), "--device", "cpu"]
    assert run(main, [*argv, "--sections", "first", "broken", "last"]) == 1
    assert "section(s) broken failed" in one_line_error(capsys)
    assert "last done" in (tmp_path / "cli" / "report.md").read_text()
