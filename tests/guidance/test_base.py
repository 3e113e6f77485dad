"""Base samplers of guided sampling (sagkit.guidance.base): diffusers schedulers driven through
their own ``set_timesteps``/``step``, time travel that leaves their history intact, and the
guided loop's choices (estimate grid, repeat schedules, per-batch step sizes, backward
guidance) and its freedom from host–device synchronisation."""

import copy
import weakref

import pytest
import torch
from helpers import roundoff_bound
from torch.utils._python_dispatch import TorchDispatchMode

import sagkit as sk
from sagkit.core.frames import tweedie_x0
from sagkit.guidance import losses
from sagkit.guidance.base import DDIMBase, SchedulerBase
from sagkit.guidance.methods import backward_shift, dps_step_size, estimate_times, rms_step_size
from sagkit.guidance.sampler import guided_sample
from sagkit.guidance.travel import repeat_schedule

SCHEDULERS = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "UniPCMultistepScheduler",
]


def _scheduler(name, model, **overrides):
    import diffusers

    return getattr(diffusers, name).from_config(model.scheduler.config, **overrides)


def _diffusers_loop(model, scheduler, x_T, cond, steps, generator, *, repeats=None, restore=True):
    """diffusers' own denoising loop (as in its pipelines), with optional time travel written
    out: ``repeats[k]`` takes step k that many times, re-noising in between; ``restore``
    puts the scheduler back before each repeat (a deep copy), else its history sees every
    call."""
    scheduler.set_timesteps(steps)
    taus = scheduler.timesteps
    acp = scheduler.alphas_cumprod.double()
    z = x_T * scheduler.init_noise_sigma
    for k, tau in enumerate(taus):
        saved = copy.deepcopy(scheduler)
        z_t = z
        for r in range(1 if repeats is None else repeats[k]):
            if r:
                if restore:
                    scheduler = copy.deepcopy(saved)
                else:  # the 2023 diffusers of the official code looked the step up by its
                    # timestep; only the model-output history advanced with every call
                    scheduler._step_index = saved._step_index
                a_prev = acp[taus[k + 1]] if k + 1 < len(taus) else torch.tensor(1.0).double()
                ratio = float((acp[tau] / a_prev).sqrt())
                noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
                z_t = ratio * z + (1 - ratio**2) ** 0.5 * noise
            inp = scheduler.scale_model_input(z_t, tau)
            eps = model.unet(inp, tau, class_labels=cond).sample
            kw = (
                {"generator": generator}
                if "generator" in scheduler.step.__code__.co_varnames
                else {}
            )
            z = scheduler.step(eps, tau, z_t, **kw).prev_sample
    return z


