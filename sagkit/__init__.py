"""sagkit: accurate gradients through diffusion samplers.

import sagkit as sk
model = sk.GaussianMixture.digits()
ts = sk.time_grid(model.schedule, 1.0, 0.0, 20)
x0 = sk.solve(model, x_T, ts, solver="heun")
"""

from .classifier import DigitsClassifier
from .estimates import estimate_x0, misalignment, rms_distance
from .gradients import METHODS, loss_grad
from .models import ClassifierFreeGuidance, DiffusersModel, GaussianMixture
from .pretrained import DigitsModel, digits_dataset, load_classifier, load_pretrained, sample_digits
from .schedules import VPSchedule, time_grid
from .solvers import SOLVERS, Tableau, register_solver, solve

__all__ = [
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
    "METHODS",
    "loss_grad",
    "rms_distance",
    "DigitsModel",
    "DigitsClassifier",
    "load_pretrained",
    "load_classifier",
    "digits_dataset",
    "sample_digits",
]
__version__ = "0.1.0"
