"""Profiling: saved bytes (deterministic), network calls, and the memory figures of the engines."""

import pytest
import torch
from helpers import tiny_unet

import sagkit as sk
from sagkit.gradients.memory import observers


def quadratic(x):
    return 0.5 * x.flatten(1).pow(2).sum(1)


def test_saved_bytes_count_each_storage_once():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes

    def fn():
        y = x * x  # saves x twice: one storage
        return torch.autograd.grad(y.sum(), x)[0]

    report = sk.lab.profile(fn)
    assert report.saved_bytes == 4000 == report.graph_peak_bytes
    assert report.held_peak_bytes == 0
    assert torch.equal(report.result, 2 * x.detach())
    assert sk.lab.profile(fn, exclude=[x]).saved_bytes == 0  # like the model's parameters
    assert sk.lab.profile(fn, track_saved=False).saved_bytes is None


def test_saved_bytes_are_a_peak_not_a_total():
    x = torch.randn(1000, requires_grad=True)

    def fn():
        for _ in range(5):  # five graphs, one at a time
            torch.autograd.grad(x.exp().sum(), x)

    assert sk.lab.profile(fn).saved_bytes == 4000  # exp saves its result


def test_cpu_reports_no_cuda_peak_and_a_wall_time(mixture):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    ts = sk.time_grid(mixture.schedule, 0.8, 0.0, 4)
    report = sk.lab.profile_gradient(mixture, quadratic, x, ts, method="symplectic")
    assert report.cuda_peak_bytes is None
    assert report.wall_time_s > 0
    assert report.vmhwm_bytes is None or report.vmhwm_bytes > 0
    loss, grad = report.result
    assert grad.shape == x.shape and loss.ndim == 0
    assert "result" not in repr(report)


@pytest.mark.parametrize(
    "solver, stages", [("ddim", 1), ("heun", 2), ("rk4", 4)], ids=["ddim", "heun", "rk4"]
)
def test_network_calls(mixture, solver, stages):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    n = 5
    ts = sk.time_grid(mixture.schedule, 0.8, 0.0, n)
    calls = {
        m: sk.lab.profile_gradient(mixture, quadratic, x, ts, method=m, solver=solver).model_calls
        for m in ("backprop", "checkpoint", "symplectic")
    }
    assert calls == {
        "backprop": n * stages,
        "checkpoint": 2 * n * stages,
        "symplectic": 2 * n * stages,
    }
    if solver != "rk4":  # torchdiffeq's heun2 and euler make the same calls as ours
        assert sk.lab.profile_gradient(
            mixture, quadratic, x, ts, method="adjoint", solver=solver
        ).model_calls == (2 * n * stages)


def test_the_profiled_model_is_left_untouched(mixture):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    ts = sk.time_grid(mixture.schedule, 0.8, 0.0, 3)
    sk.lab.profile_gradient(mixture, quadratic, x, ts, method="backprop")
    assert "eps" not in vars(mixture)
    assert not observers()  # the ledger is gone after profiling


@pytest.fixture(scope="module")
def memory(scheduler):
    """Saved bytes of every method at n = 8 and 64 on a UNet of 164k parameters (8×8 images)."""
    unet = tiny_unet(channels=(16, 32)).eval()
    assert sum(p.numel() for p in unet.parameters()) >= 100_000
    model = sk.DiffusersModel(unet, scheduler)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for n in (8, 64):
        ts = sk.time_grid(model.schedule, 0.9, model.schedule.t_min, n)
        for method in ("backprop", "checkpoint", "symplectic", "adjoint"):
            out[method, n] = sk.lab.profile_gradient(model, quadratic, x, ts, method=method)
    return out, x.numel() * x.element_size()


def test_symplectic_saves_a_tenth_of_backprop_at_64_steps(memory):
    reports, _ = memory
    assert reports["symplectic", 64].saved_bytes <= reports["backprop", 64].saved_bytes / 10


def test_symplectic_grows_by_the_stored_states_only(memory):
    reports, state_bytes = memory
    growth = reports["symplectic", 64].saved_bytes - reports["symplectic", 8].saved_bytes
    assert 0 <= growth <= (64 - 8) * state_bytes
    assert reports["symplectic", 64].held_peak_bytes == 65 * state_bytes  # y_0..y_64
    # one step's activations: what backprop saves per step
    per_step = reports["backprop", 8].saved_bytes / 8
    assert reports["symplectic", 64].graph_peak_bytes <= 1.01 * per_step


def test_backprop_grows_linearly(memory):
    reports, _ = memory
    ratio = reports["backprop", 64].saved_bytes / reports["backprop", 8].saved_bytes
    assert 7.5 <= ratio <= 8.5, ratio


@pytest.mark.parametrize("method", ["checkpoint", "adjoint"])
def test_checkpoint_and_adjoint_are_flat_too(memory, method):
    reports, state_bytes = memory
    assert reports[method, 64].complete
    growth = reports[method, 64].saved_bytes - reports[method, 8].saved_bytes
    assert 0 <= growth <= (64 - 8) * state_bytes
    assert reports[method, 64].saved_bytes <= reports["backprop", 64].saved_bytes / 10
    # checkpoint's recomputation is seen: it holds one step's activations at its peak
    assert reports[method, 8].saved_bytes >= 0.9 * reports["backprop", 8].saved_bytes / 8


def test_budgeted_engine_spends_its_budget_between_symplectic_and_backprop(
    scheduler, register_temporarily
):
    """Budget 0 saves what the symplectic adjoint saves, an infinite one what backprop saves,
    with backprop's n network calls; a budget of m steps' graphs keeps m steps (n + (n − m)
    calls) and its saved bytes exceed the symplectic adjoint's by at most the budget."""
    from sagkit.gradients.engines import make_budgeted

    model = sk.DiffusersModel(tiny_unet().double().eval(), scheduler)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = 8
    ts = sk.time_grid(model.schedule, 0.9, model.schedule.t_min, n)

    def run(method):
        return sk.lab.profile_gradient(model, quadratic, x, ts, method=method)

    symplectic, backprop = run("symplectic"), run("backprop")
    per_step = backprop.saved_bytes / n  # one step's graph (the graphs are alike)
    budgets = {"zero": 0, "three": 3.5 * per_step, "inf": float("inf")}
    got = {}
    for name, budget in budgets.items():
        register_temporarily(sk.METHODS, name, make_budgeted(budget_bytes=budget, name=name))
        got[name] = run(name)
    assert got["zero"].saved_bytes == symplectic.saved_bytes
    assert got["zero"].model_calls == symplectic.model_calls == 2 * n
    assert got["inf"].model_calls == backprop.model_calls == n
    # backprop's graphs plus the held input y_0 (one state)
    assert backprop.saved_bytes <= got["inf"].saved_bytes <= backprop.saved_bytes + x.nbytes
    assert got["three"].model_calls == n + (n - 3)
    assert symplectic.saved_bytes < got["three"].saved_bytes
    assert got["three"].saved_bytes <= symplectic.saved_bytes + budgets["three"]
    assert got["three"].saved_bytes < got["inf"].saved_bytes


def test_adjointdeis_reports_its_stored_states(mixture):
    """AdjointDEIS keeps the M + 1 forward states outside autograd; the profiler sees each."""
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    held = {}
    for m in (4, 64):
        ts = sk.time_grid(mixture.schedule, 0.9, mixture.schedule.t_min, m)
        report = sk.lab.profile_gradient(mixture, quadratic, x, ts, method="adjointdeis-1")
        held[m] = report.held_peak_bytes
    assert held[64] - held[4] == 60 * x.numel() * x.element_size()
