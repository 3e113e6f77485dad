"""The built-in engines: symplectic and checkpoint against backprop (x, cond, params; float32 within derived bounds of a float64 reference, at 1 and 2 threads), the vanilla adjoint's convergence."""

import copy

import pytest
import torch
from helpers import (
    BOTH_SCHEDULES,
    F64_AGREE,
    SCHEDULES,
    RoundingChain,
    grid,
    make_loss,
    mixture_under,
    noise,
    pair_bound,
    rel,
    roundoff_bound,
    tiny_unet,
)

import sagkit as sk

SOLVERS = ("ddim", "heun", "rk4")


def rounding_report(got, ref, chain, dtype, ref_dtype=torch.float64):
    """(‖got − ref‖/‖ref‖, its bound): got's rounding in ``dtype`` plus ref's in ``ref_dtype``,
    each ``roundoff_bound`` over the chain of operations ``chain`` counted behind it."""
    bound_got = roundoff_bound(chain.longest(got), dtype)
    bound_ref = roundoff_bound(chain.longest(ref), ref_dtype)
    return rel(got, ref), pair_bound(bound_got, bound_ref)


def check_rounding(got, ref, chain, dtype, what="", ref_dtype=torch.float64):
    """Assert ``rounding_report``: ``ref`` the float64 reference, or (``ref_dtype=dtype``)
    another ``dtype`` result of the same exact quantity (the triangle inequality)."""
    measured, bound = rounding_report(got, ref, chain, dtype, ref_dtype)
    assert measured <= bound, f"{what}: relative error {measured:.3g} > derived bound {bound:.3g}"
    return measured, bound


def check_pair(a, b, chain, dtype, what=""):
    return check_rounding(a, b, chain, dtype, what, ref_dtype=dtype)


def float64_copy(model):
    """The same problem in float64, exactly: float32 values are float64 numbers."""
    return copy.deepcopy(model).to(torch.float64)


def unet_cond_model(scheduler, dtype):
    """A tiny UNet with a continuous class embedding: cond of shape (B, 32)."""
    unet = tiny_unet(class_embed_type="identity").eval()
    return sk.DiffusersModel(unet, scheduler).to(dtype)


# --- exactness: symplectic and checkpoint against backprop ---------------------------------
F64, F32 = torch.float64, torch.float32
WHICH = [*SCHEDULES, "digits_mixture", "unet_model"]


def with_float32(float64_cases, float32_cases):
    """Every case in float64 (exactness, each solver on each model), and in float32 only the
    cases named: the float32 rounding bound is checked once per model, each solver in float32
    somewhere (the thread test below adds digits-heun and unet-ddim), not the whole grid again:
    the float32 code of an engine is its float64 code, and its bound counts that run's own
    operations."""
    return [(*c, F64) for c in float64_cases] + [(*c, F32) for c in float32_cases]


@pytest.mark.parametrize(
    "which, solver, dtype",
    with_float32(
        [(w, s) for w in WHICH for s in SOLVERS],
        [("vp", "ddim"), ("flow", "heun"), ("digits_mixture", "rk4"), ("unet_model", "rk4")],
    ),
)
def test_symplectic_and_checkpoint_match_backprop_wrt_x(request, which, solver, dtype):
    """which: the test mixture under a schedule of SCHEDULES, or a fixture."""
    model = (
        mixture_under(SCHEDULES[which]) if which in SCHEDULES else request.getfixturevalue(which)
    ).to(dtype)
    x = noise(model.means.shape[1:] if which != "unet_model" else (1, 8, 8), dtype=dtype)
    ts, loss_fn = grid(model), make_loss()
    with RoundingChain() as chain:  # counts the roundings behind each result
        loss_bp, g_bp = sk.loss_grad(model, loss_fn, x, ts, method="backprop", solver=solver)
        loss_sy, g_sy = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver=solver)
        loss_ck, g_ck = sk.loss_grad(model, loss_fn, x, ts, method="checkpoint", solver=solver)
        _, ref = sk.loss_grad(
            float64_copy(model), loss_fn, x.double(), ts, method="backprop", solver=solver
        )
    assert g_sy.shape == x.shape and g_sy.dtype == dtype
    assert loss_sy == loss_bp and loss_ck == loss_bp  # the same forward, bit for bit
    # each engine within γ (over its counted chain, see helpers.roundoff_bound) of the exact
    # gradient, as is the float64 reference; symplectic vs backprop by the triangle inequality
    check_rounding(g_bp, ref, chain, dtype, "backprop")
    check_rounding(g_sy, ref, chain, dtype, "symplectic")
    check_pair(g_sy, g_bp, chain, dtype, "symplectic vs backprop")
    assert torch.equal(g_ck, g_bp)  # checkpoint replays the same operations


