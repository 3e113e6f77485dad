"""Gradient engines: ∂L(Φ(x))/∂(x, cond, θ) through an n-step solve Φ, by interchangeable methods.

    loss, grad = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver="ddim")

- :mod:`.api`: the registry :data:`METHODS`, :class:`GradientMethod` and :func:`loss_grad`;
- :mod:`.engines`: backprop, checkpoint, the symplectic adjoint, the vanilla adjoint;
- :mod:`.adjointdeis`: AdjointDEIS-1 and -2M for the diffusion ODE and SDE;
- :mod:`.reference`: the referees, finite differences and the continuous gradient;
- :mod:`.memory`: the public hook through which engines report what they keep;
- :mod:`.optimize`: latent optimisation and morphing through the engines.

The built-in engines are registered here, once; :func:`register_method` adds more.
"""

from . import adjointdeis, engines
from .adjointdeis import adjointdeis_grad
from .api import METHODS, GradientMethod, evaluate_loss, loss_grad, register_method
from .engines import make_budgeted
from .reference import exact_gradient, finite_difference, reference_gradient

for _method in (*engines.BUILTIN, *adjointdeis.BUILTIN):
    register_method(_method)
del _method

__all__ = [
    "METHODS",
    "GradientMethod",
    "register_method",
    "make_budgeted",
    "loss_grad",
    "evaluate_loss",
    "adjointdeis_grad",
    "finite_difference",
    "exact_gradient",
    "reference_gradient",
]
