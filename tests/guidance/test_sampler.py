"""Training-free guided sampling (sagkit.guidance), its evaluation and the notebook's widgets."""

import math

import pytest
import torch
from helpers import RoundingChain, pair_bound, rel, roundoff_bound

import sagkit as sk
from sagkit.guidance import losses
from sagkit.guidance.methods import dps_step_size, guidance_gradient, rms_step_size
from sagkit.guidance.sampler import guided_sample
from sagkit.guidance.travel import guidance_window, renoise
from sagkit.lab.profiling import CountingModel

METHODS = ("none", "freedom", "dps", "sag")


def _inpaint_loss(reference):
    mask = torch.zeros(16, 16, dtype=torch.float64)
    mask[:8] = 1
    return losses.masked_reconstruction(reference, mask)


def _sample(model, loss, x_T, guidance, seed=1, **kw):
    options = {"steps": 6, "window": (0.0, 1.0), "progress": False, **kw}
    gen = torch.Generator().manual_seed(seed)
    return guided_sample(model, loss, x_T, guidance=guidance, generator=gen, **options)


@pytest.mark.parametrize("guidance", METHODS)
def test_shapes_and_finite(digits_model, classifier, x_T, guidance):
    loss = losses.target_class(classifier, 3)
    x, traj, curve = _sample(
        digits_model, loss, x_T, guidance, n=2, return_trajectory=True, return_losses=True
    )
    assert x.shape == x_T.shape and x.dtype == x_T.dtype
    assert traj.shape == (7, *x_T.shape) and curve.shape == (7, 3)
    assert torch.equal(traj[0], x_T) and torch.equal(traj[-1], x)  # the states themselves
    # the final loss is loss(x), float64: default rtol 1e-7 ≫ γ_N(float64) for N < 10⁸
    torch.testing.assert_close(curve[-1], loss(x))
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(curve).all())
    assert _sample(digits_model, loss, x_T, guidance, n=2, return_losses=True)[1].shape == (7, 3)


def test_deterministic_under_a_seed(digits_model, x_T):
    loss = _inpaint_loss(x_T[0])
    a = _sample(digits_model, loss, x_T, "sag", seed=5, n=2)
    b = _sample(digits_model, loss, x_T, "sag", seed=5, n=2)
    c = _sample(digits_model, loss, x_T, "sag", seed=6, n=2)  # other time-travel noise
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sag_with_one_step_is_freedom(digits_model, x_T):
    loss = _inpaint_loss(x_T[0])
    freedom = _sample(digits_model, loss, x_T, "freedom", return_losses=True)
    sag = _sample(digits_model, loss, x_T, "sag", n=1, return_losses=True)
    for a, b in zip(freedom, sag, strict=True):
        assert torch.equal(a, b)
    sag2 = _sample(digits_model, loss, x_T, "sag", n=2)
    assert not torch.allclose(freedom[0], sag2)


def test_guidance_gradient_is_autograd_through_the_estimate(digits_model, x_T):
    loss = _inpaint_loss(x_T[0])
    cond = digits_model.null_cond.expand(3, -1)
    with RoundingChain() as chain:  # the roundings behind each result, counted
        value, g = guidance_gradient(digits_model, loss, x_T, 0.6, n=3, cond=cond)
        x = x_T.clone().requires_grad_(True)
        expected_value = loss(sk.estimate_x0(digits_model, x, 0.6, n=3, cond=cond))
        (expected,) = torch.autograd.grad(expected_value.sum(), x)
    assert value.shape == (3,)
    for got, want in ((value, expected_value), (g, expected)):  # float64, the same quantities
        bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
        assert rel(got, want) <= pair_bound(*bounds)
    assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("guidance", ["freedom", "dps", "sag"])
