"""loss_grad and the method registry: bad losses, unknown names, unsupported wrt and solvers, new tableaus."""

import re

import pytest
import torch
from helpers import BOTH_SCHEDULES, F64_AGREE, grid, make_loss, noise, rel

import sagkit as sk
from sagkit.gradients import GradientMethod

SOLVERS = ("ddim", "heun", "rk4")
# a valid explicit tableau whose second stage has weight b_2 = 0
ZERO_WEIGHT = sk.Tableau("zero-weight", a=((), (0.5,)), b=(1.0, 0.0), c=(0.0, 0.5), order=1)


@BOTH_SCHEDULES
@pytest.mark.parametrize("solver", ["ddim", "heun", "rk4", "zero-weight"])
@pytest.mark.parametrize("method", list(sk.METHODS))
def test_declarations_match_behaviour(mixture, method, solver, register_temporarily):
    """What an engine declares is what it does: it runs exactly the solvers and grids it says it
    supports, and it is exact (within F64_AGREE of float64 backprop) exactly when it says so."""
    register_temporarily(sk.SOLVERS, ZERO_WEIGHT.name, ZERO_WEIGHT)
    engine = sk.METHODS[method]
    x = noise((1, 2, 2), batch=3)
    for ts in (grid(mixture), sk.time_grid(mixture.schedule, 0.8, 0.0, 4)):  # ends at t_min, 0
        if not engine.supports(solver, ts):
            with pytest.raises(ValueError, match=re.escape(engine.refusal(solver, ts))):
                sk.loss_grad(mixture, make_loss(), x, ts, method=method, solver=solver)
            continue
        _, g = sk.loss_grad(mixture, make_loss(), x, ts, method=method, solver=solver)
        _, ref = sk.loss_grad(mixture, make_loss(), x, ts, method="backprop", solver=solver)
        assert (rel(g, ref) <= F64_AGREE) == engine.exact, (method, solver, rel(g, ref))


def test_registries_refuse_duplicates_and_name_the_known_entries(register_temporarily):
    with pytest.raises(ValueError, match="'ddim' is already registered.*replace=True"):
        sk.register_solver(sk.Tableau("ddim", a=((),), b=(1.0,), c=(0.0,), order=1))
    assert sk.SOLVERS["ddim"].name == "ddim"  # the built-in survives
    with pytest.raises(ValueError, match="'backprop' is already registered"):
        sk.register_method(sk.METHODS["symplectic"].__class__("backprop", print, ("x",), True, ""))
    with pytest.raises(KeyError, match="unknown guidance 'x'; known: none, freedom, dps, sag"):
        sk.GUIDANCE["x"]  # an UnknownNameError is a KeyError and a ValueError


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


def test_wrt_unsupported_by_a_method_is_rejected(mixture, register_temporarily):
    only_x = GradientMethod("only-x", sk.METHODS["backprop"].fn, ("x",), True, "test double")
    register_temporarily(sk.METHODS, "only-x", only_x)
    x, ts, cond = noise((1, 2, 2), batch=3), grid(mixture), noise((3,), batch=3)
    with pytest.raises(ValueError, match="supports wrt in \\('x',\\), not \\('cond',\\)"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="only-x", cond=cond, wrt="cond")


def test_tableaus_with_a_zero_weight_are_rejected(mixture, register_temporarily):
    register_temporarily(sk.SOLVERS, ZERO_WEIGHT.name, ZERO_WEIGHT)
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    sk.loss_grad(mixture, make_loss(), x, ts, method="backprop", solver="zero-weight")  # fine
    with pytest.raises(ValueError, match="weights b_i are all nonzero.*not solver 'zero-weight'"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="symplectic", solver="zero-weight")
    with pytest.raises(ValueError, match="torchdiffeq counterpart \\(ddim, heun, rk4\\)"):
        sk.loss_grad(mixture, make_loss(), x, ts, method="adjoint", solver="zero-weight")


def test_symplectic_works_for_a_newly_registered_tableau(mixture, register_temporarily):
    """Every tableau in the registry: here Ralston's 3-stage third-order method."""
    ralston = sk.Tableau(
        "ralston3",
        a=((), (0.5,), (0.0, 0.75)),
        b=(2 / 9, 1 / 3, 4 / 9),
        c=(0.0, 0.5, 0.75),
        order=3,
    )
    register_temporarily(sk.SOLVERS, ralston.name, ralston)
    x, ts = noise((1, 2, 2), batch=3), grid(mixture)
    _, bp = sk.loss_grad(mixture, make_loss(), x, ts, method="backprop", solver=ralston.name)
    _, sy = sk.loss_grad(mixture, make_loss(), x, ts, method="symplectic", solver=ralston.name)
    assert rel(sy, bp) <= F64_AGREE
