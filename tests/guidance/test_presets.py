"""The papers' presets (sagkit.guidance.presets) against independent per-step implementations
of each official algorithm, written here from the published code's structure: diffusers'
scheduler loop, autograd through the estimate, the official step rule with its constants."""

import copy

import pytest
import torch
from helpers import F64_AGREE

import sagkit as sk
from sagkit.guidance import losses
from sagkit.guidance.presets import PRESETS

STEPS = 10  # the official 100 (SAG, FreeDoM) and 1000 (DPS), shortened; fractions kept


def _renoise(z, acp, tau, tau_prev, generator):
    """x_t = sqrt(ᾱ_t/ᾱ_prev) x_prev + sqrt(1 − ᾱ_t/ᾱ_prev) ξ (both official codes)."""
    beta = acp[tau] / (acp[tau_prev] if tau_prev is not None else 1.0)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    return beta.sqrt() * z + (1 - beta).sqrt() * noise


def _network(model, cond, w):
    """ε of the official codes: CFG over one batched call, and the correction ε_c − ε_u."""
    null = model.null_cond.expand_as(cond)

    def eps(z, tau):
        # sagkit's time t = (τ + 1)/N reaches the network as t·N − 1 = τ
        out = model.unet(torch.cat([z, z]), tau, class_labels=torch.cat([cond, null])).sample
        e_c, e_u = out.chunk(2)
        return e_u + w * (e_c - e_u), e_c - e_u

    return eps


def _rms(v):
    return v.pow(2).mean().sqrt()  # over the whole batch, as the codes' .item()


def _preset_run(model, loss_fn, x_T, preset, seed, cond=None):
    """sagkit's run of a preset at STEPS steps with the time-travel generator seeded ``seed``."""
    return sk.guided_sample(
        model,
        loss_fn,
        x_T,
        preset=preset,
        steps=STEPS,
        cond=cond,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )


def _official_loop(x_T, scheduler, *, guided, repeats, guide, generator):
    """diffusers' loop with the codes' time travel; ``guide(scheduler, z_t, k, τ, guided)``
    takes the scheduler's step from z_t and, on a guided step, corrects it. The scheduler is copied before a repeated step and restored before
    each repeat (so the history holds the step taken, once)."""
    scheduler.set_timesteps(STEPS)
    taus, acp = scheduler.timesteps, scheduler.alphas_cumprod.double()
    z = x_T
    for k, tau in enumerate(taus):
        saved = copy.deepcopy(scheduler)
        z_t = z
        for r in range(repeats[k]):
            if r:
                scheduler = copy.deepcopy(saved)
                z_t = _renoise(z, acp, tau, taus[k + 1] if k + 1 < len(taus) else None, generator)
            z = guide(scheduler, z_t, k, tau, guided[k])
    return z


def test_sag_paper(digits_model, classifier, x_T):
    """SAG: DPM-Solver++ base, steps 30–69 % guided with 2 repeats, the estimate on 4 of the
    remaining timesteps by DDIM steps (Euler on the DDIM ODE), ρ = 0.2·w·RMS(ε_c − ε_u)/RMS(g)
    over the batch, w = 7.5. Gradient by autograd here, by the symplectic adjoint in sagkit."""
    loss_fn = losses.target_class(classifier, 3)
    cond = digits_model.cond_for([3, 5, 1])
    w = 7.5
    eps = _network(digits_model, cond, w)
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(digits_model.scheduler.config)
    acp = scheduler.alphas_cumprod.double()

    def alpha_bar(tau):
        return acp[tau] if tau is not None else torch.tensor(1.0, dtype=torch.float64)

    def estimate(z, taus):  # DDIM steps between the chosen timesteps (None: time 0)
        for a, b in zip(taus[:-1], taus[1:], strict=True):
            e, _ = eps(z, a)
            x0 = (z - (1 - alpha_bar(a)).sqrt() * e) / alpha_bar(a).sqrt()
            z = alpha_bar(b).sqrt() * x0 + (1 - alpha_bar(b)).sqrt() * e
        return z

    def guide(scheduler, z_t, k, tau, guided):
        with torch.no_grad():
            e, correction = eps(z_t, tau)
            z_prev = scheduler.step(e, tau, z_t).prev_sample
        if not guided:
            return z_prev
        remaining = scheduler.timesteps[k:].tolist()
        index = torch.linspace(0, len(remaining) - 1, min(4, len(remaining)), dtype=torch.long)
        taus = [remaining[i] for i in index] if len(remaining) > 1 else [remaining[0], None]
        leaf = z_t.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(estimate(leaf, taus)).sum(), leaf)
        return z_prev - 0.2 * w * _rms(correction) / _rms(g) * g

    guided = [0.3 <= k / STEPS < 0.7 for k in range(STEPS)]
    reference = _official_loop(
        x_T,
        scheduler,
        guided=guided,
        repeats=[2 if g else 1 for g in guided],
        guide=guide,
        generator=torch.Generator().manual_seed(7),
    )
    ours = _preset_run(digits_model, loss_fn, x_T, "sag-paper", 7, cond)
    torch.testing.assert_close(ours, reference, rtol=F64_AGREE, atol=F64_AGREE)


