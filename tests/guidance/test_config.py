"""One configuration for guided sampling: every field reaches the loop from every layer (the
API, Stable Diffusion, the command line), a preset's values survive unless the caller sets them,
methods are objects the loop calls without naming them, and the engine is chosen per call."""

import ast
import dataclasses
import importlib
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import RoundingChain, exit_code, pair_bound, rel, roundoff_bound

import sagkit as sk
from sagkit.core import checks
from sagkit.guidance import losses, sampler
from sagkit.guidance.config import DEFAULTS, OPTIONS, GuidanceConfig
from sagkit.guidance.methods import GUIDANCE, GuidanceMethod
from sagkit.guidance.presets import PRESETS
from sagkit.lab.cli import main as cli_main
from sagkit.sd.pipeline import GuidedStableDiffusion
from sagkit.sd.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]

# One value per field, each different from the default and from every preset's.
SETTINGS = {
    "guidance": ("backward", ["--guidance", "backward"]),
    "steps": (7, ["--steps", "7"]),
    "n": (2, ["--n", "2"]),
    "scale": (0.5, ["--scale", "0.5"]),
    "window": ((0.1, 0.9), ["--window", "0.1", "0.9"]),
    "repeats": (3, ["--repeats", "3"]),
    "sampler": ("EulerDiscreteScheduler", ["--sampler", "EulerDiscreteScheduler"]),
    "estimate_grid": ("sampler", ["--estimate-grid", "sampler"]),
    "step_size": ("per-batch", ["--step-size", "per-batch"]),
    "backward_steps": (2, ["--backward-steps", "2"]),
    "cfg_scale": (3.0, ["--cfg-scale", "3"]),
    "gradient": ("symplectic", ["--gradient", "symplectic"]),
    "reuse_eps": (False, ["--no-reuse-eps"]),
}


def test_every_field_has_a_setting_here():
    assert set(SETTINGS) == set(OPTIONS)
    for name, (value, _) in SETTINGS.items():
        assert value != DEFAULTS[name]


class Reached(Exception):
    """Raised by the spy in place of the loop: the configuration that reached it."""


@pytest.fixture
def reached(monkeypatch):
    """Replace the guided loop by a spy; returns a function running a call to the spy."""

    def spy(run, x_T, **kw):
        raise Reached(run.config, kw)

    monkeypatch.setattr(sampler, "run_guided", spy)

    def run(call):
        with pytest.raises(Reached) as caught:
            call()
        return caught.value.args[0]

    return run


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(latent_size=8, dtype=torch.float64)


def api_call(digits_model, classifier, x_T, **options):
    loss = losses.target_class(classifier, 3)
    cond = digits_model.cond_for([3])  # CFG, so that cfg_scale may be set
    return lambda: sk.guided_sample(digits_model, loss, x_T, cond=cond, progress=False, **options)


def sd_call(pipe, **options):
    guided = GuidedStableDiffusion.from_pipe(pipe)
    return lambda: guided("a fox", loss_fn=lambda x: x.flatten(1).pow(2).mean(1), **options)


def cli_call(style, tmp_path, argv):
    base = ["sample", "a fox", "--tiny", "--style", str(style), "--out", str(tmp_path)]
    return lambda: cli_main(["--debug", *base, "--device", "cpu", "--no-progress", *argv])


@pytest.mark.parametrize("field", list(SETTINGS))
def test_every_field_reaches_the_loop_from_every_layer(
    reached, digits_model, classifier, x_T, pipe, style, tmp_path, field
):
    value, argv = SETTINGS[field]
    calls = {
        "api": api_call(digits_model, classifier, x_T, **{field: value}),
        "sd": sd_call(pipe, **{field: value}),
        "cli": cli_call(style, tmp_path, argv),
    }
    for layer, call in calls.items():
        config = reached(call)
        assert getattr(config, field) == value, layer


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_presets_values_survive_unless_set(reached, digits_model, classifier, x_T, pipe, preset):
    official = PRESETS[preset]
    for layer, build in (
        ("api", lambda **o: api_call(digits_model, classifier, x_T, preset=preset, **o)),
        ("sd", lambda **o: sd_call(pipe, preset=preset, **o)),
    ):
        config = reached(build())
        assert config.method.name == official.guidance, layer
        assert config.steps == official.steps and config.window == official.window, layer
        assert config.n == official.n and config.estimate_grid == official.estimate_grid, layer
        assert config.step_size == "per-batch", layer
        # under CFG in both layers; a preset without a w keeps the layer's default
        default_w = {"api": DEFAULTS["cfg_scale"], "sd": 7.5}[layer]
        assert config.cfg_scale == (official.cfg_scale or default_w), layer
        assert type(config.sampler).__name__ == official.scheduler[0], layer
        for field in ("n", "cfg_scale", "gradient", "estimate_grid"):  # given: overridden
            value = SETTINGS[field][0]
            assert getattr(reached(build(**{field: value})), field) == value, (layer, field)