def test_guidance_lowers_the_loss(guidance):
    """An exact model (a digits mixture) and an inpainting loss: guidance must beat "none"."""
    model = sk.digits.digits_mixture(n_components=64, size=16)
    ref = model.means[5]
    x_T = torch.randn(8, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss = _inpaint_loss(ref)
    options = {
        "steps": 10,
        "window": (0.0, 0.8),
        "n": 2,
        "scale": 2.0 if guidance != "dps" else 1.0,
    }
    unguided = loss(_sample(model, loss, x_T, "none", **options))
    guided = loss(_sample(model, loss, x_T, guidance, **options))
    assert float(guided.mean()) < 0.5 * float(unguided.mean())


def test_classifier_free_guidance_path(digits_model, classifier, x_T):
    loss = losses.target_class(classifier, 3)
    cond = digits_model.cond_for([3])
    x = _sample(digits_model, loss, x_T, "sag", n=2, cond=cond, cfg_scale=2.0)
    assert x.shape == x_T.shape and bool(torch.isfinite(x).all())
    with RoundingChain() as chain:  # the roundings behind each result, counted
        plain = _sample(digits_model, loss, x_T, "none", cond=cond, cfg_scale=2.0)
        expected = sk.solve(
            sk.ClassifierFreeGuidance(digits_model, digits_model.null_cond, 2.0),
            x_T,
            sk.time_grid(digits_model.schedule, 1.0, 0.0, 6),
            cond=cond.expand(3, -1),
        )
    # "none" is the base sampler, DDIM: the same float64 solve, each within γ over its chain
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (plain, expected))
    assert rel(plain, expected) <= pair_bound(*bounds)


def test_step_rules_window_and_renoise():
    delta, g = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    with RoundingChain() as chain:
        rho = rms_step_size(delta, g, scale=0.3)
        moved = (rho.view(-1, 1, 1, 1) * g).flatten(1).pow(2).mean(1).sqrt()
        want = 0.3 * delta.flatten(1).pow(2).mean(1).sqrt()
    # float32, both 0.3 RMS(Δ) in exact arithmetic: per sample, each within γ of its chain
    bound = pair_bound(*(roundoff_bound(chain.longest(r), torch.float32) for r in (moved, want)))
    assert bool(((moved - want).abs() <= bound * want.abs()).all())
    assert float(rms_step_size(delta, torch.zeros_like(g), scale=1.0).abs().sum()) == 0.0
    # 2/√4 and 2/√0.25: correctly rounded operations on exact squares, so exact
    assert torch.equal(
        dps_step_size(torch.tensor([4.0, 0.25]), scale=2.0), torch.tensor([1.0, 4.0])
    )
    guided = guidance_window(100, (0.3, 0.7))
    assert [k for k, on in enumerate(guided) if on] == list(range(30, 70))
    schedule = sk.VPSchedule.linear()
    x = renoise(schedule, torch.zeros(20000), 0.3, 0.5, generator=torch.Generator().manual_seed(0))
    ratio = schedule.alpha(0.5) / schedule.alpha(0.3)
    # the sample std of n normal draws has relative standard error 1/√(2n): allow 6 of them
    assert float(x.std()) == pytest.approx(
        math.sqrt(1 - ratio**2), rel=6 / math.sqrt(2 * x.numel())
    )


