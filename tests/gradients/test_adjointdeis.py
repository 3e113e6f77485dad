"""AdjointDEIS: orders on exact models, a_z and a_θ against finite differences, bad input."""

import pytest
import torch
from helpers import (
    BOTH_SCHEDULES,
    SCHEDULES,
    RoundingChain,
    pair_bound,
    rel,
    roundoff_bound,
    tiny_unet,
    top_time,
)

import sagkit as sk
from sagkit.core.frames import VelocityFrame
from sagkit.gradients.adjointdeis import adjointdeis_grad
from sagkit.gradients.reference import exact_gradient
from sagkit.lab.convergence import convergence_study, convergence_table

VARIANTS = [(order, param) for order in (1, 2) for param in (None, "data")]
"""Each order in the schedule's own frame (None: ε under VP, the velocity under flow) and in data."""


def _linear_loss(shape, seed=0, quadratic=False):
    c = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def loss(y):
        out = (c * y).flatten(1).sum(1)
        return out + (y**2).flatten(1).sum(1) if quadratic else out

    return loss


@pytest.fixture(params=list(SCHEDULES))
def gaussian(request):
    """One Gaussian on 2×2 images, under the VP schedule and the rectified flow: the ODE and SDE
    flows are linear, the gradient closed form."""
    mu = torch.tensor([[[0.5, -0.3], [0.2, 0.8]]], dtype=torch.float64)[:, None]
    return sk.GaussianMixture(mu, 0.3, SCHEDULES[request.param])


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_orders_ode_one_gaussian(gaussian):
    x = _x((2, 1, 2, 2))
    loss = _linear_loss(x.shape, quadratic=True)
    study = convergence_study(gaussian, loss, x, steps=(40, 80, 160), t_start=0.5)
    slopes = study["slopes"]
    print(convergence_table(study))
    params = ("eps", "data") + (("velocity",) if gaussian.schedule.ode is VelocityFrame else ())
    for param in params:
        assert abs(slopes[f"adjointdeis-1 ({param})"] - 1) < 0.3
        assert abs(slopes[f"adjointdeis-2M ({param})"] - 2) < 0.3
    assert abs(slopes["backprop (ddim)"] - 1) < 0.3
    assert study["reference"]["kind"].startswith("closed form")


def test_orders_sde_one_gaussian(gaussian):
    x = _x((2, 1, 2, 2))
    # The data-SDE frame is pre-asymptotic near t = 0 (τ = α/σ → ∞) while M is small: to
    # t_end = 1e-3 its order-1 slope under the flow is 0.44 over M = 40–160 and 0.86 only from
    # 320 to 640. Stopping at t_end = 0.05 the same orders show from M = 40: the fitted slopes
    # over M = 40, 80, 160 are 0.93–0.95 (order 1) and 1.90–2.06 (order 2) under both schedules,
    # each local slope within 0.04 of its fit, residuals ≤ 4e-4 (a 2-point fit at 320–640 before).
    steps = (40, 80, 160)
    study = convergence_study(
        gaussian,
        _linear_loss(x.shape),
        x,
        steps=steps,
        t_start=0.5,
        t_end=0.05,
        sde=True,
        fit_last=len(steps),
    )
    slopes = study["slopes"]
    print(convergence_table(study))
    for param in ("eps", "data"):
        assert abs(slopes[f"adjointdeis-1 ({param})"] - 1) < 0.3
        assert abs(slopes[f"adjointdeis-2M ({param})"] - 2) < 0.3


def test_exact_gradient_matches_fine_backprop(gaussian):
    x = _x((2, 1, 2, 2))
    loss = _linear_loss(x.shape, quadratic=True)
    _, ref = exact_gradient(gaussian, loss, x, 0.5, 1e-3)
    errors = []
    for n in (100, 200):
        ts = sk.time_grid(gaussian.schedule, 0.5, 1e-3, n, spacing="lambda")
        _, g = sk.loss_grad(gaussian, loss, x, ts, method="backprop", solver="rk4")
        errors.append(rel(g, ref))
    # RK4's O(h⁴) error shrinks by 2⁴ per halving of h in the limit: demand at least 2³; an
    # exact gradient that is not the limit would leave an error that does not shrink
    assert errors[1] <= errors[0] / 2**3, errors


def _fd(loss_at, delta=1e-4):
    return (loss_at(delta) - loss_at(-delta)) / (2 * delta)


def _dir_error(g, v, fd):
    """|⟨g, v⟩ − FD| relative to ‖g‖‖v‖ (robust where ⟨g, v⟩ happens to be small)."""
    return abs(float((g * v).sum()) - fd) / float(g.norm() * v.norm())