def test_sd_freedom_preset_runs_at_its_own_cfg_scale(pipe):
    """The preset's w = 5 was overridden by the wrapper's 7.5 before: a run with the preset
    equals an explicit w = 5 run bit for bit (both resolve to the same configuration)."""
    guided = GuidedStableDiffusion.from_pipe(pipe)
    loss = lambda x: x.flatten(1).pow(2).mean(1)  # noqa: E731

    def run(**options):
        return guided(
            "a fox", loss_fn=loss, steps=4, output_type="latent", progress=False,
            generator=torch.Generator().manual_seed(0), preset="freedom-paper", **options,
        ).images  # fmt: skip

    preset, five, seven = run(), run(cfg_scale=5.0), run(cfg_scale=7.5)
    assert torch.equal(preset, five)
    assert not torch.allclose(preset, seven)


def test_backward_steps_reach_a_stable_diffusion_run(pipe):
    guided = GuidedStableDiffusion.from_pipe(pipe)
    loss = lambda x: x.flatten(1).pow(2).mean(1)  # noqa: E731
    runs = [
        guided(
            "a fox", loss_fn=loss, guidance="backward", backward_steps=m, steps=3,
            window=(0.0, 1.0), output_type="latent", progress=False,
            generator=torch.Generator().manual_seed(0),
        ).images
        for m in (1, 3)
    ]  # fmt: skip
    assert not torch.allclose(*runs)


def test_the_sample_command_runs_backward_guidance(style, tmp_path):
    out = tmp_path / "out"
    argv = ["sample", "a fox", "--tiny", "--style", str(style), "--out", str(out)]
    argv += ["--device", "cpu", "--no-progress", "--guidance", "backward", "--backward-steps", "2"]
    assert exit_code(cli_main, [*argv, "--steps", "2"]) == 0
    assert [p.name for p in out.glob("*.png")] == ["backward-seed0-000.png"]


def test_resolve_order_and_replace():
    config = GuidanceConfig.resolve(defaults={**DEFAULTS, "cfg_scale": 7.5}, n=None, steps=9)
    assert (config.cfg_scale, config.n, config.steps) == (7.5, DEFAULTS["n"], 9)
    assert config.replace(n=4, scale=None).n == 4 and config.replace(scale=None) == config
    assert config.describe()["steps"] == 9 and config.describe()["gradient"].startswith("budgeted")
    with pytest.raises(TypeError, match="unknown guidance option stpes"):
        GuidanceConfig.resolve(stpes=3)


DESCRIBE_SAG_PAPER = """
import json
import sagkit as sk
config = sk.GuidanceConfig.resolve(preset="sag-paper", model=sk.digits.load_pretrained("digits"))
print(json.dumps(config.describe(), sort_keys=True))
"""


def test_a_scheduler_is_described_alike_in_every_process():
    """Sweep shards are keyed by ``describe()``: a preset holding a diffusers scheduler must give
    the same description under any hash seed (its config's ``_use_default_values`` is a list
    made from a set, so it was ordered by the seed and a resumed sweep refused its shards)."""
    import os
    import subprocess
    import sys

    def started(seed: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        argv = [sys.executable, "-c", DESCRIBE_SAG_PAPER]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = [started(seed) for seed in ("1", "2")]  # both at once: each is mostly imports
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    first, second = (out.decode() for out, _ in outs)
    assert "sampler" in first and '"class": "DPMSolverMultistepScheduler"' in first
    assert second == first


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"guidance": "universal"}, ValueError, "guidance"),
        ({"guidance": 3}, TypeError, "guidance"),
        ({"steps": 0}, ValueError, "steps"),
        ({"n": 1.5}, ValueError, "n must"),
        ({"scale": -1.0}, ValueError, "scale"),
        ({"window": (0.7, 0.3)}, ValueError, "window"),
        ({"window": (0.05, 0.09), "steps": 10}, ValueError, "holds no step"),
        ({"repeats": [1, 2]}, ValueError, "one entry per step"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"sampler": "euler"}, ValueError, "sampler"),
        ({"sampler": object}, TypeError, "sampler"),
        ({"estimate_grid": "zero"}, ValueError, "estimate_grid"),
        ({"step_size": "batch"}, ValueError, "step_size"),
        ({"backward_steps": 0}, ValueError, "backward_steps"),
        ({"cfg_scale": float("nan")}, ValueError, "cfg_scale"),
        ({"gradient": "adjoint"}, ValueError, "exact engine"),
        ({"gradient": "bogus"}, ValueError, "bogus"),
        ({"reuse_eps": 1}, TypeError, "reuse_eps"),
    ],
)
def test_a_config_is_checked_when_built(options, error, match):
    with pytest.raises(error, match=match):
        GuidanceConfig(**options)


