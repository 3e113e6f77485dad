"""From the discrete adjoint of a sampler to the continuous adjoint, and what a coarse grid does
to the adjoint's size.

The discrete adjoint λ_k = ∂L/∂x^{(k)} of an n-step solve (notebook 02, docs/maths.md §5.3) is
a sequence on the grid; as the steps shrink it approaches the solution a_x(t) of the adjoint
equation (§6.1), at the solver's order (docs/maths.md §6.9):

    d(n) = max_k ‖λ_k^{(n)} − a_x(t_k)‖ / max_k ‖a_x(t_k)‖  = O(n^{−p}).

:func:`adjoint_limit` measures d(n) against the discrete adjoint of RK4 on a fine grid, and
:func:`plot_adjoint_limit` draws the picture notebook 05 opens with. :func:`step_factors` and
:func:`segment_ratios` explain, on one Gaussian and on a trained model, why the AdjointDEIS
gradients of a coarse grid can be a fraction of the reference's size while pointing the same
way (docs/maths.md §6.10).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_grid, check_inputs
from ..core.schedules import time_grid
from ..core.solvers import SOLVERS, ProbabilityFlow, rk_step
from ..gradients.adjointdeis import adjointdeis_grad
from ..gradients.api import evaluate_loss, loss_grad
from .convergence import fit_slope

__all__ = [
    "discrete_adjoint",
    "adjoint_limit",
    "plot_adjoint_limit",
    "step_factors",
    "segment_ratios",
]


def _discrete_adjoint(model, loss_fn, x, ts, *, cond, solver):
    """:func:`discrete_adjoint` on checked inputs: in the ODE's y = x/κ (x/α for VP schedules),
    μ_k = ∂L/∂y_k, λ_k = μ_k/κ_k."""
    f, tableau = ProbabilityFlow(model, cond), SOLVERS[solver]
    nus = [f.nu(t) for t in ts.tolist()]
    ys = [f.to_y(x.detach(), ts[0])]
    with torch.no_grad():
        for k in range(len(ts) - 1):
            ys.append(rk_step(f, ys[k], nus[k], nus[k + 1] - nus[k], tableau, float(ts[k])))
    with torch.enable_grad():
        leaf = f.to_x(ys[-1], ts[-1]).requires_grad_(True)
        (lam,) = torch.autograd.grad(evaluate_loss(loss_fn, leaf), leaf)
    mu = f.to_x(lam, ts[-1])  # ∂L/∂y_n = κ_n ∂L/∂x_n
    adjoints = [lam]
    for k in range(len(ts) - 2, -1, -1):
        with torch.enable_grad():
            leaf = ys[k].clone().requires_grad_(True)
            step = rk_step(f, leaf, nus[k], nus[k + 1] - nus[k], tableau, float(ts[k]))
            (mu,) = torch.autograd.grad(step, leaf, grad_outputs=mu)
        adjoints.append(f.to_y(mu, ts[k]))
    states = torch.stack([f.to_x(y, t) for y, t in zip(ys, ts.tolist(), strict=True)])
    return states, torch.stack(adjoints[::-1])


def discrete_adjoint(model, loss_fn, x: torch.Tensor, ts, *, cond=None, solver: str = "ddim"):
    """The states x^{(k)} of an n-step solve and its discrete adjoint λ_k = ∂L/∂x^{(k)}.

    The forward keeps the states only; the backward re-runs one step at a time under autograd
    and takes its vector–Jacobian product, λ_k = J_kᵀ λ_{k+1} from λ_n = ∇L(x^{(n)}): the
    symplectic adjoint of docs/maths.md §5.3, so λ_0 is the gradient of the solve (equal to
    backprop up to rounding).

    Args:
        model: a model of the protocol.
        loss_fn: maps the sample (B, ...) to a scalar or (B,) values (summed).
        x: (B, ...) the state at ``ts[0]``.
        ts: a strictly decreasing grid (n + 1 times).
        cond: conditioning passed to the model (not differentiated).
        solver: a name in :data:`sagkit.core.solvers.SOLVERS`.
    Returns:
        ``(states, adjoints)``, both (n + 1, B, ...) in x's dtype, index k at time ``ts[k]``.

    (docs/maths.md §6.9)
    """
    check_inputs(model, x, cond=cond)
    ts = check_grid(ts)
    SOLVERS[solver]
    return _discrete_adjoint(model, loss_fn, x, ts, cond=cond, solver=solver)


def _distance(path: torch.Tensor, reference: torch.Tensor) -> float:
    """max_k ‖path_k − reference_k‖ / max_k ‖reference_k‖ over the grid points, (K, ...) each."""
    diff = (path - reference).flatten(1).norm(dim=1).max()
    return float(diff / reference.flatten(1).norm(dim=1).max())


def _check_nested(reference_steps, ns, *, fit_last) -> tuple[int, list[int]]:
    """Refuse counts below their minimum and an n that does not divide ``reference_steps``;
    return both as ints."""
    big = check_count(reference_steps, "reference_steps", low=2)
    ns = [check_count(n, "ns") for n in ns]
    if not ns or any(big % n for n in ns):
        raise ValueError(
            f"each of ns must divide reference_steps={big} (nested grids), got {list(ns)}"
        )
    check_count(fit_last, "fit_last", low=2)
    return big, ns


def _rk4_reference(model, loss_fn, x, fine, *, cond, bar) -> tuple[torch.Tensor, float]:
    """The continuous adjoint a_x on the grid ``fine``: RK4's discrete adjoint there, and its
    error, the distance to RK4's on every other point; the ``bar`` advances after each."""
    _, ref = _discrete_adjoint(model, loss_fn, x, fine, cond=cond, solver="rk4")
    bar.update()
    _, half = _discrete_adjoint(model, loss_fn, x, fine[::2], cond=cond, solver="rk4")
    bar.update()
    return ref, _distance(half, ref[::2])