@BOTH_SCHEDULES
def test_cond_and_params_against_finite_differences(mixture):
    """a_x, a_z (logits) and a_θ (the means) converge to central differences of a fine solve."""
    x, cond = _x((3, 1, 2, 2)), _x((3, 3), seed=2)
    loss = _linear_loss(x.shape, quadratic=True)
    fine = sk.time_grid(mixture.schedule, 0.5, 1e-3, 200, spacing="lambda")
    gen = torch.Generator().manual_seed(3)
    vx, vc, vm = (
        torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, cond, mixture.means)
    )

    @torch.no_grad()
    def L(xx=x, cc=cond, dm=0.0):
        mixture.means += dm * vm
        out = float(loss(sk.solve(mixture, xx, fine, solver="rk4", cond=cc)).sum())
        mixture.means -= dm * vm
        return out

    fd = (
        _fd(lambda d: L(xx=x + d * vx)),
        _fd(lambda d: L(cc=cond + d * vc)),
        _fd(lambda d: L(dm=d)),
    )
    mixture.requires_grad_()
    for param in ("eps", "data"):
        errors = []
        for m in (80, 160):
            ts = sk.time_grid(mixture.schedule, 0.5, 1e-3, m, spacing="lambda")
            _, (gx, gc, (gm,)) = adjointdeis_grad(
                mixture,
                loss,
                x,
                ts,
                order=2,
                parameterisation=param,
                cond=cond,
                wrt=("x", "cond", "params"),
                solver="rk4",
            )
            pairs = ((gx, vx), (gc, vc), (gm, vm))
            errors.append([_dir_error(g, v, f) for (g, v), f in zip(pairs, fd, strict=True)])
        for coarse, finer in zip(*errors, strict=True):
            assert finer < 1e-2
            assert finer < coarse / 2.5  # second order: about 4 per halving


def smooth_unet():
    """A tiny random conditional UNet on a continuous linear schedule, called at 10·t − 1.

    The sinusoidal time embedding then varies slowly in t, so the ODE is smooth and a fine
    RK4 solve is an accurate reference (on a 1000-step discrete schedule the random network
    oscillates with a period of a few timesteps).
    """
    schedule = sk.VPSchedule.linear()
    schedule.num_train_timesteps = 10
    unet = tiny_unet(class_embed_type="identity").double().eval()
    return sk.DiffusersModel(unet, schedule)


def test_unet_cond_and_params_against_finite_differences():
    model = smooth_unet()
    x, z = _x((2, 1, 8, 8)), _x((2, 32), seed=2)
    loss = _linear_loss(x.shape)
    p = list(model.parameters())[-3]
    gen = torch.Generator().manual_seed(3)
    vz, vp = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (z, p))
    fine = sk.time_grid(model.schedule, 0.5, 1e-3, 24, spacing="lambda")

    @torch.no_grad()
    def L(zz=z, dp=0.0):
        p.add_(dp * vp)
        out = float(loss(sk.solve(model, x, fine, solver="rk4", cond=zz)).sum())
        p.sub_(dp * vp)
        return out

    fd = (_fd(lambda d: L(zz=z + d * vz), 1e-5), _fd(lambda d: L(dp=d), 1e-5))
    model.requires_grad_(False)
    p.requires_grad_(True)
    errors = []
    for m in (20, 40):
        ts = sk.time_grid(model.schedule, 0.5, 1e-3, m, spacing="lambda")
        _, (gz, (gp,)) = adjointdeis_grad(
            model,
            loss,
            x,
            ts,
            order=2,
            parameterisation="eps",
            cond=z,
            wrt=("cond", "params"),
            solver="rk4",
        )
        errors.append([_dir_error(g, v, f) for g, v, f in ((gz, vz, fd[0]), (gp, vp, fd[1]))])
    for coarse, finer in zip(*errors, strict=True):
        assert finer < 2e-2
        assert finer < coarse


