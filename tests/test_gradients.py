"""The gradient engines: exactness against backprop, finite differences, the vanilla adjoint's
convergence, and clear errors for bad input."""

import pytest
import torch
from conftest import tiny_unet

import sagkit as sk
from sagkit.gradients import GradientMethod

SOLVERS = ("ddim", "heun", "rk4")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # symplectic vs backprop, relative


def rel(a, b):
    if isinstance(a, tuple):  # parameters: the concatenation of all of them
        a = torch.cat([t.flatten() for t in a])
        b = torch.cat([t.flatten() for t in b])
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_loss(seed=1):
    """L(x) = Σ_b [½‖x_b − target_b‖² + (sin x_b)·w] — nonlinear, per sample (B,) values."""
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(x):
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
        w = torch.randn(x.shape[1:], generator=gen.manual_seed(seed + 1)).to(x)
        return 0.5 * (x - target).flatten(1).pow(2).sum(1) + (torch.sin(x) * w).flatten(1).sum(1)

    return loss_fn


def grid(model, n=4, t_start=0.8):
    return sk.time_grid(model.schedule, t_start, model.schedule.t_min, n)


def noise(model_or_shape, batch=2, dtype=torch.float64, seed=0):
    shape = model_or_shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen, dtype=torch.float64).to(dtype)


def unet_cond_model(scheduler, dtype):
    """A tiny UNet with a continuous class embedding: cond of shape (B, 32)."""
    unet = tiny_unet(class_embed_type="identity").eval()
    return sk.DiffusersModel(unet, scheduler).to(dtype)


# --- exactness: symplectic and checkpoint against backprop ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("which", ["mixture", "digits_mixture", "unet_model"])
def test_symplectic_and_checkpoint_match_backprop_wrt_x(request, which, solver, dtype):
    model = request.getfixturevalue(which).to(dtype)
    x = noise(model.means.shape[1:] if which != "unet_model" else (1, 8, 8), dtype=dtype)
    ts, loss_fn = grid(model), make_loss()
    loss_bp, g_bp = sk.loss_grad(model, loss_fn, x, ts, method="backprop", solver=solver)
    loss_sy, g_sy = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver=solver)
    loss_ck, g_ck = sk.loss_grad(model, loss_fn, x, ts, method="checkpoint", solver=solver)
    assert g_sy.shape == x.shape and g_sy.dtype == dtype
    assert loss_sy == loss_bp and loss_ck == loss_bp  # the same forward, bit for bit
    assert rel(g_sy, g_bp) <= TOL[dtype]
    assert torch.equal(g_ck, g_bp)  # checkpoint replays the same operations


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", SOLVERS)
def test_symplectic_wrt_cond_and_params_on_the_mixture(mixture, solver, dtype):
    model = mixture.to(dtype).requires_grad_()
    x = noise((1, 2, 2), batch=3, dtype=dtype)
    cond = noise((3,), batch=3, dtype=dtype, seed=5)  # (B, K) logits added to log π
    ts, loss_fn, wrt = grid(model), make_loss(), ("x", "cond", "params")
    _, bp = sk.loss_grad(model, loss_fn, x, ts, "backprop", solver, cond=cond, wrt=wrt)
    _, sy = sk.loss_grad(model, loss_fn, x, ts, "symplectic", solver, cond=cond, wrt=wrt)
    _, ck = sk.loss_grad(model, loss_fn, x, ts, "checkpoint", solver, cond=cond, wrt=wrt)
    assert sy[1].shape == cond.shape and len(sy[2]) == 1 and sy[2][0].shape == model.means.shape
    for got, want in zip(sy, bp, strict=True):
        assert rel(got, want) <= TOL[dtype]
    for got, want in zip(ck, bp, strict=True):
        assert rel(got, want) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", SOLVERS)
def test_symplectic_wrt_cond_and_params_on_a_unet(scheduler, solver, dtype):
    model = unet_cond_model(scheduler, dtype)
    x = noise((1, 8, 8), dtype=dtype)
    cond = noise((32,), dtype=dtype, seed=7)  # continuous class embedding (B, time_embed_dim)
    ts, loss_fn = grid(model, n=3), make_loss()
    for wrt in ("cond", "params"):
        _, bp = sk.loss_grad(model, loss_fn, x, ts, "backprop", solver, cond=cond, wrt=wrt)
        _, sy = sk.loss_grad(model, loss_fn, x, ts, "symplectic", solver, cond=cond, wrt=wrt)
        assert rel(sy, bp) <= TOL[dtype], wrt
    assert len(sy) == len(list(model.parameters()))