@pytest.mark.parametrize("name", SCHEDULERS)
def test_unguided_run_is_diffusers_own_loop(digits_model, x_T, name):
    """guidance="none" on a scheduler is diffusers' loop: same network calls, same ``step``.

    The only difference is the timestep handed to the network, τ against sagkit's
    t·N − 1 = ((τ + 1)/N)·N − 1 in float64 (a couple of ulps of τ), which enters through 10
    steps of the network: the float64 roundoff bound of a chain of 10⁴ operations covers it.
    """
    steps, null = 10, digits_model.null_cond.expand(3, -1)
    ours = guided_sample(
        digits_model,
        None,
        x_T,
        guidance="none",
        sampler=_scheduler(name, digits_model),
        steps=steps,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    theirs = _diffusers_loop(
        digits_model,
        _scheduler(name, digits_model),
        x_T,
        null,
        steps,
        torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(ours, theirs, rtol=roundoff_bound(10**4, torch.float64), atol=0)


def test_time_travel_leaves_a_multistep_history_intact(digits_model, x_T):
    """Repeats restore DPM-Solver++'s state: the run equals diffusers' loop with a deep copy
    before every repeat, and differs from the loop that lets every call enter the history
    (the official SAG code's behaviour)."""
    steps, null = 8, digits_model.null_cond.expand(3, -1)
    repeats = [1, 1, 3, 2, 1, 1, 1, 1]
    kw = {"guidance": "none", "steps": steps, "repeats": repeats, "progress": False}
    name = "DPMSolverMultistepScheduler"
    ours = guided_sample(
        digits_model,
        None,
        x_T,
        sampler=_scheduler(name, digits_model),
        generator=torch.Generator().manual_seed(2),
        **kw,
    )
    restored, corrupted = (
        _diffusers_loop(
            digits_model,
            _scheduler(name, digits_model),
            x_T,
            null,
            steps,
            torch.Generator().manual_seed(2),
            repeats=repeats,
            restore=restore,
        )
        for restore in (True, False)
    )
    tol = roundoff_bound(10**4, torch.float64)
    torch.testing.assert_close(ours, restored, rtol=tol, atol=0)
    assert (ours - corrupted).abs().max() > 1e3 * tol * corrupted.abs().max()


def test_the_callers_scheduler_is_left_alone(digits_model, x_T):
    sched = _scheduler("DPMSolverMultistepScheduler", digits_model)
    before = {k: v for k, v in vars(sched).items() if not isinstance(v, torch.Tensor | list)}
    guided_sample(digits_model, None, x_T, guidance="none", sampler=sched, steps=4, progress=False)
    after = {k: v for k, v in vars(sched).items() if not isinstance(v, torch.Tensor | list)}
    assert before == after and sched.num_inference_steps is None


def test_scheduler_base_times_and_refusals(digits_model):
    base = SchedulerBase(_scheduler("DDPMScheduler", digits_model), digits_model, 10)
    n_train = digits_model.schedule.num_train_timesteps
    assert base.times[:-1] == [(tau + 1) / n_train for tau in base.timesteps.tolist()]
    assert base.times[-1] == 0.0  # DDPM ends at ᾱ = 1
    ddim = _scheduler("DDIMScheduler", digits_model, set_alpha_to_one=False)
    assert SchedulerBase(ddim, digits_model, 10).times[-1] == 1 / n_train  # stops at ᾱ[0]
    # diffusers' from_config takes Heun's own default betas where the model's config only had
    # defaults (its "_use_default_values"): another schedule, refused as such; given the
    # model's betas, Heun is refused for its repeated timesteps
    heun = _scheduler("HeunDiscreteScheduler", digits_model)
    with pytest.raises(ValueError, match="another training schedule"):
        SchedulerBase(heun, digits_model, 10)
    betas = {k: digits_model.scheduler.config[k] for k in ("beta_start", "beta_end")}
    with pytest.raises(ValueError, match="repeated timestep"):
        SchedulerBase(_scheduler("HeunDiscreteScheduler", digits_model, **betas), digits_model, 10)
    with pytest.raises(TypeError, match="diffusers scheduler"):
        SchedulerBase(object(), digits_model, 10)
    with pytest.raises(ValueError, match="sampler must be"):
        guided_sample(
            digits_model, None, torch.zeros(1, 1, 16, 16).double(), guidance="none", sampler="euler"
        )


def test_ddim_base_is_the_ddim_formula(digits_model, x_T):
    """One step of sagkit's DDIM: x_s = α_s x̂0 + σ_s ε with x̂0 Tweedie's (docs/maths.md §2.2)."""
    base = DDIMBase(digits_model.schedule, 4)
    t, s = base.times[1], base.times[2]
    eps = base.predict(digits_model, x_T, 1, digits_model.null_cond.expand(3, -1))
    x0 = tweedie_x0(digits_model.schedule, x_T, t, eps)
    sc = digits_model.schedule
    terms = (sc.alpha(s) * x0, sc.sigma(s) * eps)
    # both round a few operations on terms of this size: the bound is relative to the terms
    bound = roundoff_bound(64, torch.float64) * max(float(a.abs().max()) for a in terms)
    torch.testing.assert_close(base.update(x_T, 1, eps), sum(terms), rtol=0, atol=bound)


# --- the guided loop's choices ------------------------------------------------------------------


def test_estimate_grids():
    sched = sk.VPSchedule.linear()
    times = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]  # K = 7 steps, evaluated at t_0 … t_6
    torch.testing.assert_close(
        estimate_times(times, 1, 3, grid="to-zero", schedule=sched),
        sk.time_grid(sched, 0.9, 0.0, 3),
    )
    # remaining t_1 … t_6 (6 times): 4 points evenly in index 0, 1, 3, 5 (rounded down)
    got = estimate_times(times, 1, 3, grid="sampler", schedule=sched)
    assert got.tolist() == [0.9, 0.8, 0.6, 0.4]
    assert estimate_times(times, 4, 5, grid="sampler", schedule=sched).tolist() == [0.6, 0.5, 0.4]
    for k, n in ((2, 1), (6, 4)):  # n = 1, or only t_k left: one step to 0 (Tweedie)
        assert estimate_times(times, k, n, grid="sampler", schedule=sched).tolist() == [
            times[k],
            0.0,
        ]


def test_the_sampler_grid_is_the_formula_in_integers():
    """t_{k + ⌊j (M − 1)/n⌋}, j = 0 … n, for every n < M ≤ 129 (docs/maths.md §8.2), where
    SAG's torch.linspace(..., dtype=long) can land one index lower (M = 59 or 117, n = 14)."""
    for m in range(2, 130):
        times = torch.arange(m + 1, 0, -1, dtype=torch.float64) / (m + 1)  # M evaluation times
        for n in range(2, m):
            got = estimate_times(times.tolist(), 0, n, grid="sampler", schedule=None)
            assert got.tolist() == [times[j * (m - 1) // n].item() for j in range(n + 1)], (m, n)
    for m in (59, 117):  # the disagreement the integer formula removes
        assert torch.linspace(0, m - 1, 15, dtype=torch.long)[7] == 7 * (m - 1) // 14 - 1


def test_repeat_schedules():
    guided = [False, True, True, False]
    assert repeat_schedule(2, guided) == [1, 2, 2, 1]
    assert repeat_schedule([1, 3, 1, 2], guided) == [1, 3, 1, 2]
    assert repeat_schedule(lambda k: k + 1, guided) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="one entry per step"):
        repeat_schedule([1, 2], guided)
    with pytest.raises(ValueError, match=r"repeats\[2\]"):
        repeat_schedule([1, 1, 0, 1], guided)
    with pytest.raises(ValueError, match="repeats"):
        repeat_schedule(0, guided)


def test_per_batch_step_sizes():
    gen = torch.Generator().manual_seed(0)
    delta, g = (torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    rho = rms_step_size(delta, g, scale=0.5, per_batch=True)
    expected = 0.5 * delta.pow(2).mean().sqrt() / g.pow(2).mean().sqrt()
    torch.testing.assert_close(rho, expected.expand(3))
    loss = torch.tensor([1.0, 4.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(
        dps_step_size(loss, scale=3.0, per_batch=True), torch.full((3,), 1.0).double()
    )
    one = slice(0, 1)  # batch 1: the two agree
    torch.testing.assert_close(
        rms_step_size(delta[one], g[one], scale=0.5, per_batch=True),
        rms_step_size(delta[one], g[one], scale=0.5),
    )


def test_backward_guidance(digits_model, classifier, x_T):
    """Δ lowers the loss of x̂0 + Δ, each descent step moves RMS c; ε − (α/σ)Δ is the ε whose
    Tweedie estimate is x̂0 + Δ; the guided run lowers the final loss."""
    loss = losses.target_class(classifier, 3)
    x0 = x_T.clamp(-1, 1)
    delta = backward_shift(loss, x0, steps=1, scale=0.2)
    torch.testing.assert_close(
        delta.flatten(1).pow(2).mean(1).sqrt(), torch.full((3,), 0.2).double()
    )
    delta = backward_shift(loss, x0, steps=5, scale=0.05)
    assert bool((loss(x0 + delta) < loss(x0)).all())
    sc, t = digits_model.schedule, 0.5
    eps = torch.randn_like(x_T)
    shifted = eps - (sc.alpha(t) / sc.sigma(t)) * delta
    torch.testing.assert_close(
        tweedie_x0(sc, x_T, t, shifted), tweedie_x0(sc, x_T, t, eps) + delta, rtol=1e-12, atol=1e-12
    )
    gen = torch.Generator().manual_seed(3)
    kw = {"steps": 6, "window": (0.0, 1.0), "progress": False}
    plain = guided_sample(digits_model, loss, x_T, guidance="none", **kw)
    guided = guided_sample(digits_model, loss, x_T, guidance="backward", generator=gen, **kw)
    assert float(loss(guided).mean()) < float(loss(plain).mean())


@pytest.mark.parametrize("grid", ["to-zero", "sampler"])
def test_sag_with_one_step_is_freedom_on_a_scheduler(digits_model, classifier, x_T, grid):
    loss = losses.target_class(classifier, 3)
    runs = [
        guided_sample(
            digits_model,
            loss,
            x_T,
            sampler=_scheduler("DPMSolverMultistepScheduler", digits_model),
            steps=6,
            window=(0.0, 1.0),
            estimate_grid=grid,
            generator=torch.Generator().manual_seed(4),
            progress=False,
            **kw,
        )
        for kw in ({"guidance": "sag", "n": 1}, {"guidance": "freedom"})
    ]
    assert torch.equal(*runs)


def test_bad_choices(digits_model, x_T):
    for kw, match in (
        ({"estimate_grid": "zero"}, "estimate_grid"),
        ({"step_size": "batch"}, "step_size"),
        ({"backward_steps": 0}, "backward_steps"),
        ({"preset": "sag"}, "preset"),
    ):
        with pytest.raises(ValueError, match=match):
            guided_sample(
                digits_model, lambda x: x.flatten(1).sum(1) ** 2, x_T, progress=False, **kw
            )


# --- no host–device synchronisation per step --------------------------------------------------


class _HostReads(TorchDispatchMode):
    """Counts host reads (``item``, ``bool``, ``float``, ``torch.equal``, ``nonzero``) of values
    computed from float32 data: what would synchronise with a GPU holding that data. Tensors
    are tainted when float32 or computed from a tainted one; the float64 time grids, which live
    on the host, are not."""

    READS = {"_local_scalar_dense", "equal", "nonzero", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.tainted, self.reads = {}, 0  # id → weak reference (tensors do not hash by value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
        inputs = [a for a in flat if isinstance(a, torch.Tensor)]
        taint = any(a.dtype == torch.float32 or self._tainted(a) for a in inputs)
        out = func(*args, **kwargs)
        if taint and func.overloadpacket.__name__ in self.READS:
            self.reads += 1
        if taint:
            for o in torch.utils._pytree.tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.tainted[id(o)] = weakref.ref(o)
        return out

    def _tainted(self, tensor) -> bool:
        ref = self.tainted.get(id(tensor))
        return ref is not None and ref() is tensor


@pytest.mark.parametrize("guidance", ["sag", "dps", "backward"])
def test_the_guided_loop_reads_nothing_back_per_step(digits_model, classifier, x_T, guidance):
    """The host reads of a float32 run do not grow with the number of guided steps: the checks
    at the boundary and the one deferred check at the end, nothing per step."""
    model = copy.deepcopy(digits_model).float()
    loss = losses.target_class(copy.deepcopy(classifier).float(), 3)
    reads = []
    for steps in (2, 3):
        with _HostReads() as mode:
            guided_sample(
                model,
                loss,
                x_T.float(),
                guidance=guidance,
                steps=steps,
                window=(0.0, 1.0),
                n=2,
                repeats=2,
                cond=model.cond_for([3, 1, 2]),
                cfg_scale=2.0,
                generator=torch.Generator().manual_seed(0),
                progress=False,
            )
        reads.append(mode.reads)
    assert reads[0] == reads[1], f"host reads per run: {reads} for 2 and 3 guided steps"
