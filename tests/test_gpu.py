"""CUDA runs of the engines and the samplers; skipped on machines without a GPU."""

import pytest
import torch

import sagkit as sk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("solver", ["ddim", "heun", "rk4"])
def test_symplectic_matches_backprop_on_cuda(unet_model, solver, dtype, tol):
    model = unet_model.to(device="cuda", dtype=dtype)
    x = torch.randn(2, 1, 8, 8, device="cuda", dtype=dtype)
    ts = sk.time_grid(model.schedule, 0.8, 0.0, 6)

    def loss(y):
        return y.pow(2).flatten(1).sum(1)

    _, g_bp = sk.loss_grad(model, loss, x, ts, method="backprop", solver=solver)
    _, g_sa = sk.loss_grad(model, loss, x, ts, method="symplectic", solver=solver)
    assert g_sa.device.type == "cuda"
    assert float((g_sa - g_bp).norm() / g_bp.norm()) < tol


def test_cuda_peak_is_reported_and_symplectic_is_flat(unet_model):
    model = unet_model.to(device="cuda", dtype=torch.float32)
    x = torch.randn(2, 1, 8, 8, device="cuda")

    def loss(y):
        return y.pow(2).flatten(1).sum(1)

    peaks = {}
    for method in ("backprop", "symplectic"):
        for n in (8, 64):
            ts = sk.time_grid(model.schedule, 0.8, 0.0, n)
            report = sk.profile_gradient(model, loss, x, ts, method)
            assert report.cuda_peak_bytes is not None and report.cuda_peak_bytes > 0
            peaks[method, n] = report.saved_bytes
    assert peaks["symplectic", 64] * 10 <= peaks["backprop", 64]


def test_guided_sampling_on_cuda():
    model = sk.load_pretrained("digits", device="cuda")
    classifier = sk.load_classifier("digits", device="cuda")
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