def test_bad_input(digits_model, classifier, x_T):
    loss = losses.target_class(classifier, 3)
    with pytest.raises(ValueError, match="guidance"):
        _sample(digits_model, loss, x_T, "universal")
    with pytest.raises(ValueError, match="n must"):
        _sample(digits_model, loss, x_T, "sag", n=0)
    with pytest.raises(ValueError, match="loss_fn"):
        _sample(digits_model, lambda x: x.sum(), x_T, "sag")
    with pytest.raises(ValueError, match="loss_fn"):
        _sample(digits_model, lambda x: x.flatten(1), x_T, "freedom")
    with pytest.raises(ValueError, match="reference"):
        _sample(digits_model, _inpaint_loss(torch.zeros(1, 8, 8)), x_T, "sag")
    with pytest.raises(ValueError, match="window"):
        _sample(digits_model, loss, x_T, "sag", window=(0.7, 0.3))
    with pytest.raises(ValueError, match="repeats"):
        _sample(digits_model, loss, x_T, "sag", repeats=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        _sample(digits_model, loss, x_T, "sag", cfg_scale=2.0)
    with pytest.raises(ValueError, match="cond"):
        _sample(digits_model, loss, x_T, "sag", cond=torch.zeros(2, 32, dtype=torch.float64))


# --- one ε(x_t) for the base step and the estimate (docs/maths.md §8.8) -------------------

# (guidance, n, repeats): FreeDoM (n = 1), SAG with n = 3, with and without time travel
REUSE_CASES = [("freedom", 1, 2), ("sag", 3, 2), ("sag", 3, 1), ("dps", 1, 1)]

# network calls of the estimate's gradient per guided step and repeat, n DDIM steps (s = 1):
# the default "budgeted" engine keeps every graph of the digits UNet (m = n: backprop's n
# calls); the symplectic adjoint and checkpointing evaluate forward and again in backward; a
# budget of 0 keeps no graph (the symplectic adjoint's path).
ENGINE_CALLS = {
    "budgeted": lambda n: n,
    "backprop": lambda n: n,
    "symplectic": lambda n: 2 * n,
    "checkpoint": lambda n: 2 * n,
    "no-graph budget": lambda n: 2 * n,
}


def _engine(name):
    return sk.make_budgeted(budget_bytes=0) if name == "no-graph budget" else name


def _counted_sample(model, loss, x_T, guidance, *, cfg, **kw):
    counting = CountingModel(model)
    if cfg:
        kw.update(cond=model.cond_for([3]), cfg_scale=2.0)
    x = _sample(counting, loss, x_T, guidance, window=(0.0, 0.5), **kw)
    return x, counting.calls


@pytest.mark.parametrize("engine", list(ENGINE_CALLS))
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize(("guidance", "n", "repeats"), REUSE_CASES)
def test_a_guided_step_costs_its_engine_calls_alone(
    digits_model, classifier, x_T, cfg, guidance, n, repeats, engine
):
    """The base step takes ε(x_t) from the estimate's first network call, so a guided step
    costs the engine's calls and no more: FreeDoM one call with the default engine. The
    samples are bit for bit those of the path that calls the network for the base step again
    (``reuse_eps=False``): the first call gives the same floats with and without a graph here
    (checked first), and every base sampler evaluates ε as the estimate's first stage does.

    Calls (a CFG call is one batched call of both branches): steps = 6, window (0, 0.5) guides
    3 of them; an unguided step is 1 call:
        calls = (steps − guided) + guided · repeats · (engine calls + [no reuse]).
    """
    steps, guided = 6, 3
    x = x_T.clone().requires_grad_()
    with torch.enable_grad():
        graph = digits_model.eps(x, 0.5)
    assert torch.equal(graph.detach(), digits_model.eps(x_T, 0.5))  # the premise
    loss = losses.target_class(classifier, 3)
    kw = {"n": n, "repeats": repeats, "seed": 4, "gradient": _engine(engine)}
    new, calls = _counted_sample(digits_model, loss, x_T, guidance, cfg=cfg, **kw)
    old, old_calls = _counted_sample(
        digits_model, loss, x_T, guidance, cfg=cfg, reuse_eps=False, **kw
    )
    assert torch.equal(new, old)
    per_step = ENGINE_CALLS[engine](n)
    assert calls == (steps - guided) + guided * repeats * per_step
    assert old_calls == (steps - guided) + guided * repeats * (per_step + 1)
    if guidance == "freedom" and engine == "budgeted":
        assert per_step == 1  # FreeDoM at one network evaluation per guided step


def test_schedulers_share_the_first_call_too(digits_model, classifier, x_T):
    """A diffusers scheduler's base step evaluates ε as the estimate's first stage does, so
    sharing it changes no bit there either."""
    from diffusers import DPMSolverMultistepScheduler

    dpm = DPMSolverMultistepScheduler.from_config(digits_model.scheduler.config)
    loss = losses.target_class(classifier, 3)
    kw = {"n": 2, "seed": 4, "sampler": dpm, "estimate_grid": "sampler"}
    shared, _ = _counted_sample(digits_model, loss, x_T, "sag", cfg=False, **kw)
    again, _ = _counted_sample(digits_model, loss, x_T, "sag", cfg=False, reuse_eps=False, **kw)
    assert torch.equal(shared, again)
