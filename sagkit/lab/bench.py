"""Benchmark of the gradient engines: accuracy, time, memory and network calls against n.

    from sagkit.lab.bench import bench_table, run_benchmark

    rows = run_benchmark(model="unet", dtype="float32", ns=(8, 16, 64))
    print(bench_table(rows))

For every n and every method in :data:`sagkit.METHODS`, on a loss of the solve's output
L(x) = ½ Σ_b ‖x_b − target_b‖²:

- ``rel_err_exact``: ‖g − g*‖ / ‖g*‖, g* the exact gradient of the discrete solve (backprop
  through a float64 copy of the model);
- ``dir_err_fd``: |⟨g, v⟩ − D| / |D|, D the float64 central difference along one random
  direction v (:func:`sagkit.finite_difference`, with Richardson extrapolation): the error of
  the directional derivative, an independent check of the reference g*. It sees only the
  component of g − g* along v, so it is not the vector error: compare methods by
  ``rel_err_exact``;
- ``time_s``: best of ``repeats`` rounds without hooks, the methods taking turns within a round,
  and ``time_rel``: over backprop's, measured in the same rounds;
- ``saved_bytes``, ``cuda_peak_bytes``, ``model_calls``: from :func:`sagkit.profile_gradient`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count
from ..core.device import resolve_device
from ..core.models import DiffusersModel
from ..core.schedules import time_grid
from ..digits.data import digits_mixture
from ..gradients import METHODS, finite_difference, loss_grad
from .profiling import profile_gradient

__all__ = ["build_model", "run_benchmark", "gradient_accuracy", "bench_table", "pivot_table"]

MODELS = ("mixture", "unet")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(name: str = "unet", *, seed: int = 0):
    """A benchmark model (float64, CPU) and the shape of one sample.

    - "mixture": the exact digits mixture (64 components, 8×8, linear schedule);
    - "unet": a random diffusers ``UNet2DModel`` (8×8, channels (32, 64), ~650k parameters)
      with a 1000-step DDIM schedule; random weights are enough to measure gradients.
    """
    if name == "mixture":
        return digits_mixture(n_components=64), (1, 8, 8)
    if name == "unet":
        from diffusers import DDIMScheduler, UNet2DModel

        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )
        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        return DiffusersModel(unet.double().eval(), scheduler), (1, 8, 8)
    raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}")


def _interleaved_times(model, loss_fn, x, ts, *, solver, methods, repeats: int, bar) -> dict:
    """Best wall time of each method over ``repeats`` rounds, after one warm-up run of each, the
    methods taking turns in each round, so that a busy machine slows them alike (no saved-tensor
    hooks while timing); the progress ``bar`` advances by one per warm-up and per timed run."""
    for method in methods:
        bar.set_postfix_str(f"n={len(ts) - 1}: warm-up {method}")
        loss_grad(model, loss_fn, x, ts, method=method, solver=solver)
        bar.update()
    best = dict.fromkeys(methods, math.inf)
    for r in range(repeats):
        for method in methods:
            bar.set_postfix_str(f"n={len(ts) - 1}: timing {method} ({r + 1}/{repeats})")
            report = profile_gradient(
                model, loss_fn, x, ts, method=method, solver=solver, track_saved=False
            )
            best[method] = min(best[method], report.wall_time_s)
            bar.update()
    return best


def _references(model, loss_fn, x, ts, v, *, solver) -> tuple[torch.Tensor, float]:
    """The two references of a grid: g*, the gradient by backprop through the solve, and D, the
    central difference along v (:func:`sagkit.finite_difference`)."""
    _, g_ref = loss_grad(model, loss_fn, x, ts, method="backprop", solver=solver)
    return g_ref, finite_difference(model, loss_fn, x, ts, v, solver=solver)


def _errors(g: torch.Tensor, g_ref: torch.Tensor, v: torch.Tensor, fd: float) -> dict:
    g = g.double()
    return {
        "rel_err_exact": float((g - g_ref).norm() / g_ref.norm()),
        "dir_err_fd": abs(float((g * v).sum()) - fd) / abs(fd),
    }


def _methods(methods) -> list[str]:
    methods = list(METHODS) if methods is None else list(methods)
    for method in methods:
        METHODS[method]  # an unknown name raises the registry's error
    return methods


def gradient_accuracy(
    model,
    loss_fn,
    x: torch.Tensor,
    *,
    ns=(2, 4, 8, 16, 32, 64),
    methods=None,
    solver: str = "ddim",
    t_start: float = 0.9,
    t_end: float | None = None,
    v: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Errors of every method's ∂L/∂x against the exact discrete gradient and against finite
    differences, for each n: one dict per (n, method) with keys n, method, exact,
    rel_err_exact, dir_err_fd (or ``error``: why the method does not support the configuration,
    from :meth:`GradientMethod.refusal`).

    ``rel_err_exact`` = ‖g − g*‖ / ‖g*‖ is the vector error against g*, backprop through the
    solve; ``dir_err_fd`` = |⟨g, v⟩ − D| / |D| the error of the directional derivative along
    one direction v against the finite difference D (see the module docstring).

    Everything runs in float64 (model, x (B, ...), the direction v, by default a seeded
    Gaussian): the errors are then the methods' own, not float32 rounding. The grid runs
    from ``t_start`` to ``t_end`` (default: the schedule's ``t_min``) in n steps uniform in t.
    ``progress`` shows a bar that advances once per n for the references and once per method.
    """
    methods = _methods(methods)
    ns = tuple(ns)
    if v is None:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
    t_end = model.schedule.t_min if t_end is None else t_end
    rows = []
    bar = tqdm(total=len(ns) * (1 + len(methods)), desc="accuracy", disable=not progress)
    for n in ns:
        bar.set_postfix_str(f"n={n}: backprop reference and finite differences")
        ts = time_grid(model.schedule, t_start, t_end, int(n))
        g_ref, fd = _references(model, loss_fn, x, ts, v, solver=solver)
        bar.update()
        for method in methods:
            bar.set_postfix_str(f"n={n}: {method}")
            row = {"n": int(n), "method": method, "exact": METHODS[method].exact}
            reason = METHODS[method].refusal(solver, ts)
            if reason is None:
                _, g = loss_grad(model, loss_fn, x, ts, method=method, solver=solver)
                row.update(_errors(g, g_ref, v, fd))
            else:
                row["error"] = reason
            rows.append(row)
            bar.update()
    bar.close()
    return rows


