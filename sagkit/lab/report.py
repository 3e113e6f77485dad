"""The headless report: the headline experiments as PNG figures and one ``report.md``.

    sagkit report --fast --out report      # or: make report

Each section is a plain function ``(out_dir, fast, device) -> markdown`` in :data:`SECTIONS`,
which writes its figures into ``out_dir`` and asserts nothing: the tests and notebooks do.
``report.md`` is rewritten after every section, so a long run loses no finished section; a
section that fails is recorded in it with its error, and the others still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..core.device import resolve_device  # noqa: E402
from ..core.models import GaussianMixture  # noqa: E402
from ..core.schedules import VPSchedule  # noqa: E402
from ..digits.data import digits_mixture  # noqa: E402
from . import plotting  # noqa: E402
from .bench import bench_table, gradient_accuracy, run_benchmark  # noqa: E402
from .convergence import convergence_study, convergence_table, plot_convergence  # noqa: E402
from .misalignment import misalignment  # noqa: E402

__all__ = ["SECTIONS", "write_report", "ReportError"]


class ReportError(RuntimeError):
    """Some sections failed; ``report.md`` (``path``) holds the others and the failures."""

    def __init__(self, path: Path, failed: list[str]):
        super().__init__(f"report section(s) {', '.join(failed)} failed; the others are in {path}")
        self.path, self.failed = path, failed


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats in 3 significant digits."""

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def misalignment_section(out_dir: Path, fast: bool, device: torch.device) -> str:
    """One-step vs n-step estimates on the exact digits mixture (notebook 01)."""
    model = digits_mixture(n_components=256 if fast else 512).to(device)
    n_samples, steps = (64, 50) if fast else (256, 100)
    gen = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn(n_samples, 1, 8, 8, dtype=torch.float64, device=device, generator=gen)
    result = misalignment(model, x_T, steps=steps, progress=True)
    png = _save(plotting.misalignment_curves(result), out_dir, "misalignment.png")
    rows = [[f"{t:.2f}", *r.tolist()] for t, r in zip(result["times"], result["rms"], strict=True)]
    table = _table(["t", *(f"n={n}" for n in result["ns"])], rows)
    return (
        "## Misalignment of clean-image estimates\n\n"
        f"Exact Gaussian-mixture digits model, {n_samples} samples, {steps} DDIM steps. RMS distance "
        "between the n-step estimate at t and the sampler's final sample (n = 1 is Tweedie's "
        f"one-step estimate).\n\n{table}\n\n![misalignment]({png})\n"
    )


