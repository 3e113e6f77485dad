"""CUDA runs of the engines and the samplers; skipped on machines without a GPU."""

import copy

import pytest
import torch
from helpers import RoundingChain, pair_bound, rel, roundoff_bound

import sagkit as sk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture
def ieee_float32():
    """float32 convolutions and products as IEEE float32: cuDNN's default TF32 keeps 10
    mantissa bits (u = 2⁻¹¹, not float32's 2⁻²⁴), a coarser format than the bounds assume."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["ddim", "heun", "rk4"])
def test_symplectic_matches_backprop_on_cuda(unet_model, solver, dtype, ieee_float32):
    reference = copy.deepcopy(unet_model).to(device="cuda")  # float64: the same weights exactly
    model = unet_model.to(device="cuda", dtype=dtype)
    x = torch.randn(2, 1, 8, 8, device="cuda", dtype=dtype)
    ts = sk.time_grid(model.schedule, 0.8, 0.0, 6)

    def loss(y):
        return y.pow(2).flatten(1).sum(1)

    with RoundingChain() as chain:  # the roundings behind each gradient, counted
        _, g_bp = sk.loss_grad(model, loss, x, ts, method="backprop", solver=solver)
        _, g_sa = sk.loss_grad(model, loss, x, ts, method="symplectic", solver=solver)
        _, g_64 = sk.loss_grad(reference, loss, x.double(), ts, method="backprop", solver=solver)
    assert g_sa.device.type == "cuda"
    bounds = {  # each gradient within its rounding bound of the exact one, as is the float64 one
        name: roundoff_bound(chain.longest(g), dtype) for name, g in (("bp", g_bp), ("sa", g_sa))
    }
    ref_bound = roundoff_bound(chain.longest(g_64), torch.float64)
    assert rel(g_bp, g_64) <= pair_bound(bounds["bp"], ref_bound)
    assert rel(g_sa, g_64) <= pair_bound(bounds["sa"], ref_bound)
    assert rel(g_sa, g_bp) <= pair_bound(bounds["sa"], bounds["bp"])  # the triangle inequality


def test_cuda_peak_is_reported_and_symplectic_is_flat(unet_model):
    model = unet_model.to(device="cuda", dtype=torch.float32)
    x = torch.randn(2, 1, 8, 8, device="cuda")

    def loss(y):
        return y.pow(2).flatten(1).sum(1)

    peaks = {}
    for method in ("backprop", "symplectic"):
        for n in (8, 64):
            ts = sk.time_grid(model.schedule, 0.8, 0.0, n)
            report = sk.lab.profile_gradient(model, loss, x, ts, method=method)
            assert report.cuda_peak_bytes is not None and report.cuda_peak_bytes > 0
            peaks[method, n] = report.saved_bytes
    assert peaks["symplectic", 64] * 10 <= peaks["backprop", 64]


def test_guided_sampling_on_cuda():
    model = sk.digits.load_pretrained("digits", device="cuda")
    classifier = sk.digits.load_classifier("digits", device="cuda")
    x_T = torch.randn(4, 1, 16, 16, device="cuda")
    out = sk.guided_sample(
        model,
        sk.losses.target_class(classifier, 3),
        x_T,
        steps=10,
        guidance="sag",
        n=2,
        progress=False,
    )
    assert out.device.type == "cuda" and torch.isfinite(out).all()


@pytest.mark.parametrize("engine", ["budgeted", "symplectic"])
def test_guided_sampling_on_cuda_matches_the_cpu(engine, ieee_float32):
    """float64 on CUDA and on the CPU: the same guided run within the two runs' counted
    rounding bounds, with the default engine and the symplectic adjoint."""
    runs = {}
    with RoundingChain() as chain:
        for device in ("cpu", "cuda"):
            model = sk.digits.load_pretrained("digits", device=device, dtype=torch.float64)
            classifier = sk.digits.load_classifier("digits", device=device, dtype=torch.float64)
            x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
            runs[device] = sk.guided_sample(
                model, sk.losses.target_class(classifier, 3), x_T.double().to(device),
                steps=6, window=(0.0, 1.0), n=2, gradient=engine, progress=False,
                generator=torch.Generator(device).manual_seed(1),
            ).cpu()  # fmt: skip
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in runs.values())
    assert rel(runs["cuda"], runs["cpu"]) <= pair_bound(*bounds)


def test_bfloat16_weights_guide_in_float32_on_cuda():
    model = sk.digits.load_pretrained("digits", device="cuda", dtype=torch.bfloat16)
    classifier = sk.digits.load_classifier("digits", device="cuda")
    x_T = torch.randn(4, 1, 16, 16, device="cuda")
    out = sk.guided_sample(
        model, sk.losses.target_class(classifier, 3), x_T, steps=10, n=3, progress=False
    )
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_x_on_another_device_than_the_model_is_a_clear_error():
    """Issue 13 (was B): x on the CPU with the model on CUDA, and the reverse."""
    model = sk.digits.load_pretrained("digits", device="cuda")
    grid = sk.time_grid(model.schedule, 1.0, model.schedule.t_min, 2)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="x is on cpu but the model is on cuda"):
        sk.solve(model, x, grid)
    with pytest.raises(ValueError, match="cond is on cpu but the model is on cuda"):
        sk.solve(model, x.cuda(), grid, cond=model.cond_for([1, 2]).cpu())
