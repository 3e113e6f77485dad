"""sagkit report and the command line."""

import re

import pytest

from sagkit.lab.cli import main
from sagkit.lab.report import SECTIONS, write_report


@pytest.mark.slow
def test_fast_report_writes_markdown_with_every_figure(tmp_path):
    """`sagkit report --fast`, as `make report` runs it: every section, every image link."""
    assert main(["report", "--fast", "--out", str(tmp_path), "--device", "cpu"]) == 0
    text = (tmp_path / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 6
    assert all(f"*({name}:" in text for name in SECTIONS)
    for name in images:
        png = tmp_path / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| t | n=1 | n=2 | n=4 | n=8 |" in text and "slope" in text
    assert "## Guidance against ground truth" in text


def test_report_rejects_unknown_sections(tmp_path):
    with pytest.raises(ValueError, match="unknown report sections"):
        write_report(out_dir=tmp_path, sections=["nope"])


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "report" in out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert "--fast" in out and all(name in out for name in SECTIONS)


def test_cli_without_a_command_fails(capsys):
    assert main([]) == 2
