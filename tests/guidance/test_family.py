"""The TFG family (sagkit.guidance.family) against a per-step implementation written here from
the papers: TFG's Algorithm 1 with (ρ, μ, γ), N_iter, N_recur and m Monte-Carlo samples, each
method a setting of it, on the exact Gaussian mixture; its special cases; its cost in network
calls; that each method lowers each digits task's loss; and one step on tiny Stable Diffusion."""

import dataclasses
import math

import pytest
import torch
from helpers import F64_AGREE

import sagkit as sk
from sagkit.core.schedules import time_grid
from sagkit.guidance.family import LGD, MPGD, TFG, UGD, smoothing_noise
from sagkit.guidance.sampler import guided_sample
from sagkit.lab.evaluation import default_tasks
from sagkit.lab.profiling import CountingModel

STEPS, WINDOW = 6, (0.0, 0.7)  # steps 0–4 guided
VP = pytest.mark.parametrize("mixture", ["vp"], indirect=True)  # the loop below is in ε (VP)


def make_loss():
    """L(x) = ½‖x − c‖² + Σ w·sin(x) per sample, (B,), c and w fixed 2×2 images: each sample's
    value depends on it alone (the smoothing batches m·B images through one call)."""
    gen = torch.Generator().manual_seed(1)
    c, w = torch.randn(2, 1, 2, 2, generator=gen, dtype=torch.float64)

    def loss(x):
        return 0.5 * (x - c).flatten(1).pow(2).sum(1) + (torch.sin(x) * w).flatten(1).sum(1)

    return loss


def _weights(schedule, times, kind):
    """TFG's schedule weights, normalised to mean 1 over the steps."""
    w = []
    for k in range(len(times) - 1):
        a = (schedule.alpha(times[k]) / schedule.alpha(times[k + 1])) ** 2
        w.append({"constant": 1.0, "increase": a, "decrease": 1.0 - a}[kind])
    return [v * len(w) / sum(w) for v in w]


def _rms(v):
    return v.flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (v.ndim - 1))


def _reference(model, loss, x_T, *, rho, mu, gamma, iters, m, recur, rho_kind="constant",
               mu_kind="constant", n=1, seed=0, generator):  # fmt: skip
    """TFG's guided DDIM loop, written from the paper's Algorithm 1, per sample (RMS rules):

    L̃(x) = −log mean_j exp(−L(x + γ σ_t ξ_j));  g = ∇_{x_t} L̃(x̂0(x_t)), x̂0 the n-step DDIM
    estimate; Δ0 by N_iter steps Δ0 −= μ_t ∇L̃(x̂0 + Δ0)/RMS; ε' = (x_t − α_t (x̂0 + Δ0))/σ_t;
    x_s = α_s (x̂0 + Δ0) + σ_s ε'; x_s −= ρ_t RMS(x_s − x_t)/RMS(g) · g; N_recur times with
    x_t = (α_t/α_s) x_s + sqrt(1 − α_t²/α_s²) ξ between."""
    sch = model.schedule
    times = [float(t) for t in time_grid(sch, 1.0, 0.0, STEPS)]
    w_rho, w_mu = _weights(sch, times, rho_kind), _weights(sch, times, mu_kind)
    x = x_T
    for k in range(STEPS):
        t, s = times[k], times[k + 1]
        a_t, s_t, a_s, s_s = sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)
        guided = WINDOW[0] <= k / STEPS < WINDOW[1]
        x_t = x
        for r in range(recur if guided else 1):
            if r:
                ratio = a_t / a_s
                xi = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x_t = ratio * x + math.sqrt(1 - ratio**2) * xi
            noise = smoothing_noise(seed, k, m, x_t)

            def smoothed(x0, noise=noise, s_t=s_t):
                if gamma == 0:
                    return loss(x0)
                values = torch.stack([loss(x0 + gamma * s_t * noise[j]) for j in range(m)])
                return -torch.log(torch.exp(-values).mean(0))

            leaf = x_t.detach().requires_grad_()
            with torch.enable_grad():
                z, grid = leaf, time_grid(sch, t, 0.0, n)
                for i in range(n):  # the n-step DDIM estimate
                    a, b = float(grid[i]), float(grid[i + 1])
                    e = model.eps(z, a)
                    if i == 0:
                        eps = e.detach()
                    x0 = (z - sch.sigma(a) * e) / sch.alpha(a)
                    z = sch.alpha(b) * x0 + sch.sigma(b) * e
                (g,) = torch.autograd.grad(smoothed(z).sum(), leaf)
            x0 = (x_t - s_t * eps) / a_t
            shift = torch.zeros_like(x0)
            for _ in range(iters if guided and mu > 0 else 0):
                d = shift.detach().requires_grad_()
                with torch.enable_grad():
                    (gd,) = torch.autograd.grad(smoothed(x0 + d).sum(), d)
                shift = shift - mu * w_mu[k] * gd / _rms(gd)
            moved = x0 + shift
            eps_moved = (x_t - a_t * moved) / s_t
            x_s = a_s * moved + s_s * eps_moved
            if guided and rho > 0:
                x_s = x_s - rho * w_rho[k] * _rms(x_s - x_t) / _rms(g) * g
            x = x_s
    return x