@pytest.mark.parametrize(
    "mixture, solver, dtype",
    with_float32([(m, s) for m in SCHEDULES for s in SOLVERS], [("vp", "rk4"), ("flow", "ddim")]),
    indirect=["mixture"],
)
def test_symplectic_wrt_cond_and_params_on_the_mixture(mixture, solver, dtype):
    model = mixture.to(dtype).requires_grad_()
    x = noise((1, 2, 2), batch=3, dtype=dtype)
    cond = noise((3,), batch=3, dtype=dtype, seed=5)  # (B, K) logits added to log π
    ts, loss_fn, wrt = grid(model), make_loss(), ("x", "cond", "params")
    with RoundingChain() as chain:
        _, bp = sk.loss_grad(
            model, loss_fn, x, ts, method="backprop", solver=solver, cond=cond, wrt=wrt
        )
        _, sy = sk.loss_grad(
            model, loss_fn, x, ts, method="symplectic", solver=solver, cond=cond, wrt=wrt
        )
        _, ck = sk.loss_grad(
            model, loss_fn, x, ts, method="checkpoint", solver=solver, cond=cond, wrt=wrt
        )
        m64, x64, c64 = float64_copy(model), x.double(), cond.double()
        _, ref = sk.loss_grad(
            m64, loss_fn, x64, ts, method="backprop", solver=solver, cond=c64, wrt=wrt
        )
    assert sy[1].shape == cond.shape and len(sy[2]) == 1 and sy[2][0].shape == model.means.shape
    for name, got, want, exact in zip(wrt, sy, bp, ref, strict=True):
        check_rounding(want, exact, chain, dtype, f"backprop wrt {name}")
        check_rounding(got, exact, chain, dtype, f"symplectic wrt {name}")
        check_pair(got, want, chain, dtype, f"symplectic vs backprop wrt {name}")
    for got, want in zip(ck, bp, strict=True):
        assert rel(got, want) == 0


@pytest.mark.parametrize("solver, dtype", with_float32([(s,) for s in SOLVERS], [("heun",)]))
def test_symplectic_wrt_cond_and_params_on_a_unet(scheduler, solver, dtype):
    model = unet_cond_model(scheduler, dtype)
    x = noise((1, 8, 8), dtype=dtype)
    cond = noise((32,), dtype=dtype, seed=7)  # continuous class embedding (B, time_embed_dim)
    ts, loss_fn = grid(model, n=3), make_loss()
    m64, x64, c64 = float64_copy(model), x.double(), cond.double()
    for wrt in ("cond", "params"):
        with RoundingChain() as chain:
            _, bp = sk.loss_grad(
                model, loss_fn, x, ts, method="backprop", solver=solver, cond=cond, wrt=wrt
            )
            _, sy = sk.loss_grad(
                model, loss_fn, x, ts, method="symplectic", solver=solver, cond=cond, wrt=wrt
            )
            _, ref = sk.loss_grad(
                m64, loss_fn, x64, ts, method="backprop", solver=solver, cond=c64, wrt=wrt
            )
        check_rounding(bp, ref, chain, dtype, f"backprop wrt {wrt}")
        check_rounding(sy, ref, chain, dtype, f"symplectic wrt {wrt}")
        check_pair(sy, bp, chain, dtype, f"symplectic vs backprop wrt {wrt}")
    assert len(sy) == len(list(model.parameters()))