def test_symplectic_grad_for_a_single_wrt_keeps_the_others_out(mixture):
    """wrt="cond" alone: the result is cond's gradient, and x's leaf is never required."""
    x, cond = noise((1, 2, 2), batch=3), noise((3,), batch=3, seed=2)
    ts, loss_fn = grid(mixture), make_loss()
    _, g = sk.loss_grad(mixture, loss_fn, x, ts, "symplectic", cond=cond, wrt="cond")
    _, want = sk.loss_grad(mixture, loss_fn, x, ts, "backprop", cond=cond, wrt="cond")
    assert g.shape == cond.shape and rel(g, want) <= 1e-10
    assert not x.requires_grad and not cond.requires_grad


def test_one_gaussian_gradient_is_the_closed_form_jacobian():
    """K = 1: ∂x_s/∂x_t = sqrt(v_s / v_t) I for the exact flow; n-step RK4 gets close."""
    mean = torch.tensor([[[[0.5, -0.2], [0.1, 0.3]]]], dtype=torch.float64)
    model = sk.GaussianMixture(mean, 0.5, sk.VPSchedule.linear())
    x = noise((1, 2, 2), batch=1)
    ts = sk.time_grid(model.schedule, 0.5, 0.0, 64)
    _, g = sk.loss_grad(model, lambda out: out.sum(), x, ts, "symplectic", "rk4")
    v = lambda t: model.schedule.alpha(t) ** 2 * 0.25 + model.schedule.sigma(t) ** 2  # noqa: E731
    expected = (v(0.0) / v(0.5)) ** 0.5
    assert torch.allclose(g, torch.full_like(g, expected), rtol=1e-6)


# --- finite differences: the referee ---------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("which", ["mixture", "digits_mixture", "unet_model"])
def test_finite_differences_agree_with_float64_backprop(request, which, solver):
    model = request.getfixturevalue(which)
    x = noise(model.means.shape[1:] if which != "unet_model" else (1, 8, 8))
    v = noise(x.shape[1:], seed=3)
    ts, loss_fn = grid(model), make_loss()
    _, g = sk.loss_grad(model, loss_fn, x, ts, method="backprop", solver=solver)
    fd = sk.finite_difference(model, loss_fn, x, ts, v, solver=solver)
    assert isinstance(fd, float)
    assert abs(fd - float((g * v).sum())) <= 1e-6 * abs(fd)


def test_richardson_improves_on_the_plain_central_difference(mixture):
    x, v = noise((1, 2, 2), batch=3), noise((1, 2, 2), batch=3, seed=4)
    ts, loss_fn = grid(mixture), make_loss()
    _, g = sk.loss_grad(mixture, loss_fn, x, ts, method="backprop")
    exact = float((g * v).sum())
    plain = sk.finite_difference(mixture, loss_fn, x, ts, v, delta=1e-2, richardson=False)
    extrapolated = sk.finite_difference(mixture, loss_fn, x, ts, v, delta=1e-2)
    assert abs(extrapolated - exact) < abs(plain - exact) / 10


def test_finite_difference_refuses_anything_but_float64(mixture):
    x, v = noise((1, 2, 2), batch=3), noise((1, 2, 2), batch=3, seed=4)
    ts, loss_fn = grid(mixture), make_loss()
    with pytest.raises(TypeError, match="float64"):
        sk.finite_difference(mixture, loss_fn, x.float(), ts, v)
    with pytest.raises(TypeError, match="float64"):
        sk.finite_difference(mixture, loss_fn, x, ts, v.float())
    with pytest.raises(TypeError, match="model parameter"):
        sk.finite_difference(mixture.float(), loss_fn, x, ts, v)
    with pytest.raises(ValueError, match="shape"):
        sk.finite_difference(mixture.double(), loss_fn, x, ts, v[:1])
    with pytest.raises(ValueError, match="delta"):
        sk.finite_difference(mixture.double(), loss_fn, x, ts, v, delta=0.0)


# --- the vanilla continuous adjoint: approximate, converging with n --------------------------


def decreasing(values):
    return all(values[i + 1] < values[i] for i in range(len(values) - 1))


def adjoint_errors(model, x, ns, solver="ddim", cond=None, wrt="x", t_end=0.0):
    loss_fn, errors = make_loss(), []
    for n in ns:
        ts = sk.time_grid(model.schedule, 0.8, t_end, n)
        _, exact = sk.loss_grad(model, loss_fn, x, ts, "backprop", solver, cond=cond, wrt=wrt)
        _, approx = sk.loss_grad(model, loss_fn, x, ts, "adjoint", solver, cond=cond, wrt=wrt)
        errors.append(rel(approx, exact))
    return errors


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