def _by_method(rows: list[dict], key: str) -> dict[str, tuple[list, list]]:
    """{method: (ns, values)} from benchmark rows, skipping rows without ``key``."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        if row.get(key) is not None:
            ns, vals = out.setdefault(row["method"], ([], []))
            ns.append(row["n"])
            vals.append(row[key])
    return out


def _loglog(series: dict, xlabel: str, ylabel: str, title: str, floor: float = 1e-17):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.loglog(xs, [max(y, floor) for y in ys], "o-", label=name)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gradients_section(out_dir: Path, fast: bool, device: torch.device) -> str:
    """Gradient error of every method against n (exact mixture, float64), and the UNet
    benchmark: error, time relative to backprop, bytes saved for backward (notebooks 02–03)."""
    mixture = digits_mixture(n_components=64).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, device=device, generator=gen)
    target = torch.randn(2, 1, 8, 8, dtype=torch.float64, device=device, generator=gen)

    def loss_fn(out):
        return 0.5 * (out - target.to(out.dtype)).flatten(1).pow(2).sum(1)

    ns = (4, 8, 16, 32, 64, 128, 256)  # the exact mixture is cheap: full range in both modes
    acc = gradient_accuracy(mixture, loss_fn, x, ns=ns, progress=True)
    acc_png = _save(
        _loglog(
            _by_method(acc, "rel_err_exact"),
            "n (DDIM steps)",
            "relative error",
            "∂L/∂x against the exact discrete gradient (mixture, float64)",
        ),
        out_dir,
        "gradient_error.png",
    )
    bench_ns = (8, 16, 32) if fast else (8, 16, 64, 128)
    rows = run_benchmark(
        model="unet", dtype="float32", ns=bench_ns, device=str(device), repeats=2 if fast else 3
    )
    mem_png = _save(
        _loglog(
            _by_method(rows, "saved_bytes"),
            "n (DDIM steps)",
            "bytes saved for backward",
            "memory against n (UNet, float32)",
        ),
        out_dir,
        "memory.png",
    )
    return (
        "## Gradient engines\n\n"
        "Relative error of ∂L/∂x against the exact gradient of the discrete DDIM solve, on the "
        "exact digits mixture in float64. Exact engines sit at rounding level; the vanilla "
        f"adjoint converges only as n grows.\n\n![gradient error]({acc_png})\n\n"
        "Benchmark on a random 650k-parameter UNet2DModel, float32 (time relative to backprop, "
        "measured in the same run; saved = bytes held for backward at the peak):\n\n"
        f"```\n{bench_table(rows)}\n```\n\n![memory]({mem_png})\n"
    )


def adjointdeis_section(out_dir: Path, fast: bool, device: torch.device) -> str:
    """Convergence orders of AdjointDEIS-1/-2M against the continuous gradient (notebook 05)."""
    means = torch.tensor(
        [[[1.0, -0.5], [0.3, 0.8]], [[-1.0, 0.2], [0.5, -0.7]], [[0.0, 0.9], [-0.8, 0.1]]]
    )
    mixture = GaussianMixture(
        means[:, None].double(), 0.3, VPSchedule.linear(), weights=[0.5, 0.3, 0.2]
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=gen)
    c = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=gen)

    def loss(y):
        return (c * y).flatten(1).sum(1) + (y**2).flatten(1).sum(1)

    steps = (20, 40, 80, 160) if fast else (5, 10, 20, 40, 80, 160, 320)
    study = convergence_study(
        mixture,
        loss,
        x,
        steps=steps,
        t_start=0.5 if fast else 1.0,
        reference_steps=64 if fast else 256,
        progress=True,
    )
    png = _save(
        plot_convergence(study, title="3-component mixture: error against the continuous gradient"),
        out_dir,
        "adjointdeis.png",
    )
    slopes = ", ".join(f"{k}: {v:.2f}" for k, v in study["slopes"].items())
    return (
        "## AdjointDEIS convergence\n\n"
        "Relative error of ∂L/∂x_T against the continuous gradient (a fine solve with "
        "extrapolation, checked against finite differences) on a 3-component Gaussian mixture. "
        f"Fitted slopes on the fine end: {slopes}.\n\n"
        f"```\n{convergence_table(study)}\n```\n\n![adjointdeis]({png})\n"
    )


def guidance_section(out_dir: Path, fast: bool, device: torch.device) -> str:
    """FreeDoM, DPS and SAG (n = 1, 2, 4, 8) on the shipped digits UNet (notebook 04)."""
    from ..digits.models import load_classifier, load_pretrained
    from .evaluation import default_tasks, evaluate_guidance, guidance_table
    from .guidance_figures import method_grid, run_methods

    model = load_pretrained("digits", device=device)
    classifier = load_classifier("digits", device=device)
    tasks = default_tasks(classifier)
    if fast:
        tasks = [task for task in tasks if task.name in ("class", "style")]
    num, steps, ns = (8, 20, (1, 2, 4)) if fast else (64, 50, (1, 2, 4, 8))
    rows = evaluate_guidance(
        model, classifier, tasks=tasks, ns=ns, num_samples=num, steps=steps, progress=True
    )
    x_T = torch.randn(
        8, 1, 16, 16, device=device, generator=torch.Generator(device=device).manual_seed(0)
    )
    results = run_methods(model, tasks[0].loss, x_T, steps=steps)
    png = _save(method_grid(results, classifier=classifier), out_dir, "guidance.png")
    return (
        "## Training-free guidance on the digits UNet\n\n"
        f"{num} samples per row, {steps} DDIM steps, the same noises, window, time travel and "
        "step rule for every method; Δ is the change of the final loss against FreeDoM (paired "
        "by seed, ± its standard error); acc is the target-class accuracy; FD the Fréchet "
        "distance to the task's digit in classifier feature space.\n\n"
        f"```\n{guidance_table(rows)}\n```\n\n"
        f"Samples for the task '{tasks[0].name}', one row per method:\n\n![guidance]({png})\n"
    )


def ground_truth_section(out_dir: Path, fast: bool, device: torch.device) -> str:
    """Each estimate's guidance direction against the exact one on the mixture (notebook 08)."""
    from .direction import direction_study, held_out_digit, inpainting_loss, plot_directions

    mixture = digits_mixture()
    reference, _ = held_out_digit(n_components=512)
    times, samples = (0.9, 0.6, 0.3, 0.1), 16 if fast else 96
    study = direction_study(
        mixture, inpainting_loss(reference, tau=0.05), times=times, samples=samples
    )
    ns = ("n=1", "n=2", "n=4", "n=8")
    fig = plot_directions({("inpainting τ = 0.05", "VP"): study}, methods=ns)
    png = _save(fig, out_dir, "ground_truth.png")
    rows = [
        [f"{t:g}", *(study["summary"][m]["cosine"]["median"][i] for m in ns)]
        for i, t in enumerate(times)
    ]
    return (
        "## Guidance against ground truth\n\n"
        f"On the 512-component digits mixture, inpainting the top half of a held-out digit "
        f"(τ = 0.05): the median cosine of each estimate's guidance gradient with the exact "
        f"guidance score, over {samples} states x_t drawn from the exact guided marginal (n = 1 "
        "is FreeDoM's one-step estimate; n > 1 SAG's).\n\n"
        f"{_table(['t', *ns], rows)}\n\n![ground truth]({png})\n"
    )


