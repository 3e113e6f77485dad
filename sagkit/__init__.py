"""sagkit: accurate gradients through diffusion samplers.

    import sagkit as sk
    model = sk.digits_mixture()                  # exact ε, exact ground truth
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

The formulas are in docs/maths.md, which the docstrings cite by section.

Importing sagkit sets torch's CPU threads to half the cores this process may use (so that one
competing process does not multiply its time); ``SAGKIT_THREADS=k`` or ``OMP_NUM_THREADS=k``
chooses k instead (:func:`sagkit.core.device.cpu_threads`).
"""

from .core.device import apply_cpu_threads
from .core.estimates import estimate_x0, rms_distance
from .core.inversion import inversion_error, invert
from .core.models import ClassifierFreeGuidance, DiffusersModel, GaussianMixture
from .core.schedules import FlowSchedule, Schedule, VPSchedule, time_grid
from .core.sde import encode, recover_noise, sde_sample
from .core.solvers import SOLVERS, Tableau, register_solver, solve
from .digits.classifier import DigitsClassifier
from .digits.data import digits_dataset, digits_mixture
from .digits.models import DigitsModel, load_classifier, load_pretrained, sample_digits
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
from .lab.convergence import convergence_study
from .lab.evaluation import evaluate_guidance
from .lab.misalignment import misalignment
from .lab.profiling import ProfileReport, profile, profile_gradient

# CPU threads: half the cores unless SAGKIT_THREADS or OMP_NUM_THREADS says (core.device).
apply_cpu_threads()

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
    # the shipped digits models
    "DigitsModel",
    "DigitsClassifier",
    "load_pretrained",
    "load_classifier",
    "digits_dataset",
    "digits_mixture",
    "sample_digits",
    # studies and measurement
    "misalignment",
    "convergence_study",
    "evaluate_guidance",
    "profile",
    "profile_gradient",
    "ProfileReport",
]
__version__ = "0.2.0"
