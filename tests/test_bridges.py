"""The package's face: ``import sagkit`` has no side effect and leaves the lab and the digits
models unimported; every name that moved since 0.2 is importable from its old place for one
minor release, with a DeprecationWarning naming the new place (sagkit.bridges)."""

import importlib
import subprocess
import sys

import pytest
import torch

import sagkit as sk
from sagkit.bridges import MOVED_MODULES, MOVED_NAMES

MOVED = [(old, name, new) for old, names in MOVED_NAMES.items() for name, new in names.items()]


@pytest.mark.parametrize("old, name, new", MOVED, ids=lambda v: v if isinstance(v, str) else "")
def test_a_moved_name_warns_and_is_the_new_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old, new", list(MOVED_MODULES.items()))
def test_a_moved_module_warns_and_is_the_new_module(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        got = importlib.import_module(old)
    assert got is importlib.import_module(new)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'load_pretrainde'"):
        sk.load_pretrainde  # noqa: B018


def test_the_layers_above_guidance_are_attributes_imported_on_first_use():
    assert sk.digits.load_pretrained is importlib.import_module("sagkit.digits").load_pretrained
    assert sk.lab.misalignment is importlib.import_module("sagkit.lab").misalignment


def test_importing_sagkit_has_no_side_effect():
    """No thread setting, no matplotlib backend, no notice filter; no lab, digits or sd."""
    code = (
        "import sys, torch; before = torch.get_num_threads(); import sagkit;"
        "print(torch.get_num_threads() == before,"
        " [m for m in ('matplotlib', 'sagkit.lab', 'sagkit.digits', 'sagkit.sd',"
        " 'transformers') if m in sys.modules])"
    )
    env = {"PATH": "", "SAGKIT_THREADS": "1"}  # a policy that would change torch's default
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.strip() == "True []", out


def test_the_root_exposes_maths_engines_and_guidance_only():
    moved = set(MOVED_NAMES["sagkit"])
    assert not moved & set(sk.__all__)
    assert len(sk.__all__) == len(set(sk.__all__)) <= 40


def test_a_moved_method_warns_and_calls_the_new_function():
    with pytest.warns(DeprecationWarning, match="GaussianMixture.digits moved to sagkit.digits"):
        old = sk.GaussianMixture.digits(n_components=8)
    new = sk.digits.digits_mixture(n_components=8)
    assert torch.equal(old.means, new.means) and old.std == new.std