def test_a_scheduler_class_is_refused_by_name():
    from diffusers import DDIMScheduler

    with pytest.raises(TypeError, match="from_config"):
        GuidanceConfig(sampler=DDIMScheduler)


def test_config_with_preset_is_refused(digits_model, x_T):
    with pytest.raises(ValueError, match="config or preset"):
        sk.guided_sample(digits_model, None, x_T, config=GuidanceConfig(), preset="sag-paper")


# --- methods as objects, the engine per call ---------------------------------------------


class Nudge(GuidanceMethod):
    """A method of the test's own: moves every guided x_s by −scale (no name in the loop)."""

    name = "nudge"

    def correct(self, run, step, x_s):
        return x_s - run.scale


def test_a_new_method_is_one_class(digits_model, x_T, register_temporarily):
    options = {"steps": 4, "window": (0.0, 0.5), "progress": False, "scale": 0.25}
    loss = lambda x: x.flatten(1).pow(2).mean(1)  # noqa: E731
    plain = sk.guided_sample(digits_model, loss, x_T, guidance="none", **options)
    register_temporarily(GUIDANCE, "nudge", Nudge())
    for guidance in (Nudge(), "nudge"):
        nudged = sk.guided_sample(digits_model, loss, x_T, guidance=guidance, **options)
        assert not torch.equal(nudged, plain)


@pytest.mark.parametrize("guidance", ["freedom", "sag", "dps", "backward"])
def test_default_engine_equals_symplectic_to_rounding(digits_model, classifier, x_T, guidance):
    """The default engine ("budgeted": backprop's path on this UNet) and the symplectic adjoint
    are both exact for the estimate, so the samples agree within the float64 rounding of the
    two runs, each bounded by γ̃ of its counted chain (tests/helpers.py)."""
    loss = losses.target_class(classifier, 3)
    options = {"steps": 6, "window": (0.0, 1.0), "n": 2, "guidance": guidance, "progress": False}
    with RoundingChain() as chain:
        old = sk.guided_sample(
            digits_model, loss, x_T, gradient="symplectic",
            generator=torch.Generator().manual_seed(1), **options,
        )  # fmt: skip
        new = sk.guided_sample(
            digits_model, loss, x_T, generator=torch.Generator().manual_seed(1), **options
        )
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (old, new))
    assert rel(new, old) <= pair_bound(*bounds)


def test_an_engine_object_with_its_budget(digits_model, classifier, x_T):
    """A budget is part of the engine object: keeping no graph is the symplectic adjoint's
    path, bit for bit (the same calls in the same order)."""
    loss = losses.target_class(classifier, 3)
    options = {"steps": 4, "window": (0.0, 1.0), "n": 2, "progress": False}
    seeded = [torch.Generator().manual_seed(1) for _ in range(2)]
    none_kept = sk.make_budgeted(budget_bytes=0)
    a = sk.guided_sample(
        digits_model, loss, x_T, gradient=none_kept, generator=seeded[0], **options
    )
    b = sk.guided_sample(
        digits_model, loss, x_T, gradient="symplectic", reuse_eps=False, generator=seeded[1],
        **options,
    )  # fmt: skip
    assert torch.equal(a, b)


# --- the design, read from the code --------------------------------------------------------


@pytest.mark.parametrize(
    "name, field", [("num_inference_steps", "steps"), ("guidance_scale", "cfg_scale")]
)
def test_diffusers_names_are_refused_naming_sagkits_option(pipe, name, field):
    """Not aliases: the error names the field, on the sampler and on a pipeline."""
    message = rf"{name} is diffusers' name: sagkit's option is {field} \(pass {field}=4\)"
    with pytest.raises(TypeError, match=message):
        GuidanceConfig.resolve(**{name: 4})
    with pytest.raises(TypeError, match=message):
        GuidedStableDiffusion.from_pipe(pipe)("a fox", progress=False, **{name: 4})