SECTIONS: dict[str, Callable[[Path, bool, torch.device], str]] = {
    "misalignment": misalignment_section,
    "gradients": gradients_section,
    "guidance": guidance_section,
    "adjointdeis": adjointdeis_section,
    "direction": ground_truth_section,
}


def write_report(*, out_dir="report", fast: bool = False, sections=None, device=None) -> Path:
    """Run the sections (all by default) and write ``out_dir/report.md``; returns its path.

    The file is written after each section. A failing section is recorded in it (its error
    in one line) and the remaining sections still run; then :class:`ReportError` is raised.
    """
    names = list(SECTIONS) if sections is None else list(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown report sections {unknown}; known: {', '.join(SECTIONS)}")
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# sagkit report\n",
        f"Mode: {'fast' if fast else 'full'}; device: {device}; torch {torch.__version__}.\n",
    ]
    path = out / "report.md"
    path.write_text("\n".join(parts))  # fail now, not after the first section, if unwritable
    failed = []
    for name in names:
        start = time.perf_counter()
        print(f"[report] {name} …", flush=True)
        try:
            parts.append(SECTIONS[name](out, fast, device))
        except Exception as error:  # noqa: BLE001 - recorded, and the other sections run
            plt.close("all")
            failed.append(name)
            message = " ".join(str(error).split())
            parts.append(
                f"## {name}\n\n**This section failed**: {type(error).__name__}: {message}\n"
            )
            print(f"[report] {name} failed: {type(error).__name__}: {message}", flush=True)
        parts.append(f"*({name}: {time.perf_counter() - start:.1f} s)*\n")
        path.write_text("\n".join(parts))
    if failed:
        raise ReportError(path, failed)
    return path
