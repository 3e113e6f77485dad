"""The latent-diffusion recipe on a tiny random UNet2DConditionModel and AutoencoderKL."""

import pytest
import torch
from helpers import RoundingChain, pair_bound, rel, roundoff_bound

import sagkit as sk
from sagkit.sd.latent import TextConditionedModel, decoded_loss
from sagkit.sd.tiny import tiny_unet_and_vae


@pytest.fixture(scope="module")
def latent_setup():
    from diffusers import DDIMScheduler

    unet, vae = tiny_unet_and_vae(latent_size=8, cross_attention_dim=12, seed=0)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False
    )
    unet, vae = unet.double().eval(), vae.double().eval()
    prompt = torch.randn(2, 5, 12, dtype=torch.float64)
    negative = torch.zeros(1, 5, 12, dtype=torch.float64)
    model = TextConditionedModel(unet, scheduler, negative)
    target = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    loss = decoded_loss(vae, lambda img: (img - target).pow(2).flatten(1).mean(1))
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, loss, z, prompt, unet, scheduler


def test_cfg_model_is_the_guided_combination(latent_setup):
    model, _, z, prompt, unet, scheduler = latent_setup
    w = 3.0
    guided = sk.ClassifierFreeGuidance(model, model.null_cond, w)
    plain = sk.DiffusersModel(unet, scheduler)
    with torch.no_grad(), RoundingChain() as chain:
        e_c = plain.eps(z, 0.6, prompt)
        e_u = plain.eps(z, 0.6, torch.zeros_like(prompt))
        got, want = guided.eps(z, 0.6, prompt), e_u + w * (e_c - e_u)
    # float64 ε_u, ε_c batched (got) and apart (want), each within γ over its counted chain;
    # ε_u + w (ε_c − ε_u) weighs their errors by up to 1 + 2w, relative to the larger of them
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
    scale = float(torch.maximum(e_c.norm(), e_u.norm()) / want.norm())
    assert rel(got, want) <= (1 + 2 * w) * scale * pair_bound(*bounds)


def test_gradient_through_the_decoder(latent_setup):
    """n-step estimate with CFG inside, VAE decode inside the loss: engines agree, FD agrees."""
    model, loss, z, prompt, *_ = latent_setup
    ts = sk.time_grid(model.schedule, 0.7, 0.0, 3)
    with RoundingChain() as chain:  # the roundings behind each result, counted
        value, g_bp = sk.loss_grad(model, loss, z, ts, method="backprop", cond=prompt)
        _, g_sa = sk.loss_grad(model, loss, z, ts, method="symplectic", cond=prompt)
    # two float64 roundings of the exact discrete gradient, each γ over its counted chain
    bounds = (roundoff_bound(chain.longest(g), torch.float64) for g in (g_sa, g_bp))
    assert rel(g_sa, g_bp) <= pair_bound(*bounds)
    v, delta = torch.randn_like(z), 1e-4
    fd = sk.finite_difference(model, loss, z, ts, v, cond=prompt, delta=delta)
    # Richardson: each loss value off by ≤ γ_N |L|, weighed by 3/δ; truncation f⁽⁵⁾δ⁴/480
    bound = 3 * roundoff_bound(chain.longest(value), torch.float64) * abs(float(value)) / delta
    assert abs(fd - float((g_bp * v).sum())) <= bound


def test_guided_sampling_on_latents(latent_setup):
    """SAG on latents with CFG: runs, is deterministic, and moves the decoded loss down."""
    model, loss, z, prompt, *_ = latent_setup
    kwargs = dict(steps=6, n=2, window=(0.0, 1.0), cond=prompt, cfg_scale=3.0, progress=False)
    plain = sk.guided_sample(model, loss, z, guidance="none", **kwargs)
    sag, again = (
        sk.guided_sample(
            model,
            loss,
            z,
            guidance="sag",
            scale=2.0,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        for _ in range(2)
    )
    assert sag.shape == z.shape and torch.equal(sag, again)
    with torch.no_grad():
        assert float(loss(sag).sum()) < float(loss(plain).sum())