def test_symplectic_grad_for_a_single_wrt_keeps_the_others_out(mixture):
    """wrt="cond" alone: the result is cond's gradient, and x's leaf is never required."""
    x, cond = noise((1, 2, 2), batch=3), noise((3,), batch=3, seed=2)
    ts, loss_fn = grid(mixture), make_loss()
    _, g = sk.loss_grad(mixture, loss_fn, x, ts, method="symplectic", cond=cond, wrt="cond")
    _, want = sk.loss_grad(mixture, loss_fn, x, ts, method="backprop", cond=cond, wrt="cond")
    assert g.shape == cond.shape and rel(g, want) <= F64_AGREE
    assert not x.requires_grad and not cond.requires_grad


def float32_checks(scheduler):
    """float32 gradients of two small problems (the digits mixture with Heun, a tiny UNet with
    DDIM) against their derived bounds: {what: (measured, bound)}."""
    unet = sk.DiffusersModel(tiny_unet().eval(), scheduler)
    problems = {"digits-heun": (sk.digits.digits_mixture(n_components=64), "heun"),
                "unet-ddim": (unet, "ddim")}  # fmt: skip
    checks = {}
    for name, (model, solver) in problems.items():
        model = model.to(torch.float32)
        x, ts, loss_fn = noise((1, 8, 8), dtype=torch.float32), grid(model), make_loss()
        with RoundingChain() as chain:
            _, bp = sk.loss_grad(model, loss_fn, x, ts, method="backprop", solver=solver)
            _, sy = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver=solver)
            _, ref = sk.loss_grad(
                float64_copy(model), loss_fn, x.double(), ts, method="backprop", solver=solver
            )
        checks[f"{name} backprop"] = rounding_report(bp, ref, chain, torch.float32)
        checks[f"{name} symplectic"] = rounding_report(sy, ref, chain, torch.float32)
        checks[f"{name} symplectic vs backprop"] = rounding_report(
            sy, bp, chain, torch.float32, torch.float32
        )
    return checks


@pytest.mark.slow
def test_float32_gradients_hold_their_bound_at_one_and_two_threads(scheduler):
    """The bounds count operations, so they do not depend on the thread count; the rounding
    may (a parallel reduction splits its sum by thread), so each run is checked on its own.

    Both runs are in this process: torch.set_num_threads sets the intra-op pool (OpenMP and
    MKL) at run time, as OMP_NUM_THREADS does at start-up; the count is restored after."""
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.get_num_threads() == threads
            runs[threads] = float32_checks(scheduler)
    finally:
        torch.set_num_threads(before)
    for threads, checks in runs.items():
        for what, (measured, bound) in checks.items():
            assert measured <= bound, f"{threads} threads, {what}: {measured:.3g} > {bound:.3g}"
    bounds = [{w: b for w, (_, b) in runs[k].items()} for k in (1, 2)]
    assert bounds[0] == bounds[1]


# --- finite differences: the referee ---------------------------------------------------------


def decreasing(values):
    return all(values[i + 1] < values[i] for i in range(len(values) - 1))


def adjoint_errors(model, x, ns, solver="ddim", cond=None, wrt="x", t_end=0.0):
    loss_fn, errors = make_loss(), []
    for n in ns:
        ts = sk.time_grid(model.schedule, 0.8, t_end, n)
        _, exact = sk.loss_grad(
            model, loss_fn, x, ts, method="backprop", solver=solver, cond=cond, wrt=wrt
        )
        _, approx = sk.loss_grad(
            model, loss_fn, x, ts, method="adjoint", solver=solver, cond=cond, wrt=wrt
        )
        errors.append(rel(approx, exact))
    return errors


@BOTH_SCHEDULES
def test_vanilla_adjoint_error_falls_with_n_on_the_mixture(mixture):
    errors = adjoint_errors(mixture, noise((1, 2, 2), batch=3), (4, 8, 16, 32, 64))
    assert decreasing(errors), errors
    assert errors[0] > 1e-2  # not the discrete gradient at few steps...
    assert errors[-1] < errors[0] / 4  # ...but approaching it: about O(1/n) for Euler