@BOTH_SCHEDULES
def test_resolved_eps_1_is_the_vanilla_euler_adjoint(mixture, scheduler):
    """AdjointDEIS-1 (ε) with re-solved states is algebraically torchdiffeq's Euler adjoint in (y, ρ)
    (in the velocity frame under the flow), on the mixture and (VP) on a tiny UNet."""
    wrt = ("x", "cond", "params")
    cases = [(mixture, _x((3, 1, 2, 2)), _x((3, 3), 2), sk.time_grid(mixture.schedule, 1, 0, 10))]
    if isinstance(mixture.schedule, sk.VPSchedule):  # the UNet is VP: its case runs once
        unet = sk.DiffusersModel(tiny_unet(class_embed_type="identity").double().eval(), scheduler)
        cases.append(
            (unet, _x((2, 1, 8, 8)), _x((2, 32), 2), sk.time_grid(unet.schedule, 1, 1e-3, 5))
        )
    for model, x, cond, ts in cases:
        model.requires_grad_()
        loss = _linear_loss(x.shape, quadratic=True)
        with RoundingChain() as chain:  # the roundings behind each result, counted
            _, a = adjointdeis_grad(
                model, loss, x, ts, order=1, states="resolved", cond=cond, wrt=wrt
            )
            _, b = sk.loss_grad(model, loss, x, ts, method="adjoint", cond=cond, wrt=wrt)
        # two float64 orderings of the same arithmetic, each within γ over its counted chain;
        # the parameters together (one of the UNet's has an exactly vanishing gradient)
        for name, ga, gb in zip(wrt, a, b, strict=True):
            bounds = (roundoff_bound(chain.longest(g), torch.float64) for g in (ga, gb))
            assert rel(ga, gb) <= pair_bound(*bounds), name


@BOTH_SCHEDULES
def test_resolved_states_approach_stored_ones(mixture):
    """Re-solving the state backwards (DDIM inversion) departs from the stored trajectory by O(h)."""
    x = _x((3, 1, 2, 2))
    loss = _linear_loss(x.shape, quadratic=True)
    gap = []
    for m in (20, 40, 80):
        ts = sk.time_grid(mixture.schedule, top_time(mixture.schedule), 1e-3, m, spacing="lambda")
        g = {
            s: adjointdeis_grad(mixture, loss, x, ts, order=1, states=s)[1]
            for s in ("stored", "resolved")
        }
        gap.append(float((g["stored"] - g["resolved"]).norm() / g["stored"].norm()))
    assert gap[0] > 0 and gap[2] < gap[1] < gap[0]


def test_registered_methods_match_the_function(mixture):
    x = _x((3, 1, 2, 2))
    loss = _linear_loss(x.shape)
    ts = sk.time_grid(mixture.schedule, top_time(mixture.schedule), 1e-3, 8, spacing="lambda")
    for order, param in VARIANTS:
        name = f"adjointdeis-{order}" + ("-data" if param == "data" else "")
        loss_a, ga = sk.loss_grad(mixture, loss, x, ts, method=name)
        loss_b, gb = adjointdeis_grad(mixture, loss, x, ts, order=order, parameterisation=param)
        assert torch.equal(ga, gb) and torch.equal(loss_a, loss_b)
        assert not sk.METHODS[name].exact


def test_bad_input(mixture):
    x = _x((3, 1, 2, 2))
    loss = _linear_loss(x.shape)
    ts = sk.time_grid(mixture.schedule, top_time(mixture.schedule), 1e-3, 4, spacing="lambda")
    with pytest.raises(ValueError, match="unknown parameterisation 'v'"):
        adjointdeis_grad(mixture, loss, x, ts, parameterisation="v")
    with pytest.raises(ValueError, match="noise realisation"):
        adjointdeis_grad(mixture, loss, x, ts, sde=True)
    with pytest.raises(ValueError, match="order must be 1"):
        adjointdeis_grad(mixture, loss, x, ts, order=3)
    with pytest.raises(ValueError, match="states must be"):
        adjointdeis_grad(mixture, loss, x, ts, states="recomputed")
    with pytest.raises(ValueError, match="ODE only"):
        adjointdeis_grad(
            mixture, loss, x, ts, states="resolved", sde=True, noise=torch.zeros(4, *x.shape)
        )
    with pytest.raises(ValueError, match=r"ts\[-1\] > 0"):
        adjointdeis_grad(
            mixture, loss, x, sk.time_grid(mixture.schedule, 1, 0, 4), parameterisation="data"
        )
    with pytest.raises(ValueError, match="noise must have shape"):
        adjointdeis_grad(mixture, loss, x, ts, sde=True, noise=torch.zeros(3, *x.shape))
    with pytest.raises(ValueError, match="needs a cond"):
        adjointdeis_grad(mixture, loss, x, ts, wrt="cond")


def test_sde_study_needs_a_linear_loss(gaussian):
    x = _x((2, 1, 2, 2))
    with pytest.raises(ValueError, match="constant gradient"):
        convergence_study(
            gaussian, _linear_loss(x.shape, quadratic=True), x, steps=(4, 8), sde=True
        )