def _check_benchmark(dtype: str, ns, *, batch: int, repeats: int) -> tuple:
    """Refuse an unknown dtype, no n, or a count below 1; return ``ns`` as a tuple."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ns = tuple(ns)
    if not ns:
        raise ValueError("ns must hold at least one number of steps")
    for n in ns:
        check_count(n, "ns entries")
    check_count(batch, "batch")
    check_count(repeats, "repeats")
    return ns


@dataclass(frozen=True, eq=False)
class _Setup:
    """What a benchmark measures on: the float64 ``reference`` model and ``net``, its copy in the
    benchmark's dtype; a batch x (B, ...) in float64 (``x64``) and in that dtype (``x``); the
    ``target`` of the loss and the direction ``v`` of the finite differences (float64)."""

    reference: object
    net: object
    x64: torch.Tensor
    x: torch.Tensor
    target: torch.Tensor
    v: torch.Tensor

    def loss_fn(self, out: torch.Tensor) -> torch.Tensor:
        """L(x) = ½ Σ_b ‖x_b − target_b‖², as (B,) values in x's dtype."""
        return 0.5 * (out - self.target.to(out.dtype)).flatten(1).pow(2).sum(1)


def _setup(model: str, dtype: str, *, batch: int, seed: int, device) -> _Setup:
    """The models of :func:`build_model` on ``device`` and a seeded batch of ``batch`` samples,
    drawn in turn: x, the target, v."""
    reference, shape = build_model(model, seed=seed)
    reference = reference.to(device)
    net = copy.deepcopy(reference).to(DTYPES[dtype])
    gen = torch.Generator().manual_seed(seed)
    x64, target, v = (
        torch.randn((batch, *shape), generator=gen, dtype=torch.float64).to(device)
        for _ in range(3)
    )
    return _Setup(reference, net, x64, x64.to(DTYPES[dtype]), target, v)


def _measurements(setup: _Setup, ts, method: str, *, solver, g_ref, fd, times) -> dict:
    """A profiled run of ``method`` on ``net``: its errors, its time (``times`` of
    :func:`_interleaved_times`) and what :func:`sagkit.profile_gradient` counts."""
    report = profile_gradient(setup.net, setup.loss_fn, setup.x, ts, method=method, solver=solver)
    return {
        **_errors(report.result[1], g_ref, setup.v, fd),
        "time_s": times[method],
        "time_rel": times[method] / times["backprop"],
        "saved_bytes": report.saved_bytes,
        "cuda_peak_bytes": report.cuda_peak_bytes,
        "model_calls": report.model_calls,
    }


def _rows_of_grid(
    setup: _Setup, ts, common: dict, *, methods, refused: dict, timed, repeats: int, bar
) -> list[dict]:
    """The rows of one grid ``ts``, each ``common`` plus one method's results: the references in
    float64, the ``timed`` methods' times, then a profile of each method, or the reason it is
    ``refused``; the ``bar`` advances after each."""
    n, solver = common["n"], common["solver"]
    bar.set_postfix_str(f"n={n}: float64 reference and finite differences")
    g_ref, fd = _references(setup.reference, setup.loss_fn, setup.x64, ts, setup.v, solver=solver)
    bar.update()
    times = _interleaved_times(
        setup.net,
        setup.loss_fn,
        setup.x,
        ts,
        solver=solver,
        methods=timed,
        repeats=repeats,
        bar=bar,
    )
    rows = []
    for method in methods:
        bar.set_postfix_str(f"n={n}: profiling {method}")
        row = {**common, "method": method, "exact": METHODS[method].exact}
        if method in refused:
            row["error"] = refused[method]
        else:
            row.update(
                _measurements(setup, ts, method, solver=solver, g_ref=g_ref, fd=fd, times=times)
            )
        rows.append(row)
        bar.update()
    return rows