def _ours(model, loss, x_T, method, seed=3, **kw):
    options = {"steps": STEPS, "window": WINDOW, "progress": False, **kw}
    gen = torch.Generator().manual_seed(seed)
    return guided_sample(model, loss, x_T, guidance=method, generator=gen, **options)


@pytest.fixture
def x_mix():
    return torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


# each method's setting of TFG's step, from its paper
CASES = {
    "lgd": (LGD(scale=1.5, smoothing=1.0, samples=3, seed=5),
            {"rho": 1.5, "mu": 0.0, "gamma": 1.0, "iters": 0, "m": 3, "recur": 1, "seed": 5}),
    "mpgd": (MPGD(scale=0.7),
             {"rho": 0.0, "mu": 0.7, "gamma": 0.0, "iters": 1, "m": 1, "recur": 1}),
    "ugd": (UGD(forward=1.2, backward=0.6, iterations=3, recur=3),
            {"rho": 1.2, "mu": 0.6, "gamma": 0.0, "iters": 3, "m": 1, "recur": 3}),
    "tfg": (TFG(rho=1.1, mu=0.4, gamma=0.3, iterations=2, recur=2, samples=3, seed=1),
            {"rho": 1.1, "mu": 0.4, "gamma": 0.3, "iters": 2, "m": 3, "recur": 2,
             "rho_kind": "increase", "mu_kind": "increase", "seed": 1}),
    "tfg decrease": (TFG(rho=0.8, mu=0.3, gamma=0.2, rho_schedule="decrease",
                         mu_schedule="constant", samples=2),
                     {"rho": 0.8, "mu": 0.3, "gamma": 0.2, "iters": 2, "m": 2, "recur": 2,
                      "rho_kind": "decrease"}),
    "tfg + 3-step estimate": (TFG(rho=1.1, mu=0.4, gamma=0.3, samples=3, estimate=3),
                              {"rho": 1.1, "mu": 0.4, "gamma": 0.3, "iters": 2, "m": 3,
                               "recur": 2, "rho_kind": "increase", "mu_kind": "increase",
                               "n": 3}),
}  # fmt: skip


@VP
@pytest.mark.parametrize("case", list(CASES))
def test_each_method_is_its_per_step_implementation(mixture, x_mix, case):
    """sagkit's run of the method = the loop above with the method's (ρ, μ, γ, N_iter, m,
    N_recur), float64, from the same noise: they agree to F64_AGREE (1e-10 ≫ γ_N of the
    < 10⁴ float64 roundings of a 6-step mixture run, ≪ the 1e-2 of a wrong step)."""
    method, setting = CASES[case]
    loss = make_loss()
    ours = _ours(mixture, loss, x_mix, method)
    want = _reference(mixture, loss, x_mix, generator=torch.Generator().manual_seed(3), **setting)
    torch.testing.assert_close(ours, want, rtol=F64_AGREE, atol=F64_AGREE)
    unguided = _ours(mixture, loss, x_mix, "none")
    assert not torch.allclose(ours, unguided)  # the guidance acted


@VP
def test_special_cases_are_the_built_in_methods_exactly(mixture, x_mix):
    """TFG with μ = γ = 0 (constant ρ) is FreeDoM, with ρ = γ = 0 backward guidance; LGD
    without smoothing and UGD without backward guidance are FreeDoM, MPGD is one backward
    step: the same floats."""
    loss = make_loss()
    freedom = _ours(mixture, loss, x_mix, "freedom", scale=1.3, repeats=2)
    assert torch.equal(
        _ours(mixture, loss, x_mix, TFG(rho=1.3, mu=0.0, gamma=0.0, rho_schedule="constant")),
        freedom,
    )
    assert torch.equal(_ours(mixture, loss, x_mix, LGD(scale=1.3, smoothing=0.0), repeats=2),
                       freedom)  # fmt: skip
    assert torch.equal(_ours(mixture, loss, x_mix, UGD(forward=1.3, backward=0.0)), freedom)
    backward = _ours(mixture, loss, x_mix, "backward", scale=0.6, backward_steps=3, repeats=2)
    only_mu = TFG(rho=0.0, mu=0.6, gamma=0.0, iterations=3, mu_schedule="constant")
    assert torch.equal(_ours(mixture, loss, x_mix, only_mu), backward)
    one_step = _ours(mixture, loss, x_mix, "backward", scale=0.6, backward_steps=1, repeats=1)
    assert torch.equal(_ours(mixture, loss, x_mix, MPGD(scale=0.6)), one_step)


