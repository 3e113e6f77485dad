"""sagkit: accurate gradients through diffusion samplers.

import sagkit as sk
model = sk.GaussianMixture.digits()                  # exact ε, exact ground truth
ts = sk.time_grid(model.schedule, 1.0, 0.0, 20)
x0 = sk.solve(model, x_T, ts, solver="heun")
loss, grad = sk.loss_grad(model, loss_fn, x_T, ts, method="symplectic")
"""

from . import losses
from .adjointdeis import adjointdeis_grad, convergence_study
from .classifier import DigitsClassifier
from .estimates import estimate_x0, misalignment, rms_distance
from .evaluation import evaluate_guidance
from .gradients import METHODS, finite_difference, loss_grad
from .guidance import GUIDANCE, guided_sample
from .inversion import inversion_error, invert
from .models import ClassifierFreeGuidance, DiffusersModel, GaussianMixture
from .optimize import evaluate_morphs, morph, optimize_latent
from .pretrained import DigitsModel, digits_dataset, load_classifier, load_pretrained, sample_digits
from .profiling import ProfileReport, profile, profile_gradient
from .schedules import VPSchedule, time_grid
from .sde import encode, recover_noise, sde_sample
from .solvers import SOLVERS, Tableau, register_solver, solve

__all__ = [
    # schedules, models, solvers, estimates
    "VPSchedule",
    "time_grid",
    "GaussianMixture",
    "DiffusersModel",
    "ClassifierFreeGuidance",
    "SOLVERS",
    "Tableau",
    "register_solver",
    "solve",
    "estimate_x0",
    "misalignment",
    "rms_distance",
    # gradient engines and their measurement
    "METHODS",
    "loss_grad",
    "finite_difference",
    "profile",
    "profile_gradient",
    "ProfileReport",
    # AdjointDEIS, the SDE sampler, inversion, latent optimisation
    "adjointdeis_grad",
    "convergence_study",
    "sde_sample",
    "recover_noise",
    "encode",
    "invert",
    "inversion_error",
    "optimize_latent",
    "morph",
    "evaluate_morphs",
    # shipped models, guidance
    "DigitsModel",
    "DigitsClassifier",
    "load_pretrained",
    "load_classifier",
    "digits_dataset",
    "sample_digits",
    "losses",
    "GUIDANCE",
    "guided_sample",
    "evaluate_guidance",
]
__version__ = "0.1.0"