def test_registry_flags():
    assert {"backprop", "checkpoint", "symplectic", "adjoint"} <= set(sk.METHODS)
    assert sk.METHODS["symplectic"].exact and sk.METHODS["checkpoint"].exact
    assert not sk.METHODS["adjoint"].exact
    for name in ("backprop", "checkpoint", "symplectic", "adjoint"):
        assert sk.METHODS[name].description


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["backprop", "checkpoint", "symplectic", "adjoint"])
def test_bad_losses_are_rejected_by_every_method(mixture, method):
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    with pytest.raises(ValueError, match="scalar or \\(3,\\)"):
        sk.loss_grad(mixture, lambda out: out, x, ts, method=method)
    with pytest.raises(ValueError, match="non-finite"):
        sk.loss_grad(mixture, lambda out: out.sum() * float("nan"), x, ts, method=method)
    with pytest.raises(ValueError, match="non-finite"):
        sk.loss_grad(mixture, lambda out: out.sum() + float("inf"), x, ts, method=method)
    with pytest.raises(TypeError, match="tensor"):
        sk.loss_grad(mixture, lambda out: 1.0, x, ts, method=method)


def test_scalar_and_per_sample_losses_agree(mixture):
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    per_sample = make_loss()
    l1, g1 = sk.loss_grad(mixture, per_sample, x, ts, method="symplectic")
    l2, g2 = sk.loss_grad(mixture, lambda out: per_sample(out).sum(), x, ts, method="symplectic")
    assert l1 == l2 and torch.equal(g1, g2)


def test_unknown_method_solver_and_wrt(mixture):
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    with pytest.raises(ValueError, match="unknown method 'magic'.*symplectic"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="magic")
    with pytest.raises(ValueError, match="unknown solver"):
        sk.loss_grad(mixture, make_loss(), x, ts, solver="euler-maruyama")
    with pytest.raises(ValueError, match="wrt must be"):
        sk.loss_grad(mixture, make_loss(), x, ts, wrt="t")
    with pytest.raises(ValueError, match="needs a cond"):
        sk.loss_grad(mixture, make_loss(), x, ts, wrt="cond")
    with pytest.raises(ValueError, match="requires_grad_"):  # the mixture's means are frozen
        sk.loss_grad(mixture, make_loss(), x, ts, method="symplectic", wrt="params")


def test_wrt_unsupported_by_a_method_is_rejected(mixture, monkeypatch):
    only_x = GradientMethod("only-x", sk.METHODS["backprop"].fn, ("x",), True, "test double")
    monkeypatch.setitem(sk.METHODS, "only-x", only_x)
    x, ts, cond = noise((1, 2, 2), batch=3), grid(mixture), noise((3,), batch=3)
    with pytest.raises(ValueError, match="supports wrt in \\('x',\\), not \\('cond',\\)"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="only-x", cond=cond, wrt="cond")


def test_tableaus_with_a_zero_weight_are_rejected(mixture, monkeypatch):
    # a valid explicit tableau whose second stage has weight b_2 = 0
    odd = sk.Tableau("zero-weight", a=((), (0.5,)), b=(1.0, 0.0), c=(0.0, 0.5), order=1)
    monkeypatch.setitem(sk.SOLVERS, odd.name, odd)
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    sk.loss_grad(mixture, make_loss(), x, ts, method="backprop", solver=odd.name)  # fine
    with pytest.raises(ValueError, match="b_i nonzero.*zero-weight"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="symplectic", solver=odd.name)
    with pytest.raises(ValueError, match="no torchdiffeq counterpart"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="adjoint", solver=odd.name)


def test_symplectic_works_for_a_newly_registered_tableau(mixture, monkeypatch):
    """Every tableau in the registry: here Ralston's 3-stage third-order method."""
    ralston = sk.Tableau(
        "ralston3",
        a=((), (0.5,), (0.0, 0.75)),
        b=(2 / 9, 1 / 3, 4 / 9),
        c=(0.0, 0.5, 0.75),
        order=3,
    )
    monkeypatch.setitem(sk.SOLVERS, ralston.name, ralston)
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    _, bp = sk.loss_grad(mixture, make_loss(), x, ts, "backprop", ralston.name)
    _, sy = sk.loss_grad(mixture, make_loss(), x, ts, "symplectic", ralston.name)
    assert rel(sy, bp) <= 1e-10
