"""Bridges for names that moved: each stays importable from its old place for one minor
release, with a ``DeprecationWarning`` that names the new place.

    MOVED_NAMES        old module → {name: the module that holds it now} (0.3: the digits
                       models and the lab left the package root; 0.2's guided sampler's
                       helpers now live in guidance.methods and guidance.travel)
    MOVED_MODULES      old module → new module (moved after 0.2)

A module with moved names ends with ``__getattr__ = moved_names(__name__)``; a moved module
is a file that calls :func:`bridge_module`.

The bridges go in 0.4. CHANGELOG.md lists them under "Deprecated".
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = [
    "MOVED_NAMES",
    "MOVED_MODULES",
    "MOVED_METHODS",
    "moved_names",
    "bridge_module",
    "call_moved",
    "warn_moved",
]

REMOVED_IN = "0.4"

_DIGITS = (
    "DigitsClassifier",
    "DigitsModel",
    "digits_dataset",
    "digits_mixture",
    "load_classifier",
    "load_pretrained",
    "sample_digits",
)
_LAB = (
    "misalignment",
    "convergence_study",
    "evaluate_guidance",
    "profile",
    "profile_gradient",
    "ProfileReport",
)
MOVED_NAMES = {
    "sagkit": {
        **dict.fromkeys(_DIGITS, "sagkit.digits"),
        **dict.fromkeys(_LAB, "sagkit.lab"),
    },
    "sagkit.guidance.sampler": {
        "GUIDANCE": "sagkit.guidance.methods",
        "GuidanceMethod": "sagkit.guidance.methods",
        "guidance_gradient": "sagkit.guidance.methods",
        "rms_step_size": "sagkit.guidance.methods",
        "dps_step_size": "sagkit.guidance.methods",
        "guidance_window": "sagkit.guidance.travel",
    },
    "sagkit.digits.train": {"main": "sagkit.lab.cli"},
}
MOVED_METHODS = {"sagkit.GaussianMixture.digits": "sagkit.digits.digits_mixture"}
"""Methods that became functions of a higher layer: the old method calls :func:`call_moved`."""

MOVED_MODULES = {
    "sagkit.guidance.stable_diffusion": "sagkit.sd.pipeline",
    "sagkit.guidance.latent": "sagkit.sd.latent",
    "sagkit.guidance.clip": "sagkit.sd.clip",
    "sagkit.guidance.optimize": "sagkit.gradients.optimize",
    "sagkit.lab.tiny_sd": "sagkit.sd.tiny",
}


def warn_moved(old: str, new: str, *, stacklevel: int = 3) -> None:
    """The one warning of every bridge: ``old`` is now ``new``."""
    warnings.warn(
        f"{old} moved to {new}; the old name goes in sagkit {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def moved_names(module: str, *, stacklevel: int = 3):
    """The module ``__getattr__`` of ``module``: a moved name from its new module, with the
    warning (``stacklevel``: the frames up to the user's line); AttributeError for any other
    name."""
    moved = MOVED_NAMES[module]

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_moved(f"{module}.{name}", f"{moved[name]}.{name}", stacklevel=stacklevel)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__


def bridge_module(old: str) -> None:
    """Make the module ``old`` (a bridge file) the module it moved to, with the warning."""
    new = MOVED_MODULES[old]
    warn_moved(old, new, stacklevel=4)
    sys.modules[old] = importlib.import_module(new)


def call_moved(old: str, *args, **kwargs):
    """Call what the method ``old`` became (:data:`MOVED_METHODS`), with the warning; a lower
    layer reaches a higher one only through this bridge, and only until 0.4."""
    module, _, name = MOVED_METHODS[old].rpartition(".")
    warn_moved(old, MOVED_METHODS[old])
    return getattr(importlib.import_module(module), name)(*args, **kwargs)
