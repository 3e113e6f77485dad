"""First-order exponential-integrator steps in four frames; the SDE sampler and its noise.

Every first-order exponential-integrator step of a diffusion ODE or SDE (DDIM / DPM-Solver-1,
DPM-Solver++-1, SDE-DPM-Solver-1, SDE-DPM-Solver++-1; Lu et al. 2022, 2023) is a plain
Euler(–Maruyama) step in rescaled coordinates Y = x/κ_t on a time variable ν_t:

    Y_t = Y_s + c (ν_t − ν_s) F(x_s, s) + sqrt(q(s, t)) ξ,        ξ ~ N(0, I),

with (κ, ν, F, c, q) given by a :class:`~sagkit.core.frames.Frame` (docs/maths.md §7). For "eps-sde" this is, in x,

    x_t = (α_t/α_s) x_s − 2σ_t (e^{h} − 1) ε(x_s, s) + σ_t sqrt(e^{2h} − 1) ξ,   h = λ_t − λ_s > 0,

the first-order SDE-DPM-Solver step used by AdjointDEIS (Blasingame & Liu 2024, "AdjointDEIS:
Efficient Gradients for Diffusion Models"); "data-sde" is SDE-DPM-Solver++-1, which is
DDPM's ancestral step. The adjoint equations of :mod:`sagkit.gradients.adjointdeis` are integrated
in the same frames.

Noise recovery (the idea of CycleDiffusion, Wu & De la Torre 2023): given consecutive states
x_s, x_t of a trajectory, the step equation solved for ξ gives the noise that makes the
sampler reproduce that trajectory exactly, so a real image can be encoded (:func:`encode`)
and re-sampled (:func:`sde_sample` with ``noise=``).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .checks import check_grid, check_inputs, show_progress
from .frames import DataFrame, Frame, get_frame

__all__ = ["sde_step", "sde_sample", "recover_noise", "encode"]


def sde_step(
    model, frame: Frame, x_s: torch.Tensor, s: float, t: float, xi: torch.Tensor, *, cond=None
) -> torch.Tensor:
    """One first-order SDE step from s to t < s: x_t = κ_t [x_s/κ_s + c(ν_t − ν_s) F(x_s, s) + sqrt(q) ξ].

    x_s, xi: (B, ...). Returns x_t, (B, ...). For "eps-sde" this is (docs/maths.md §7.1)
    x_t = (α_t/α_s) x_s − 2σ_t(e^h − 1) ε(x_s) + σ_t sqrt(e^{2h} − 1) ξ.
    """
    sc = model.schedule
    y = x_s / frame.kappa(sc, s) + (frame.c * (frame.nu(sc, t) - frame.nu(sc, s))) * frame.predict(
        model, x_s, s, cond
    )
    y = y + math.sqrt(frame.noise_var(sc, s, t)) * xi
    return frame.kappa(sc, t) * y


def _sde_frame(parameterisation: str | Frame, ts: torch.Tensor, schedule) -> Frame:
    frame = get_frame(parameterisation, sde=True)
    frame.check_times(ts, schedule)
    return frame


def _check_noise(noise, x: torch.Tensor, steps: int) -> torch.Tensor:
    noise = torch.as_tensor(noise)
    if noise.shape != (steps, *x.shape):
        raise ValueError(
            f"noise must have shape (steps, *x.shape) = {(steps, *x.shape)}, got {tuple(noise.shape)}"
        )
    return noise.to(x)


def sde_sample(
    model,
    x: torch.Tensor,
    ts,
    *,
    cond=None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    parameterisation: str | Frame = "eps",
    callback=None,
    progress: bool | None = None,
):
    """Sample the reverse SDE with the first-order SDE-DPM-Solver on the grid ``ts``.

    Args:
        model: a model of the protocol.
        x: (B, ...) the state at ``ts[0]``.
        ts: strictly decreasing grid; M = len(ts) − 1 steps. "data" needs ts[-1] > 0.
        cond: conditioning passed to the model.
        noise: (M, B, ...) the noise ξ of every step; drawn from ``generator`` when omitted.
        parameterisation: "eps" (SDE-DPM-Solver-1, the AdjointDEIS sampler) or "data"
            (SDE-DPM-Solver++-1, DDPM's ancestral step), or a frame of that class
            (:func:`~sagkit.core.frames.get_frame`).
        callback: called as ``callback(i, t_i, x_i)`` at every grid point, i = 0..M.
        progress: show a progress bar; ``None``: from 1000 steps on.
    Returns:
        ``(x_end, noise)``: the state at ``ts[-1]`` (B, ...) and the noise used (M, B, ...),
        which :func:`sagkit.adjointdeis_grad` needs for the SDE adjoint.

    No graph is built unless x, cond or the model's parameters require grad (then autograd
    runs through every step: "backprop through the SDE sampler").

    (docs/maths.md §7.1)
    """
    check_inputs(model, x, cond=cond)
    ts = check_grid(ts)
    frame = _sde_frame(parameterisation, ts, model.schedule)
    steps = len(ts) - 1
    progress = show_progress(progress, steps)
    if noise is None:
        noise = torch.randn((steps, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    noise = _check_noise(noise, x, steps)
    if callback is not None:
        callback(0, float(ts[0]), x)
    for k in tqdm(range(steps), desc="sde sample", disable=not progress, leave=False):
        x = sde_step(model, frame, x, float(ts[k]), float(ts[k + 1]), noise[k], cond=cond)
        if callback is not None:
            callback(k + 1, float(ts[k + 1]), x)
    return x, noise


@torch.no_grad()
def recover_noise(
    model, states, ts, *, cond=None, parameterisation: str | Frame = "eps"
) -> torch.Tensor:
    """The noise that makes :func:`sde_sample` pass through the given states exactly.

    The step equation solved for ξ: ξ_k = [Y_{k+1} − Y_k − c(ν_{k+1} − ν_k) F(x_k, t_k)] / sqrt(q),
    Y = x/κ in the frame of ``parameterisation`` (see the module docstring).

    Args:
        states: (M + 1, B, ...) a trajectory x_0..x_M on the grid ``ts`` (x_0 at ``ts[0]``).
    Returns:
        (M, B, ...) noise; ``sde_sample(model, states[0], ts, cond=cond, noise=...)`` ends at
        ``states[-1]`` up to rounding.

    (docs/maths.md §7.2)
    """
    ts = check_grid(ts)
    frame = _sde_frame(parameterisation, ts, model.schedule)
    states = torch.as_tensor(states)
    if states.shape[0] != len(ts):
        raise ValueError(f"states must hold len(ts) = {len(ts)} states, got {states.shape[0]}")
    sc = model.schedule
    out = []
    for k in range(len(ts) - 1):
        s, t = float(ts[k]), float(ts[k + 1])
        mean = sde_step(model, frame, states[k], s, t, torch.zeros_like(states[k]), cond=cond)
        out.append(
            (states[k + 1] - mean) / (frame.kappa(sc, t) * math.sqrt(frame.noise_var(sc, s, t)))
        )
    return torch.stack(out)


@torch.no_grad()
def encode(
    model,
    x0: torch.Tensor,
    ts,
    *,
    cond=None,
    generator: torch.Generator | None = None,
    parameterisation: str | Frame = "eps",
):
    """Encode a real image for the SDE sampler: a trajectory that ends on it, and its noise.

    The trajectory is drawn from the diffusion itself: x at ``ts[0]`` from q(x_T | x0), each
    following state from the posterior q(x_t | x_s, x0) (DDPM's; the "data-sde" step with
    x̂0 = x0), and the last state is x0 itself. Its noise comes from :func:`recover_noise`
    (CycleDiffusion, Wu & De la Torre 2023).

    Args:
        x0: (B, ...) images.
        ts: the sampler's grid.
    Returns:
        ``(x_T, noise)``: ``sde_sample(model, x_T, ts, cond=cond, noise=noise)[0]`` equals x0 up to
        rounding.

    (docs/maths.md §7.3)
    """
    check_inputs(model, x0, cond=cond, x_name="x0")
    ts = check_grid(ts)
    sc = model.schedule
    post = get_frame(DataFrame, sde=True)
    draw = lambda: torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # noqa: E731
    t0 = float(ts[0])
    states = [sc.alpha(float(t0)) * x0 + sc.sigma(float(t0)) * draw()]
    for k in range(len(ts) - 2):
        s, t = float(ts[k]), float(ts[k + 1])
        y = states[-1] / post.kappa(sc, s) + (post.nu(sc, t) - post.nu(sc, s)) * x0
        states.append(post.kappa(sc, t) * (y + math.sqrt(post.noise_var(sc, s, t)) * draw()))
    states.append(x0)
    return states[0], recover_noise(
        model, torch.stack(states), ts, cond=cond, parameterisation=parameterisation
    )
