"""Noise-prediction models in one protocol.

A model is any object with ``.schedule`` (a :class:`~sagkit.VPSchedule` or
:class:`~sagkit.FlowSchedule`) and ``.eps(x, t, cond=None)``: x of shape (B, ...), t a float or
a (B,) tensor in [0, 1], and an optional conditioning tensor. It returns ε(x, t) of x's shape.
A model may also have ``.velocity(x, t, cond=None)``, v = ε − x̂0: a flow-matching network
predicts it, and it stays finite where α = 0 (t = 1 of a flow schedule), where ε = x carries
no information about x̂0; the "velocity" frame calls it (:func:`sagkit.core.frames.velocity_of`). A conditional model may
also have ``.null_cond``, its unconditional conditioning (1, ...): the negative branch of
classifier-free guidance, and what guided sampling conditions on when no ``cond`` is given
(:func:`null_cond_of` reads it). Two implementations:

- :class:`GaussianMixture`: the exact ε of a diffused Gaussian mixture (ground truth);
- :class:`DiffusersModel`: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (images
  (B, C, H, W)); a subclass with ``sample_ndim = 5`` takes a video UNet (B, C, F, H, W).

:class:`ClassifierFreeGuidance` wraps a conditional model into another model of the protocol.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..bridges import call_moved
from .checks import check_cond, check_finite, check_matches, check_scale, check_time
from .frames import EpsFrame, Frame, VelocityFrame, ode_frame, per_sample
from .schedules import Schedule, VPSchedule

__all__ = [
    "HALF_DTYPES",
    "working_dtype",
    "GaussianMixture",
    "DiffusersModel",
    "DiffusersPrediction",
    "EpsilonPrediction",
    "VPrediction",
    "SamplePrediction",
    "DIFFUSERS_PREDICTIONS",
    "diffusers_prediction",
    "ClassifierFreeGuidance",
    "null_cond_of",
    "time_column",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""Weight dtypes :class:`DiffusersModel` runs in half precision around a float32 state."""


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sagkit computes in beside a network of ``dtype``: float32 for half precision,
    else ``dtype`` itself (float32 or float64).

    (docs/maths.md §11.6)
    """
    return torch.float32 if dtype in HALF_DTYPES else dtype


def null_cond_of(model) -> torch.Tensor | None:
    """The model's unconditional conditioning ``model.null_cond`` (1, ...), or ``None`` for a
    model without one (the optional part of the model protocol)."""
    return getattr(model, "null_cond", None)


def time_column(t, x: torch.Tensor) -> torch.Tensor:
    """t as a float64 tensor of shape (B,) for a batch x of shape (B, ...)."""
    check_time(t, "t", allow_zero=True)  # a float is checked on the host, before any copy
    tt = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if tt.ndim == 0:
        tt = tt.expand(x.shape[0])
    if tt.shape != (x.shape[0],):
        raise ValueError(
            f"t must be a float or a tensor of shape ({x.shape[0]},), got {tuple(tt.shape)}"
        )
    return tt


class GaussianMixture(nn.Module):
    """The exact diffusion of p_0 = Σ_k π_k N(μ_k, s² I).

    With v_t = α_t² s² + σ_t² (a diffused component has covariance v_t I):

        ∇ log p_t(x) = Σ_k w_k(x) (α_t μ_k − x) / v_t,
        w = softmax_k(log π_k − ‖x − α_t μ_k‖² / (2 v_t)),
        ε*(x, t) = −σ_t ∇ log p_t(x),     E[x_0 | x_t] = (x + σ_t² ∇ log p_t(x)) / α_t.

    Args:
        means: (K, *shape) component means μ_k (a parameter, so ``wrt="params"`` works).
        std: the component standard deviation s > 0.
        schedule: the noise schedule.
        weights: (K,) mixture weights π (normalised here); uniform when omitted.

    The optional ``cond`` of :meth:`eps` is a (K,) or (B, K) tensor of logits added to
    log π: a differentiable class conditioning with exact ground truth.
    """

    def __init__(self, means: torch.Tensor, std: float, schedule: Schedule, weights=None):
        super().__init__()
        means = torch.as_tensor(means)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *shape), got {tuple(means.shape)}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        k = means.shape[0]
        weights = (
            torch.full((k,), 1.0 / k, dtype=means.dtype)
            if weights is None
            else torch.as_tensor(weights)
        )
        check_finite(means, "means")
        if weights.is_floating_point():
            check_finite(weights, "weights")
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(
                f"weights must be {k} positive numbers, got shape {tuple(weights.shape)}"
            )
        # A parameter (so that wrt="params" has exact ground truth), frozen by default so
        # that plain sampling builds no graph: call requires_grad_() to differentiate.
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()).to(means.dtype))
        self.std = float(std)
        self.schedule = schedule
        self.labels = None  # class of each component, where known (see sk.digits.digits_mixture)

    @property
    def event_shape(self) -> torch.Size:
        return self.means.shape[1:]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[1:] != self.event_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}"
            )

    def _posterior(self, x: torch.Tensor, t, cond):
        """(w (B, K), α_t (B,), v_t (B,), μ (K, D), x flattened (B, D)): the posterior weights
        of the components given x_t = x, and what they were computed from."""
        self._check(x)
        tt = time_column(t, x)
        alpha = self.schedule.alpha(tt).to(x.dtype)  # (B,)
        var = alpha**2 * self.std**2 + self.schedule.sigma(tt).to(x.dtype) ** 2  # v_t, (B,)
        flat = x.reshape(x.shape[0], -1)  # (B, D)
        mu = self.means.to(x).reshape(self.means.shape[0], -1)  # (K, D)
        centred = alpha[:, None, None] * mu[None] - flat[:, None]  # α_t μ_k − x, (B, K, D)
        logits = self.log_weights.to(x) - (centred**2).sum(-1) / (2 * var[:, None])  # (B, K)
        if cond is not None:
            cond = check_cond(torch.as_tensor(cond), "cond")
            k = self.means.shape[0]
            if (
                cond.shape[-1] != k
                or cond.ndim > 2
                or (cond.ndim == 2 and cond.shape[0] not in (1, x.shape[0]))
            ):
                raise ValueError(
                    f"cond of a GaussianMixture must be ({k},) or (B, {k}) logits, got {tuple(cond.shape)}"
                )
            logits = logits + cond.to(x)
        return torch.softmax(logits, dim=-1), alpha, var, mu, flat

    def score(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """∇_x log p_t(x), shape of x.

        (docs/maths.md §4.1)
        """
        w, alpha, var, mu, flat = self._posterior(x, t, cond)
        centred = alpha[:, None, None] * mu[None] - flat[:, None]  # α_t μ_k − x, (B, K, D)
        return (torch.einsum("bk,bkd->bd", w, centred) / var[:, None]).reshape(x.shape)

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ε*(x, t) = −σ_t ∇ log p_t(x).

        (docs/maths.md §4.2)
        """
        sigma = per_sample(self.schedule.sigma(time_column(t, x)), x)
        return -sigma * self.score(x, t, cond)

    def x0(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """The posterior mean E[x_0 | x_t = x] = Σ_k w_k (μ_k + (α_t s²/v_t)(x − α_t μ_k)):
        Tweedie's formula (x − σ_t ε*)/α_t written without the division by α_t, so it is
        finite where α_t = 0 (there it is the mixture's mean).

        (docs/maths.md §4.2)
        """
        w, alpha, var, mu, flat = self._posterior(x, t, cond)
        gain = (alpha * self.std**2 / var)[:, None]  # α_t s²/v_t, (B, 1)
        mean = w @ mu  # Σ_k w_k μ_k, (B, D)
        return (mean + gain * (flat - alpha[:, None] * mean)).reshape(x.shape)

    def velocity(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """v*(x, t) = ε* − E[x_0 | x_t = x], finite for t ∈ [0, 1] under any schedule.

        (docs/maths.md §4.2)
        """
        return self.eps(x, t, cond) - self.x0(x, t, cond)

    @torch.no_grad()
    @staticmethod
    def digits(*args, **kwargs) -> GaussianMixture:
        """Moved to :func:`sagkit.digits.digits_mixture` (a bridge until 0.4, which warns)."""
        return call_moved("sagkit.GaussianMixture.digits", *args, **kwargs)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples from p_0, shape (n, *event_shape)."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.event_shape), generator=generator, dtype=self.means.dtype)
        return self.means[comp] + self.std * noise


class DiffusersModel(nn.Module):
    """A diffusers UNet as a model of the protocol.

    The network is called with the continuous float timestep ``t·N − 1`` (docs/maths.md §1.3: a
    discrete-time network sees its integer grid at the times t_n = (n + 1)/N), always as
    a float tensor, so that ``UNet2DModel`` does not truncate it.

    Args:
        unet: a ``UNet2DModel`` (``cond`` goes in as ``class_labels``: with
            ``class_embed_type="identity"`` that is a continuous (B, E) embedding, so
            gradients with respect to it exist) or a ``UNet2DConditionModel`` (``cond`` is
            ``encoder_hidden_states``, (B, L, D)).
        schedule_or_scheduler: a :class:`VPSchedule` or a diffusers scheduler.
        prediction_type: "epsilon", "v_prediction" or "sample"; by default the scheduler's.

    Half-precision weights (float16, bfloat16) run the network in half precision while sagkit
    works in float32: x and ``cond`` are float32, cast to the weights' dtype at the network
    call, and ε is cast back to float32. So the states of a solve, the adjoint and every
    accumulated gradient stay float32; only the network's own forward and vector–Jacobian
    products are in half precision. Those accumulations are sums over steps: in half precision
    (unit roundoff 2⁻¹¹ for float16, 2⁻⁸ for bfloat16) their rounding grows with the step
    count, and x − σ_t ε cancels digits at small t (docs/maths.md §11.6).
    ``scheduler`` keeps the diffusers scheduler when one is given (presets build their sampler
    from it).
    """

    sample_ndim = 4
    """The rank of x: 4 for images (B, C, H, W); a video model's is 5, (B, C, F, H, W)."""

    def __init__(self, unet: nn.Module, schedule_or_scheduler, prediction_type: str | None = None):
        super().__init__()
        self.unet = unet
        if isinstance(schedule_or_scheduler, VPSchedule):
            self.schedule = schedule_or_scheduler
            self.scheduler = None
        else:
            self.scheduler = schedule_or_scheduler
            self.schedule = VPSchedule.from_diffusers(schedule_or_scheduler)
            prediction_type = prediction_type or schedule_or_scheduler.config.get("prediction_type")
        self.prediction_type = prediction_type or "epsilon"
        self.prediction = diffusers_prediction(self.prediction_type)
        if self.schedule.num_train_timesteps is None:
            raise ValueError(
                "DiffusersModel needs a discrete schedule: pass the diffusers scheduler"
            )
        self._conditional = "encoder_hidden_states" in inspect.signature(unet.forward).parameters

    def _check(self, x: torch.Tensor, cond):
        """Check x and cond against the network; returns cond, the ``null_cond`` when omitted."""
        channels = self.unet.config.in_channels
        if x.ndim != self.sample_ndim or x.shape[1] != channels:
            dims = "H, W" if self.sample_ndim == 4 else "F, H, W"
            raise ValueError(
                f"x must have shape (B, {channels}, {dims}) for this UNet, got {tuple(x.shape)}"
            )
        weight = self._working_reference()
        if weight is not None and x.dtype != weight.dtype != self.unet.dtype:
            raise TypeError(
                f"x is {x.dtype}; this model's weights are {self.unet.dtype} and it takes x in "
                f"{weight.dtype} (half-precision weights keep latents, ε and gradients in "
                "float32: docs/maths.md §11.6): pass x.float()"
            )
        if weight is not None:
            check_matches(x, weight, "x")
        null = null_cond_of(self)
        if cond is None and null is not None:
            return null.expand(x.shape[0], *null.shape[1:])
        integer_labels = getattr(self.unet.config, "num_class_embeds", None) is not None
        if cond is not None and not (integer_labels and not cond.is_floating_point()):
            check_cond(cond, "cond", batch=x.shape[0])
            if null is not None and cond.shape[1:] != null.shape[1:]:
                raise ValueError(
                    f"cond must have shape (B, {', '.join(map(str, null.shape[1:]))}) for this "
                    f"model (see cond_for), got {tuple(cond.shape)}"
                )
            if weight is not None:
                check_matches(cond, weight, "cond")
        return cond

    def _working_reference(self) -> torch.Tensor | None:
        """A tensor in the dtype and device x must have: the weights', float32 for half ones."""
        weight = next(self.unet.parameters(), None)
        if weight is None:
            return None
        return weight.new_empty((), dtype=working_dtype(weight.dtype))

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ε(x, t) from the network's output, shape and dtype of x (the network runs in its
        weights' dtype; see the class docstring).

        (docs/maths.md §1.3)
        """
        cond = self._check(x, cond)
        tt = time_column(t, x)
        timestep = (tt * self.schedule.num_train_timesteps - 1).to(x.dtype)
        net_dtype = self.unet.dtype
        if cond is not None and cond.is_floating_point():
            cond = cond.to(net_dtype)
        if self._conditional:
            if cond is None:
                raise ValueError("this UNet2DConditionModel needs cond (encoder_hidden_states)")
            out = self.unet(x.to(net_dtype), timestep, encoder_hidden_states=cond).sample
        else:
            out = self.unet(x.to(net_dtype), timestep, class_labels=cond).sample
        out = out[:, : x.shape[1]].to(x.dtype)  # drop a learned-variance half, if any
        return self.prediction.eps(self.schedule, x, tt, out)


class DiffusersPrediction:
    """What a diffusers network outputs, by its ``prediction_type`` (parsed once, by
    :func:`diffusers_prediction`): ε from the output at (x_t, t) (:meth:`eps`, for
    :class:`DiffusersModel`), and the output from ε (:meth:`output`, for a diffusers
    scheduler's ``step``). ``prediction_type`` is the diffusers name.

    (docs/maths.md §1.3)
    """

    prediction_type: str

    def eps(self, schedule: Schedule, x: torch.Tensor, tt: torch.Tensor, out: torch.Tensor):
        """ε from the network's output ``out`` at x (B, ...) and the times tt (B,)."""
        raise NotImplementedError

    def output(self, schedule: Schedule, x: torch.Tensor, t: float, eps: torch.Tensor):
        """The network's output at (x, t) whose ε is ``eps``, shape of x."""
        raise NotImplementedError


def _alpha_sigma(schedule: Schedule, tt: torch.Tensor, x: torch.Tensor):
    """α_t and σ_t at the times tt (B,), shaped (B, 1, ..., 1) against x."""
    return (per_sample(f(tt), x) for f in (schedule.alpha, schedule.sigma))


class EpsilonPrediction(DiffusersPrediction):
    """The network predicts ε ("epsilon")."""

    prediction_type = "epsilon"

    def eps(self, schedule, x, tt, out):
        return out

    def output(self, schedule, x, t, eps):
        return eps


class VPrediction(DiffusersPrediction):
    """The network predicts v = α ε − σ x_0 ("v_prediction": diffusers' v, not the velocity
    ε − x̂0 of :class:`~sagkit.core.frames.VelocityFrame`)."""

    prediction_type = "v_prediction"

    def eps(self, schedule, x, tt, out):
        """v = α ε − σ x_0  ⇒  ε = σ x_t + α v."""
        alpha, sigma = _alpha_sigma(schedule, tt, x)
        return sigma * x + alpha * out

    def output(self, schedule, x, t, eps):
        """v = α ε − σ x̂0."""
        x0 = ode_frame(schedule).x0(schedule, x, t, eps)
        return schedule.alpha(t) * eps - schedule.sigma(t) * x0


class SamplePrediction(DiffusersPrediction):
    """The network predicts x_0 ("sample")."""

    prediction_type = "sample"

    def eps(self, schedule, x, tt, out):
        """ε = (x_t − α x_0)/σ."""
        alpha, sigma = _alpha_sigma(schedule, tt, x)
        return (x - alpha * out) / sigma

    def output(self, schedule, x, t, eps):
        """x̂0 = (x_t − σ ε)/α."""
        return ode_frame(schedule).x0(schedule, x, t, eps)


DIFFUSERS_PREDICTIONS: dict[str, type[DiffusersPrediction]] = {
    cls.prediction_type: cls for cls in (EpsilonPrediction, VPrediction, SamplePrediction)
}
"""The class of each diffusers ``prediction_type``."""


def diffusers_prediction(prediction_type: str) -> DiffusersPrediction:
    """The :class:`DiffusersPrediction` of a diffusers ``prediction_type`` ("epsilon",
    "v_prediction" or "sample"): the one place the name is read."""
    cls = DIFFUSERS_PREDICTIONS.get(prediction_type) if isinstance(prediction_type, str) else None
    if cls is None:
        raise ValueError(
            f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
        )
    return cls()


class ClassifierFreeGuidance(nn.Module):
    """ε_u + w (ε_c − ε_u) (Ho & Salimans 2022) as a model of the protocol.

    Args:
        model: a conditional model.
        null_cond: the unconditional conditioning (one entry, broadcast over the batch).
        scale: w; w = 1 is the conditional model, w = 0 the unconditional one.
    Both branches go through the network in one batched call.

    (docs/maths.md §8.4)
    """

    def __init__(self, model, null_cond: torch.Tensor, scale: float):
        super().__init__()
        self.model = model
        self.schedule = model.schedule
        if null_cond is None:
            raise ValueError("ClassifierFreeGuidance needs null_cond (the unconditional embedding)")
        self.null_cond = check_cond(null_cond, "null_cond")
        self.scale = check_scale(scale, "scale")

    def predict_and_difference(
        self, x: torch.Tensor, t, cond, *, frame: Frame | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(F̃, Δ): the guided F̃ = F_u + w Δ and the difference Δ = F_c − F_u of the
        prediction F of ``frame`` (:meth:`~sagkit.core.frames.Frame.predict`: ε by default, or the
        velocity of :class:`~sagkit.core.frames.VelocityFrame`; both are affine in ε at fixed
        x, so CFG on either is the same sampler), from one network call on the batch [x; x]
        with conditions [cond; null] (the one place that order is defined), each of x's
        shape."""
        if cond is None:
            raise ValueError("ClassifierFreeGuidance needs cond")
        null = self.null_cond.to(cond).expand_as(cond)
        tt = time_column(t, x)
        xx, tt, cc = torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null])
        out = (EpsFrame() if frame is None else frame).predict(self.model, xx, tt, cc)
        out_cond, out_uncond = out.chunk(2)
        difference = out_cond - out_uncond
        return out_uncond + self.scale * difference, difference

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ε̃ = ε_u + w (ε_c − ε_u) (:meth:`predict_and_difference`)."""
        return self.predict_and_difference(x, t, cond)[0]

    def velocity(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ṽ = v_u + w (v_c − v_u) (:meth:`predict_and_difference`)."""
        return self.predict_and_difference(x, t, cond, frame=VelocityFrame())[0]