@pytest.mark.parametrize("guidance", ["sag", "backward", "tfg"])
def test_a_bound_run_checks_nothing(monkeypatch, digits_model, classifier, x_T, guidance):
    """Checks at the edge only: once a configuration is bound, the loop (sampler, method,
    engine, solver) calls no check of sagkit.core.checks and builds no GuidanceConfig (whose
    construction checks every field); its value checks are the deferred ``require``s. The
    network's own edge stays: ``DiffusersModel.eps`` checks x, t and cond at every call
    (metadata and deferred values, no host–device sync), since users call it directly."""
    calls, in_network = [], []

    def recording(name, check):
        def recorded(*args, **kwargs):
            if not in_network:
                calls.append(name)
            return check(*args, **kwargs)

        return recorded

    for module in [m for n, m in sys.modules.items() if n.startswith("sagkit")]:
        for name, value in list(vars(module).items()):
            if name.startswith("check_") and getattr(value, "__module__", "") == checks.__name__:
                monkeypatch.setattr(module, name, recording(name, value))
    network = sk.DiffusersModel.eps

    def network_edge(self, *args, **kwargs):
        in_network.append(True)
        try:
            return network(self, *args, **kwargs)
        finally:
            in_network.pop()

    monkeypatch.setattr(sk.DiffusersModel, "eps", network_edge)
    config = GuidanceConfig(guidance=guidance, steps=4, window=(0.0, 1.0))
    monkeypatch.setattr(GuidanceConfig, "__post_init__", lambda self: calls.append("config"))
    null = digits_model.null_cond.to(x_T).expand(x_T.shape[0], -1)  # unconditional sampling
    run = config.bind(digits_model, losses.target_class(classifier, 3), cond=null)
    calls.clear()
    x = sampler.run_guided(run, x_T, generator=torch.Generator().manual_seed(0), progress=False)
    assert calls == [] and bool(torch.isfinite(x).all())


def test_the_loop_compares_no_name_or_rule():
    """run_guided holds no comparison with a string and no isinstance of a method class."""
    tree = ast.parse(inspect.getsource(sampler.run_guided))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            assert not any(
                isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands
            ), ast.unparse(node)
            assert not any(
                isinstance(o, ast.Attribute) and o.attr in ("name", "rule") for o in operands
            ), ast.unparse(node)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            raise AssertionError(ast.unparse(node))


def _sagkit_modules(tree) -> dict[str, str]:
    """Local names bound to sagkit modules by the imports of a file."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sagkit":
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else "sagkit"
                    )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sagkit"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                try:
                    importlib.import_module(full)
                except ImportError:
                    continue
                bound[alias.asname or alias.name] = full
    return bound


def _python_sources():
    """(path, Python source) of the package, the tests, the benchmarks and the notebooks."""
    for pattern in ("sagkit/**/*.py", "tests/**/*.py", "benchmarks/*.py"):
        for path in ROOT.glob(pattern):
            yield path, path.read_text()
    for path in ROOT.glob("notebooks/*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        lines = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path, "\n".join(line for line in lines.splitlines() if not line.startswith("%"))


def test_no_code_assigns_a_module_level_setting():
    """Behaviour is configured by objects passed down: nothing assigns (or monkeypatches) a
    data attribute of a sagkit module. Replacing a function by a spy in a test is allowed."""
    found = []
    for path, text in _python_sources():
        tree = ast.parse(text)
        modules = _sagkit_modules(tree)
        targets = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AugAssign):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                        targets.append((t.value.id, t.attr, node.lineno))
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "setattr"
                and len(node.args) >= 2
                and isinstance(node.args[0], ast.Name)
                and isinstance(node.args[1], ast.Constant)
            ):
                targets.append((node.args[0].id, node.args[1].value, node.lineno))
        for name, attr, line in targets:
            if name not in modules:
                continue
            module = importlib.import_module(modules[name])
            value = getattr(module, attr, None)
            if not callable(value):
                found.append(f"{path.relative_to(ROOT)}:{line} sets {modules[name]}.{attr}")
    assert not found, found


def test_no_module_of_sagkit_declares_a_setting():
    """No ``global`` statement anywhere in the package (a setting changed at run time)."""
    for path in ROOT.glob("sagkit/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not isinstance(node, ast.Global), f"{path}:{node.lineno}"


def test_guidance_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GuidanceConfig().n = 4  # type: ignore[misc]