def test_freedom_paper(digits_model, classifier, x_T):
    """FreeDoM: the DDPM posterior step (η = 1), steps 30–69 % guided, 3 repeats on 30–59 %,
    Tweedie's x̂0 from the CFG ε, ρ = 0.2·w·RMS(ε_c − ε_u)/RMS(g) over the batch, w = 5."""
    loss_fn = losses.target_class(classifier, 3)
    cond = digits_model.cond_for([3, 5, 1])
    w = 5.0
    eps = _network(digits_model, cond, w)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(digits_model.scheduler.config)
    acp = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(8)

    def guide(scheduler, z_t, k, tau, guided):
        leaf = z_t.detach().requires_grad_()
        e, correction = eps(leaf, tau)
        x0 = (leaf - (1 - acp[tau]).sqrt() * e) / acp[tau].sqrt()
        z_prev = scheduler.step(e.detach(), tau, z_t, generator=generator).prev_sample
        if not guided:
            return z_prev
        (g,) = torch.autograd.grad(loss_fn(x0).sum(), leaf)
        return z_prev - 0.2 * w * _rms(correction.detach()) / _rms(g) * g

    guided = [0.3 <= k / STEPS < 0.7 for k in range(STEPS)]
    reference = _official_loop(
        x_T,
        scheduler,
        guided=guided,
        repeats=[3 if 0.3 <= k / STEPS < 0.6 else 1 for k in range(STEPS)],
        guide=guide,
        generator=generator,
    )
    ours = _preset_run(digits_model, loss_fn, x_T, "freedom-paper", 8, cond)
    torch.testing.assert_close(ours, reference, rtol=F64_AGREE, atol=F64_AGREE)


def test_dps_paper(digits_model, x_T):
    """DPS: ancestral DDPM with x̂0 clipped, every step guided, no time travel, and
    x_{t−1} −= 0.5 ∇_{x_t} ‖y − A(x̂0)‖ with the norm over the whole batch (the code's
    scale 0.5 for inpainting), no CFG."""
    mask = torch.zeros(16, 16, dtype=torch.float64)
    mask[:8] = 1
    loss_fn = losses.masked_reconstruction(x_T[0].clamp(-1, 1), mask)
    null = digits_model.null_cond.expand(3, -1)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(digits_model.scheduler.config, clip_sample=True)
    acp = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(9)

    def guide(scheduler, z_t, k, tau, guided):
        leaf = z_t.detach().requires_grad_()
        e = digits_model.unet(leaf, tau, class_labels=null).sample
        x0 = (leaf - (1 - acp[tau]).sqrt() * e) / acp[tau].sqrt()
        z_prev = scheduler.step(e.detach(), tau, z_t, generator=generator).prev_sample
        norm = loss_fn(x0).sum().sqrt()  # ‖y − A(x̂0)‖ over the batch: L = ‖·‖² per sample
        (g,) = torch.autograd.grad(norm, leaf)
        return z_prev - 0.5 * g

    reference = _official_loop(
        x_T,
        scheduler,
        guided=[True] * STEPS,
        repeats=[1] * STEPS,
        guide=guide,
        generator=generator,
    )
    ours = _preset_run(digits_model, loss_fn, x_T, "dps-paper", 9)
    torch.testing.assert_close(ours, reference, rtol=F64_AGREE, atol=F64_AGREE)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_keep_their_fractions_and_yield_to_arguments(digits_model, name):
    preset = PRESETS[name]
    options = preset.options(digits_model, steps=20)
    assert options["steps"] == 20 and len(options["repeats"]) == 20
    official = preset.options(digits_model)
    assert official["steps"] == preset.steps
    # the fraction of steps taken more than once is the same at both lengths
    share = [sum(r > 1 for r in o["repeats"]) / o["steps"] for o in (options, official)]
    assert share[0] == pytest.approx(share[1])
    assert type(options["sampler"]).__name__ == preset.scheduler[0]
    assert preset.sources, "every preset names the source of its choices"


def test_a_preset_needs_the_models_scheduler(x_T):
    mixture = sk.digits.digits_mixture(n_components=8, size=16)
    with pytest.raises(ValueError, match="scheduler"):
        sk.guided_sample(mixture, lambda x: x.flatten(1).pow(2).sum(1), x_T, preset="sag-paper")
