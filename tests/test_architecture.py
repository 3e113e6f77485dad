"""The shape of the package: layers that import only downwards, no private names across modules,
keyword-only options, and a maths document that every citation and "Implemented by" resolves in."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sagkit"
MATHS = ROOT / "docs" / "maths.md"
# bottom up: a layer may import the layers before it, never those after
LAYERS = ("core", "gradients", "guidance", "sd", "digits", "lab")
MODULES = sorted(PACKAGE.rglob("*.py"))


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def imports(path: Path):
    """(relative module it resolves to inside sagkit, imported names, line) of every import."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            yield module, [a.name for a in node.names], node.lineno


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_downwards_only(path):
    mine = layer_of(path)
    if mine is None:
        return  # sagkit/__init__.py and __main__.py sit on top of everything
    for module, _names, line in imports(path):
        target = module.split(".")[0]
        if target not in LAYERS:
            continue
        rel = str(path.relative_to(PACKAGE))
        assert LAYERS.index(target) <= LAYERS.index(mine), (
            f"{rel}:{line} imports {module} from a higher layer"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_inside_imports_the_package_root(path):
    """The root imports the layers; a layer that imported the root would close a cycle
    (``__version__`` is in sagkit/version.py for that reason)."""
    if path.name == "__init__.py" and path.parent == PACKAGE:
        return
    tree = ast.parse(path.read_text())
    for module, names, line in imports(path):
        assert module != "", f"{path.relative_to(PACKAGE)}:{line} imports {names} from the root"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert "sagkit" not in roots, f"{path.relative_to(PACKAGE)}:{node.lineno}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_across_modules(path):
    for module, names, line in imports(path):
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"{path.name}:{line} imports {private} from {module}"


def maths_sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?) ", MATHS.read_text(), flags=re.M))


def test_every_citation_of_the_maths_document_names_a_section():
    sections, cited = maths_sections(), set()
    for path in MODULES:
        for group in re.findall(r"docs/maths\.md ((?:§[\d.]*\d(?:, )?)+)", path.read_text()):
            cited |= set(re.findall(r"§([\d.]*\d)", group))
    assert cited, "no docstring cites docs/maths.md"
    assert cited <= sections, f"cited but missing: {sorted(cited - sections)}"


def test_every_implemented_by_resolves_to_code():
    names = re.findall(r"Implemented by: `(sagkit\.[\w.]+)`", MATHS.read_text())
    assert len(names) > 40
    for name in names:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:k]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)  # an AttributeError names what is missing


def test_nothing_points_outside_the_repository():
    tests = [p for p in ROOT.glob("tests/**/*.py") if p != Path(__file__).resolve()]  # not this one
    for path in [
        *MODULES,
        *tests,
        *ROOT.glob("*.md"),
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("notebooks/*"),
    ]:
        text = path.read_text()
        assert not re.search(r"\bMATH\b", text) and "shared/" not in text, path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_options_are_keyword_only(path):
    """Options come after ``*``: a public function has at most one positional argument with a
    default (its main argument, as in ``get_frame("eps")``); the model protocol's
    ``eps(x, t, cond=None)`` keeps cond positional, as every model implements it."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        if node.name in {"eps", "score", "x0", "predict"}:
            continue
        defaults = node.args.defaults
        assert len(defaults) <= 1, (
            f"{path.name}:{node.lineno} {node.name} has positional options "
            f"{[a.arg for a in node.args.args[-len(defaults) :]]}"
        )