def test_vanilla_adjoint_error_falls_with_n_on_a_unet(unet_model):
    errors = adjoint_errors(unet_model, noise((1, 8, 8)), (4, 16, 64), t_end=1e-3)
    assert decreasing(errors), errors
    assert errors[0] > 1e-3


def test_vanilla_adjoint_supports_cond_and_params(mixture):
    model = mixture.requires_grad_()
    x, cond = noise((1, 2, 2), batch=3), noise((3,), batch=3, seed=5)
    for wrt in ("cond", "params"):
        errors = adjoint_errors(model, x, (8, 32, 128), cond=cond, wrt=wrt)
        assert decreasing(errors), (wrt, errors)


@pytest.mark.parametrize("solver", ["heun", "rk4"])
def test_vanilla_adjoint_with_higher_order_solvers_converges(mixture, solver):
    errors = adjoint_errors(mixture, noise((1, 2, 2), batch=3), (8, 32), solver=solver)
    assert errors[1] < errors[0], errors


# --- the budgeted engine: exact whatever it keeps -----------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_budgeted_matches_backprop_for_every_split(scheduler, solver, register_temporarily):
    """Every split of n = 3 steps into recomputed and kept ones, and the byte budgets 0 and ∞,
    give backprop's gradient wrt x, cond and θ in float64 (F64_AGREE: the same rounding
    argument as for the symplectic adjoint, whose formulas the recomputed part uses)."""
    from sagkit.gradients.engines import make_budgeted

    model = unet_cond_model(scheduler, torch.float64)
    x, cond = noise((1, 8, 8)), noise((32,), seed=7)
    ts, wrt = grid(model, n=3), ("x", "cond", "params")
    _, ref = sk.loss_grad(
        model, make_loss(), x, ts, method="backprop", solver=solver, cond=cond, wrt=wrt
    )
    engines = [make_budgeted(keep_steps=m, name=f"keep{m}") for m in range(5)]
    engines += [make_budgeted(budget_bytes=b, name=f"bytes{b}") for b in (0, float("inf"))]
    for engine in engines:
        register_temporarily(sk.METHODS, engine.name, engine)
        _, got = sk.loss_grad(
            model, make_loss(), x, ts, method=engine.name, solver=solver, cond=cond, wrt=wrt
        )
        for name, g, r in zip(wrt, got, ref, strict=True):
            assert rel(g, r) <= F64_AGREE, (engine.name, name, rel(g, r))


def test_budgeted_over_its_budget_frees_the_step_it_measured(unet_model):
    """Over its budget the engine measures one step's graph and drops it; the measuring hooks
    must not keep it alive through a reference cycle (they did: each gradient leaked one step's
    graph, 1.6 GiB per guided step at Stable Diffusion's size). No tensor outlives a call."""
    import gc

    from sagkit.gradients.engines import make_budgeted

    engine = make_budgeted(budget_bytes=1)
    x, ts = noise((1, 8, 8)), grid(unet_model, n=3)

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    sk.loss_grad(unet_model, make_loss(), x, ts, method=engine)  # warm-up: caches, lazy state
    before = live_tensors()
    result = sk.loss_grad(unet_model, make_loss(), x, ts, method=engine)
    del result
    assert live_tensors() == before


def test_budgeted_refuses_zero_weight_tableaus_and_bad_budgets():
    from sagkit.gradients.engines import make_budgeted

    engine = make_budgeted(keep_steps=1)
    assert engine.supports("heun") and engine.solver_rule == sk.METHODS["symplectic"].solver_rule
    with pytest.raises(ValueError, match="not both"):
        make_budgeted(keep_steps=1, budget_bytes=10)
    with pytest.raises(ValueError, match="keep_steps"):
        make_budgeted(keep_steps=-1)
    with pytest.raises(ValueError, match="budget_bytes"):
        make_budgeted(budget_bytes=-1.0)
