"""CHANGELOG.md in Keep a Changelog form: releases newest first, each with Added, Changed,
Deprecated, Removed and Fixed bullets (in that order, where present), and no essays; the
newest release is the package's version, and every bridge is listed under Deprecated."""

import re
from pathlib import Path

from sagkit.bridges import MOVED_METHODS, MOVED_MODULES, MOVED_NAMES
from sagkit.version import __version__

CHANGELOG = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
KINDS = ("Added", "Changed", "Deprecated", "Removed", "Fixed")
RELEASE = re.compile(r"^## \[(Unreleased|\d+\.\d+\.\d+)\]( - \d{4}-\d{2}-\d{2})?$")


def releases() -> dict[str, str]:
    parts = re.split(r"^(## .*)$", CHANGELOG, flags=re.M)
    return {heading: body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_releases_are_versions_newest_first():
    headings = list(releases())
    assert all(RELEASE.match(h) for h in headings), headings
    versions = [RELEASE.match(h).group(1) for h in headings]
    assert versions[0] == "Unreleased" and versions[1] == __version__
    numbers = [tuple(map(int, v.split("."))) for v in versions[1:]]
    assert numbers == sorted(numbers, reverse=True)


def test_each_release_holds_only_the_five_kinds_in_order_as_bullets():
    for heading, body in releases().items():
        kinds = re.findall(r"^### (.*)$", body, flags=re.M)
        assert set(kinds) <= set(KINDS), (heading, kinds)
        assert kinds == sorted(kinds, key=KINDS.index), (heading, kinds)
        for block in re.split(r"^### .*$", body, flags=re.M)[1:]:
            for line in block.strip().splitlines():  # a bullet, or its continuation
                assert line.startswith(("- ", "  ")) or not line.strip(), (heading, line)


def test_every_bridge_is_listed_under_deprecated():
    newest = next(b for h, b in releases().items() if h.startswith(f"## [{__version__}]"))
    deprecated = newest.split("### Deprecated")[1]
    deprecated = deprecated.split("### ")[0]
    moved = [*MOVED_MODULES, *MOVED_METHODS, *(n for names in MOVED_NAMES.values() for n in names)]
    missing = [m for m in moved if m.rpartition(".")[2] not in deprecated]
    assert not missing, missing