def run_benchmark(
    *,
    model: str = "unet",
    dtype: str = "float32",
    ns=(8, 16, 64),
    solver: str = "ddim",
    device: str = "auto",
    methods=None,
    batch: int = 2,
    t_start: float = 0.9,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Benchmark every method (or those named in ``methods``) for each n; return one dict per row.

    Each solve runs from ``t_start`` to the schedule's ``t_min`` in n steps uniform in t, on a
    batch of ``batch`` samples. Keys of a row: model, dtype, device, solver, n, method, exact,
    rel_err_exact, dir_err_fd, time_s, time_rel, saved_bytes, cuda_peak_bytes, model_calls; a
    method that does not support the configuration gets a row with ``error`` (its
    :meth:`GradientMethod.refusal`) instead. ``progress`` shows a bar that advances after each
    reference, warm-up, timed run and profile, naming the step it is in.
    """
    ns = _check_benchmark(dtype, ns, batch=batch, repeats=repeats)
    methods = _methods(methods)
    dev = resolve_device(device)
    setup = _setup(model, dtype, batch=batch, seed=seed, device=dev)
    schedule = setup.reference.schedule
    grids = {n: time_grid(schedule, t_start, schedule.t_min, int(n)) for n in ns}
    refused = {
        n: {m: r for m in methods if (r := METHODS[m].refusal(solver, ts)) is not None}
        for n, ts in grids.items()
    }
    timed = {
        n: ["backprop", *(m for m in methods if m not in refused[n] and m != "backprop")]
        for n in ns
    }
    # per n: the references, a warm-up and `repeats` timed runs per timed method, one profile
    # per method
    work = sum(1 + (1 + repeats) * len(timed[n]) + len(methods) for n in ns)
    rows = []
    bar = tqdm(total=work, desc="bench", disable=not progress)
    for n, ts in grids.items():
        common = {"model": model, "dtype": dtype, "device": str(dev), "solver": solver, "n": int(n)}
        rows += _rows_of_grid(
            setup,
            ts,
            common,
            methods=methods,
            refused=refused[n],
            timed=timed[n],
            repeats=repeats,
            bar=bar,
        )
    bar.close()
    return rows


def _bytes(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024
    return str(b)


def bench_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (one line per method × n)."""
    if not rows:
        return "(no rows)"
    head, w = rows[0], max(11, *(len(r["method"]) + 2 for r in rows))
    lines = [
        f"model={head['model']} dtype={head['dtype']} solver={head['solver']} device={head['device']}",
        f"{'n':>4}  {'method':<{w}}{'rel.err exact':>14}{'dir.err FD':>12}{'time':>10}"
        f"{'time/bp':>9}{'saved':>12}{'CUDA peak':>12}{'calls':>7}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['n']:>4}  {r['method']:<{w}}  n/a: {r['error']}")
            continue
        lines.append(
            f"{r['n']:>4}  {r['method']:<{w}}{r['rel_err_exact']:>14.2e}{r['dir_err_fd']:>12.2e}"
            f"{r['time_s']:>9.3f}s{r['time_rel']:>9.2f}{_bytes(r['saved_bytes']):>12}"
            f"{_bytes(r['cuda_peak_bytes']):>12}{r['model_calls']:>7}"
        )
    return "\n".join(lines)


def pivot_table(rows: list[dict], key: str, *, fmt: str = "{:.2f}", unit: float = 1.0) -> str:
    """A compact table of one quantity: one line per method, one column per n.

    Each cell is ``fmt.format(row[key] / unit)`` (e.g. ``unit=2**20`` for MiB), "-" where the
    method has no value at that n (a refused configuration).
    """
    if not rows:
        return "(no rows)"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ns = sorted({r["n"] for r in rows})
    got = {(r["n"], r["method"]): r.get(key) for r in rows}
    w = max(8, *(len(m) + 2 for m in methods))
    cells = {
        (n, m): "-" if got.get((n, m)) is None else fmt.format(got[n, m] / unit)
        for n in ns
        for m in methods
    }
    cw = max(8, *(len(c) + 2 for c in cells.values()))
    lines = [f"{'method':<{w}}" + "".join(f"{'n=' + str(n):>{cw}}" for n in ns)]
    lines += [f"{m:<{w}}" + "".join(f"{cells[n, m]:>{cw}}" for n in ns) for m in methods]
    return "\n".join(lines)
