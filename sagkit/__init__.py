"""sagkit: accurate gradients through diffusion samplers.

    import sagkit as sk
    model = sk.digits.digits_mixture()           # exact ε, exact ground truth
    ts = sk.time_grid(model.schedule, 1.0, 0.0, 20)
    x0 = sk.solve(model, x_T, ts, solver="heun")
    loss, grad = sk.loss_grad(model, loss_fn, x_T, ts, method="symplectic")

The layers, bottom up (each imports only the ones above it in this list):

- :mod:`sagkit.core`: schedules, models, solvers, frames, estimates, the SDE sampler, inversion;
- :mod:`sagkit.gradients`: the gradient engines, their referees, latent optimisation;
- :mod:`sagkit.guidance`: guided sampling (one :class:`GuidanceConfig`, methods as objects),
  guidance losses;
- :mod:`sagkit.sd`: Stable Diffusion and its CLIP losses;
- :mod:`sagkit.digits`: the shipped digits models, their data, training and evaluation;
- :mod:`sagkit.lab`: the studies behind the notebooks and the report, and the CLI.

``import sagkit`` exposes the maths, the engines and guidance, and has no side effect. The
other layers are imported where used (``sagkit.sd``, ``sagkit.digits``, ``sagkit.lab``; each
also as an attribute, imported on first access). Names that moved keep a bridge for one minor
release (:mod:`sagkit.bridges`).

:func:`apply_cpu_threads` is the shared-machine thread policy (half the cores this process
may use, or ``SAGKIT_THREADS``/``OMP_NUM_THREADS``): the CLI, the report and the notebooks call
it; a script calls it when it wants it.

The formulas are in docs/maths.md, which the docstrings cite by section.
"""

import importlib

from .bridges import moved_names
from .core.device import apply_cpu_threads
from .core.estimates import estimate_x0, rms_distance
from .core.inversion import inversion_error, invert
from .core.models import ClassifierFreeGuidance, DiffusersModel, GaussianMixture
from .core.schedules import FlowSchedule, Schedule, VPSchedule, time_grid
from .core.sde import encode, recover_noise, sde_sample
from .core.solvers import SOLVERS, Tableau, register_solver, solve
from .gradients import (
    METHODS,
    GradientMethod,
    adjointdeis_grad,
    finite_difference,
    loss_grad,
    make_budgeted,
    register_method,
)
from .gradients.optimize import evaluate_morphs, morph, optimize_latent
from .guidance import losses
from .guidance.config import GuidanceConfig
from .guidance.family import LGD, MPGD, TFG, UGD
from .guidance.methods import GUIDANCE, GuidanceMethod
from .guidance.presets import PRESETS
from .guidance.sampler import guided_sample
from .version import __version__

__all__ = [
    # core: schedules, models, solvers, estimates, SDE, inversion
    "VPSchedule",
    "FlowSchedule",
    "Schedule",
    "time_grid",
    "GaussianMixture",
    "DiffusersModel",
    "ClassifierFreeGuidance",
    "SOLVERS",
    "Tableau",
    "register_solver",
    "solve",
    "estimate_x0",
    "rms_distance",
    "sde_sample",
    "recover_noise",
    "encode",
    "invert",
    "inversion_error",
    # gradients
    "METHODS",
    "GradientMethod",
    "register_method",
    "make_budgeted",
    "loss_grad",
    "finite_difference",
    "adjointdeis_grad",
    # guidance
    "losses",
    "GUIDANCE",
    "GuidanceMethod",
    "GuidanceConfig",
    "LGD",
    "MPGD",
    "UGD",
    "TFG",
    "PRESETS",
    "guided_sample",
    "optimize_latent",
    "morph",
    "evaluate_morphs",
    # the shared-machine thread policy
    "apply_cpu_threads",
    "__version__",
]

SUBPACKAGES = ("core", "gradients", "guidance", "sd", "digits", "lab")


def __getattr__(name: str):
    """``sk.digits``, ``sk.lab``, ``sk.sd``: imported on first access; a name that moved out of
    the root: from its new place, with a DeprecationWarning (:mod:`sagkit.bridges`)."""
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    return _moved(name)


_moved = moved_names(__name__, stacklevel=4)