def _path(schedule, ts, adjoints: torch.Tensor) -> dict:
    """An adjoint (K, B, ...) on the grid ``ts`` as it is plotted: ``times`` t_k,
    ``half_log_snr`` log(α/σ) at t_k, ``norms`` ‖λ_k‖ over the batch (float64)."""
    norms = adjoints.flatten(1).norm(dim=1).double()
    return {"times": ts, "half_log_snr": schedule.lam(ts), "norms": norms}


def _coarse_adjoints(model, loss_fn, x, fine, ref, ns, *, cond, solver, bar) -> dict:
    """The discrete adjoint of ``solver`` on each grid ``fine[::N // n]`` (N steps in ``fine``)
    against ``ref`` on the same times: :func:`adjoint_limit`'s ``ns``, ``times``,
    ``half_log_snr``, ``norms`` and ``distance``; the ``bar`` advances after each n."""
    big = len(fine) - 1
    out = {"ns": ns, "times": {}, "half_log_snr": {}, "norms": {}, "distance": {}}
    for n in ns:
        ts = fine[:: big // n]
        _, lams = _discrete_adjoint(model, loss_fn, x, ts, cond=cond, solver=solver)
        for key, value in _path(model.schedule, ts, lams).items():
            out[key][n] = value
        out["distance"][n] = _distance(lams, ref[:: big // n])
        bar.update()
    return out


def adjoint_limit(
    model,
    loss_fn,
    x: torch.Tensor,
    *,
    t_start: float,
    t_end: float,
    ns=(2, 4, 8, 16, 32),
    spacing: str = "lambda",
    solver: str = "ddim",
    reference_steps: int = 256,
    fit_last: int = 3,
    cond=None,
    progress: bool = False,
) -> dict:
    """The discrete adjoint of an n-step ``solver`` for each n in ``ns``, against the continuous
    adjoint a_x(t) on the same times.

    The continuous adjoint is the discrete adjoint of RK4 on ``reference_steps`` steps (a
    fourth-order solution of the adjoint equation); its own error is estimated against RK4 on
    half as many steps. Every grid is a subset of the reference grid (``ts[::N // n]``), so each
    λ_k is compared with a_x at the same time: d(n) = max_k ‖λ_k − a_x(t_k)‖ / max_k ‖a_x(t_k)‖.

    Args:
        t_start, t_end: the grid's ends (``t_end`` > 0 for ``spacing="lambda"``).
        ns: step counts, each dividing ``reference_steps``.
        spacing: "lambda" or "time", as :func:`sagkit.time_grid`.
        fit_last: the order is fitted to the last ``fit_last`` n.
    Returns:
        A dict: ``ns``; ``times`` {n: (n + 1,) t_k}; ``half_log_snr`` {n: (n + 1,) log(α/σ) at t_k};
        ``norms`` {n: (n + 1,) ‖λ_k‖ over the batch}; ``distance`` {n: d(n)}; ``order``: the
        fitted −d log d / d log n; ``reference``: ``times``, ``half_log_snr``, ``norms`` of a_x on the
        fine grid, ``steps`` and ``error`` (its distance to the half-steps RK4 adjoint).

    (docs/maths.md §6.9)
    """
    check_inputs(model, x, cond=cond)
    SOLVERS[solver]
    big, ns = _check_nested(reference_steps, ns, fit_last=fit_last)
    fine = time_grid(model.schedule, t_start, t_end, big, spacing=spacing)
    bar = tqdm(total=len(ns) + 2, desc="adjoint limit", disable=not progress, leave=False)
    ref, ref_error = _rk4_reference(model, loss_fn, x, fine, cond=cond, bar=bar)
    out = _coarse_adjoints(model, loss_fn, x, fine, ref, ns, cond=cond, solver=solver, bar=bar)
    bar.close()
    last = ns[-min(fit_last, len(ns)) :]
    out["order"] = fit_slope(last, [out["distance"][n] for n in last], last=len(last))
    out["reference"] = {**_path(model.schedule, fine, ref), "steps": big, "error": ref_error}
    return out


def plot_adjoint_limit(result: dict, *, title: str | None = None):
    """Two panels from :func:`adjoint_limit`: ‖λ_k‖ along the grid for each n with the
    continuous ‖a_x(t)‖ as a black line (left, against log(α_t/σ_t), the noise on the left), and d(n)
    against n on log–log axes with the fitted order (right). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    ref = result["reference"]
    left.plot(
        ref["half_log_snr"], ref["norms"], "k-", lw=2, label="continuous adjoint a_x(t)", zorder=5
    )
    for n in result["ns"]:
        left.plot(
            result["half_log_snr"][n], result["norms"][n], "o--", ms=4, lw=1, label=f"n = {n}"
        )
    left.set(
        xlabel="log(α_t/σ_t), the half log-SNR   (noise on the left, clean end on the right)",
        ylabel="‖λ_k‖, ‖a_x(t)‖",
        title="the adjoint, carried from the clean end back to the noise",
    )
    left.legend(fontsize=8)
    ns = result["ns"]
    d = [result["distance"][n] for n in ns]
    right.loglog(ns, d, "o-", label=f"distance (order {result['order']:.2f})")
    guide = [d[-1] * ns[-1] / n for n in ns]
    right.loglog(ns, guide, ":", color="0.6", label="guide: ∝ 1/n")
    right.set(
        xlabel="n (steps)",
        ylabel="max_k ‖λ_k − a_x(t_k)‖ / max ‖a_x‖",
        title=f"distance to the continuous adjoint (reference error {ref['error']:.0e})",
    )
    right.set_xticks(ns, [str(n) for n in ns])
    right.xaxis.set_minor_locator(plt.NullLocator())
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def step_factors(schedule, ts, *, variance: float = 1.0) -> dict[str, torch.Tensor]:
    """How much each method multiplies the adjoint a_x in each step, for one Gaussian.

    For data N(μ, s² I) the flow is linear, ∂ε/∂x = (1 − q_t)/σ_t and ∂x̂0/∂x = q_t/α_t with
    q_t = α_t² s²/(α_t² s² + σ_t²), so every method carries a_x back by one number per step.
    For step k from the noisier s = ts[k] to the cleaner t = ts[k + 1], h = λ_s − λ_t < 0
    (docs/maths.md §6.10):

        exact                   sqrt(v_t / v_s),   v = α² s² + σ²   (α_t/α_s when s² = ∞)
        ddim (backprop)         α_t/α_s + (σ_t − α_t σ_s/α_s)(1 − q_s)/σ_s
        adjointdeis-1 (eps)     α_t/α_s + σ_s (e^h − 1)(α_t²/α_s²)(1 − q_t)/σ_t
        adjointdeis-1 (data)    (σ_t/σ_s)(1 + (1 − e^h) q_t)
        linear part (eps)       α_t/α_s        (what the ε frame integrates exactly)
        linear part (data)      σ_t/σ_s        (what the data frame integrates exactly)

    Args:
        schedule: a :class:`sagkit.VPSchedule`.
        ts: a strictly decreasing grid with ts[-1] > 0.
        variance: s² in [0, ∞]; ``math.inf`` is the limit of data that varies much more than
            the noise (x̂0 = x/α).
    Returns:
        A dict of (n,) float64 tensors, one factor per step, keyed as above.
    """
    ts = check_grid(ts)
    if not float(ts[-1]) > 0:
        raise ValueError("step_factors needs ts[-1] > 0 (σ = 0 at t = 0)")
    if isinstance(variance, bool) or not isinstance(variance, int | float) or not variance >= 0:
        raise ValueError(f"variance must be a number in [0, inf], got {variance!r}")
    a, s = schedule.alpha(ts), schedule.sigma(ts)
    if math.isinf(variance):
        q = torch.ones_like(a)
        exact = a[1:] / a[:-1]
    else:
        v = a**2 * variance + s**2
        q = a**2 * variance / v
        exact = (v[1:] / v[:-1]).sqrt()
    a_s, a_t, s_s, s_t, q_s, q_t = a[:-1], a[1:], s[:-1], s[1:], q[:-1], q[1:]
    e_h = (a_s * s_t) / (s_s * a_t)  # e^{λ_s − λ_t}
    return {
        "exact": exact,
        "ddim (backprop)": a_t / a_s + (s_t - a_t * s_s / a_s) * (1 - q_s) / s_s,
        "adjointdeis-1 (eps)": a_t / a_s + s_s * (e_h - 1) * (a_t / a_s) ** 2 * (1 - q_t) / s_t,
        "adjointdeis-1 (data)": (s_t / s_s) * (1 + (1 - e_h) * q_t),
        "linear part (eps)": a_t / a_s,
        "linear part (data)": s_t / s_s,
    }


def _deviation(model, x, t: float, v, *, cond) -> float:
    """‖vᵀ ∂ε/∂x(x, t) − σ_t v‖ / (σ_t ‖v‖): the ε-Jacobian against unit-variance data's σ_t I."""
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        (vjp,) = torch.autograd.grad(model.eps(leaf, t, cond), leaf, grad_outputs=v)
    sigma = model.schedule.sigma(t)
    return float((vjp - sigma * v).norm() / (sigma * v.norm()))


def _check_segment(start, stop, *, steps: int) -> tuple[int, int]:
    """Refuse a segment that is empty or not within the ``steps`` steps of the grid."""
    start, stop = check_count(start, "start", low=0), check_count(stop, "stop")
    if not start < stop <= steps:
        raise ValueError(f"need 0 <= start < stop <= {steps} (steps of ts), got {start}, {stop}")
    return start, stop


def _measured_ratios(model, x0, target, seg, *, cond) -> dict:
    """λ_stop = ``target`` carried back from ``seg[-1]`` to x0 at ``seg[0]`` by backprop through
    DDIM and by each AdjointDEIS: ``ratio`` and ``cosine`` {method} against DDIM, and
    ``ddim_factor`` ‖g_ddim‖/‖λ_stop‖."""

    def linear(y):
        return (target * y).flatten(1).sum(1)

    g_ddim = loss_grad(model, linear, x0, seg, method="backprop", cond=cond)[1]
    out = {"ratio": {}, "cosine": {}, "ddim_factor": float(g_ddim.norm() / target.norm())}
    for order in (1, 2):
        for param in ("eps", "data"):
            g = adjointdeis_grad(
                model, linear, x0, seg, order=order, parameterisation=param, cond=cond
            )[1]
            label = f"adjointdeis-{'1' if order == 1 else '2M'} ({param})"
            out["ratio"][label] = float(g.norm() / g_ddim.norm())
            out["cosine"][label] = float((g * g_ddim).sum() / (g.norm() * g_ddim.norm()))
    return out


def _deviations(model, states, lams, ts, steps, *, cond) -> dict[str, torch.Tensor]:
    """The δ of :func:`_deviation` in each of ``steps``, with λ_{k+1}: at x^{(k+1)}, where
    AdjointDEIS evaluates the network ("adjoint"), and at x^{(k)}, where DDIM does ("ddim")."""
    dev = {
        "adjoint": [
            _deviation(model, states[k + 1], float(ts[k + 1]), lams[k + 1], cond=cond)
            for k in steps
        ],
        "ddim": [_deviation(model, states[k], float(ts[k]), lams[k + 1], cond=cond) for k in steps],
    }
    return {key: torch.tensor(v, dtype=torch.float64) for key, v in dev.items()}


def _predicted_ratios(schedule, seg, deviation: dict) -> tuple[dict, dict]:
    """The unit-variance prediction |Π F_k / Π J_k| of the two AdjointDEIS-1 ratios over the
    segment ``seg`` and its first-order tolerance Σ_k (w_k δ_k^{adjoint} + w'_k δ_k^{ddim})
    from the ``deviation`` of :func:`_deviations` (the weights of :func:`segment_ratios`)."""
    f = step_factors(schedule, seg, variance=1.0)
    r_eps, r_data, ddim = f["linear part (eps)"], f["linear part (data)"], f["ddim (backprop)"]
    q_t = schedule.alpha(seg[1:]) ** 2
    e_h = r_data / r_eps  # (σ_t/σ_s)/(α_t/α_s) = e^{λ_s − λ_t}
    F_eps, F_data = f["adjointdeis-1 (eps)"], f["adjointdeis-1 (data)"]
    weights = {
        "adjointdeis-1 (eps)": ((F_eps - r_eps) / F_eps).abs(),
        "adjointdeis-1 (data)": (r_data * (1 - e_h) * (1 - q_t) / F_data).abs(),
    }
    w_ddim = ((ddim - r_eps) / ddim).abs()
    predicted, tolerance = {}, {}
    for label, w in weights.items():
        predicted[label] = abs(float(f[label].prod() / ddim.prod()))
        tolerance[label] = float((w * deviation["adjoint"] + w_ddim * deviation["ddim"]).sum())
    return predicted, tolerance


def segment_ratios(
    model, loss_fn, x: torch.Tensor, ts, *, start: int, stop: int, cond=None
) -> dict:
    """The adjoint carried back over steps ``start``..``stop − 1`` of a DDIM solve by backprop
    and by AdjointDEIS (-1 and -2M, both frames), from the same adjoint at ``ts[stop]``, with
    the prediction for unit-variance data and its first-order tolerance.

    The solve of the whole grid gives the states x^{(k)} and the discrete adjoint λ_k
    (:func:`discrete_adjoint`); each method then differentiates ⟨λ_stop, Φ(x^{(start)})⟩ over
    ``ts[start:stop + 1]``, so its gradient is λ_stop carried back over the segment.

    Prediction (docs/maths.md §6.10): where the noised data is close to N(0, I), each step
    multiplies the adjoint by the :func:`step_factors` of variance 1, F_k for AdjointDEIS-1
    and J_k for DDIM, so ‖g‖/‖g_ddim‖ ≈ |Π F_k / Π J_k|. The network's ε-Jacobian differs from
    the unit-variance σ_t I by a measured relative δ along the adjoint (at the point and with
    the vector each method uses: AdjointDEIS at the cleaner x^{(k+1)}, DDIM at x^{(k)}, both
    with λ_{k+1}); a relative change δ of ∂ε/∂x moves a factor f by |∂ log f/∂ log ∂ε/∂x| · δ
    at most, so to first order

        |log(ratio / prediction)| ≤ Σ_k (w_k δ_k^{adjoint} + w'_k δ_k^{ddim}),
        w = |F − α_t/α_s|/F (eps),  w = (σ_t/σ_s)|1 − e^h|(1 − q_t)/F (data),
        w' = |J − α_t/α_s|/J,  q_t = α_t² (unit variance).

    Returns:
        A dict: ``ratio`` and ``cosine`` {method: ‖g‖/‖g_ddim‖, cos(g, g_ddim)} for
        "adjointdeis-1 (eps)", "adjointdeis-1 (data)", "adjointdeis-2M (eps)",
        "adjointdeis-2M (data)"; ``predicted`` and ``tolerance`` {method} for the two -1
        methods; ``ddim_factor``: ‖g_ddim‖/‖λ_stop‖; ``deviation``: {"adjoint": (m,),
        "ddim": (m,)} the δ of each of the m = stop − start steps.

    (docs/maths.md §6.10)
    """
    check_inputs(model, x, cond=cond)
    ts = check_grid(ts)
    start, stop = _check_segment(start, stop, steps=len(ts) - 1)
    states, lams = _discrete_adjoint(model, loss_fn, x, ts, cond=cond, solver="ddim")
    seg = ts[start : stop + 1]
    out = _measured_ratios(model, states[start], lams[stop], seg, cond=cond)
    out["deviation"] = _deviations(model, states, lams, ts, range(start, stop), cond=cond)
    out["predicted"], out["tolerance"] = _predicted_ratios(model.schedule, seg, out["deviation"])
    return out