@VP
def test_estimate_of_one_step_is_the_n_less_step(mixture, x_mix):
    """``estimate = 1`` is the one-step estimate whatever SAG's ``n``; more steps change it."""
    loss = make_loss()
    base = _ours(mixture, loss, x_mix, TFG())
    assert torch.equal(_ours(mixture, loss, x_mix, TFG(estimate=1), n=5), base)
    assert not torch.allclose(_ours(mixture, loss, x_mix, TFG(estimate=2)), base)


def test_monte_carlo_noise_is_reproducible():
    like = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    a = smoothing_noise(0, 4, 3, like)
    assert a.shape == (3, 2, 1, 3, 3) and a.dtype == torch.float64
    assert torch.equal(a, smoothing_noise(0, 4, 3, like))
    assert not torch.equal(a, smoothing_noise(0, 5, 3, like))
    assert not torch.equal(a, smoothing_noise(1, 4, 3, like))


# network calls per guided step and repeat of the ρ-term through SAG's n-step estimate, with
# the default "budgeted" engine on the digits UNet (backprop: n calls, the base step's ε the
# first of them); the μ-term and the smoothing call the loss only. An unguided step is 1 call.
@pytest.mark.parametrize(("method", "per_step"), [
    (TFG(estimate=3), 3), (TFG(estimate=1), 1), (TFG(rho=0.0), 1), (LGD(), 1), (MPGD(), 1),
    (UGD(recur=3), 1),
])  # fmt: skip
def test_network_calls_per_guided_step(digits_model, classifier, x_T, method, per_step):
    """calls = (steps − guided) + guided · repeats · per_step, steps = 6, window (0, 0.5)."""
    counting = CountingModel(digits_model)
    loss = sk.guidance.losses.target_class(classifier, 3)
    _ours(counting, loss, x_T, method, window=(0.0, 0.5))
    steps, guided = 6, 3
    assert counting.calls == (steps - guided) + guided * method.repeats * per_step


@pytest.fixture(scope="module")
def shipped():
    return sk.digits.load_pretrained("digits"), sk.digits.load_classifier("digits")


FAMILY = [LGD(), MPGD(), UGD(), TFG(), TFG(estimate=2)]


@pytest.mark.parametrize("method", FAMILY, ids=lambda m: repr(m).split("(")[0] + (
    f" n={m.estimate}" if getattr(m, "estimate", 1) > 1 else ""))  # fmt: skip
def test_each_method_lowers_every_digits_tasks_loss(shipped, method):
    """On the shipped digits model, 4 samples, 12 steps, 2 repeats: each method's mean final
    loss is below unguided sampling's from the same noise, on every task."""
    model, classifier = shipped
    p = next(model.parameters())
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(p)
    for task in default_tasks(classifier):
        options = {"steps": 12, "window": (0.3, 0.7), "repeats": 2}
        plain = _ours(model, task.loss, x_T, "none", **options)
        guided = _ours(model, task.loss, x_T, method, **options)
        with torch.no_grad():
            assert task.loss(guided).mean() < task.loss(plain).mean(), task.name


@pytest.fixture(scope="module")
def tiny_sd():
    from sagkit.sd.pipeline import GuidedStableDiffusion
    from sagkit.sd.tiny import tiny_pipeline

    return GuidedStableDiffusion.from_pipe(tiny_pipeline(latent_size=8, dtype=torch.float64))


UNSCALED = {LGD: {"scale": 0.0}, MPGD: {"scale": 0.0}, UGD: {"forward": 0.0, "backward": 0.0},
            TFG: {"rho": 0.0, "mu": 0.0}}  # fmt: skip


@pytest.mark.parametrize("method", FAMILY, ids=lambda m: repr(m).split("(")[0])
def test_one_step_on_tiny_stable_diffusion(tiny_sd, method):
    """Wiring: one guided step (of 2) on latents through the decoder's loss, finite, and not
    the same method with its scales 0 (the same time travel, no guidance move)."""
    target = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(images):
        return (images - target).pow(2).flatten(1).mean(1)

    def run(guidance):
        return tiny_sd(["a fox", "a boat"], loss_fn=loss, guidance=guidance, steps=2,
                       window=(0.0, 0.5), generator=torch.Generator().manual_seed(0),
                       output_type="latent", progress=False).images  # fmt: skip

    z = run(method)
    assert z.shape == (2, 4, 8, 8) and bool(torch.isfinite(z).all())
    assert not torch.allclose(z, run(dataclasses.replace(method, **UNSCALED[type(method)])))


def test_a_scale_the_method_does_not_read_is_refused():
    """The family's scales are fields of its objects: a configuration's scale would be ignored."""
    with pytest.raises(ValueError, match="scale is not read by guidance=TFG"):
        sk.GuidanceConfig(guidance=sk.TFG(), scale=2.0)
    assert sk.GuidanceConfig(guidance=sk.TFG(rho=2.0)).scale is None
