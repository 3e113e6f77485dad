"""The benchmark and the command line."""

import json

import pytest
import torch
from helpers import RoundingChain, pair_bound, roundoff_bound

import sagkit as sk
from sagkit.core.device import resolve_device
from sagkit.lab import bench
from sagkit.lab.bench import bench_table, run_benchmark
from sagkit.lab.cli import build_parser, main


def test_bench_json_smoke(capsys, monkeypatch):
    # count the roundings behind the float32 symplectic gradient and the float64 reference
    chains = {"symplectic": [], "reference": []}
    profile, grad = bench.profile_gradient, bench.loss_grad

    def counted_profile(model, loss_fn, x, ts, **kwargs):
        if kwargs["method"] != "symplectic" or kwargs.get("track_saved") is False:  # timing
            return profile(model, loss_fn, x, ts, **kwargs)
        with RoundingChain() as chain:
            report = profile(model, loss_fn, x, ts, **kwargs)
        chains["symplectic"].append(chain.longest(report.result[1]))
        return report

    def counted_grad(model, loss_fn, x, ts, **kwargs):
        if x.dtype != torch.float64:
            return grad(model, loss_fn, x, ts, **kwargs)
        with RoundingChain() as chain:
            out = grad(model, loss_fn, x, ts, **kwargs)
        chains["reference"].append(chain.longest(out[1]))
        return out

    monkeypatch.setattr(bench, "profile_gradient", counted_profile)
    monkeypatch.setattr(bench, "loss_grad", counted_grad)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32, not TF32, on CUDA
    assert main(["bench", "--ns", "2", "4", "--json", "--repeats", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["n"], r["method"]) for r in rows} == {(n, m) for n in (2, 4) for m in sk.METHODS}
    by = {(r["n"], r["method"]): r for r in rows}
    for i, n in enumerate((2, 4)):
        for method in sk.METHODS:  # ratios of times measured in the same rounds
            row = by[n, method]
            assert row["time_rel"] == pytest.approx(row["time_s"] / by[n, "backprop"]["time_s"])
        assert by[n, "backprop"]["model_calls"] == n
        # float32 symplectic against float64 backprop: the sum of their rounding bounds
        bound = pair_bound(
            roundoff_bound(chains["symplectic"][i], torch.float32),
            roundoff_bound(chains["reference"][i], torch.float64),
        )
        assert by[n, "symplectic"]["rel_err_exact"] <= bound
        assert by[n, "symplectic"]["saved_bytes"] < by[n, "backprop"]["saved_bytes"]
        assert by[n, "backprop"]["cuda_peak_bytes"] is None or by[n, "backprop"]["device"] != "cpu"


def test_bench_table_on_the_mixture(capsys):
    assert main(["bench", "--model", "mixture", "--dtype", "float64", "--ns", "3"]) == 0
    out = capsys.readouterr().out
    assert "model=mixture dtype=float64" in out
    for method in sk.METHODS:
        assert method in out


def test_run_benchmark_rows_and_errors(register_temporarily):
    odd = sk.Tableau("zero-weight", a=((), (0.5,)), b=(1.0, 0.0), c=(0.0, 0.5), order=1)
    register_temporarily(sk.SOLVERS, odd.name, odd)
    rows = run_benchmark(
        model="mixture", dtype="float64", ns=(2,), solver=odd.name, methods=["backprop", "symplectic"],
        repeats=1, progress=False,
    )  # fmt: skip
    assert rows[0]["rel_err_exact"] == 0.0 and "error" not in rows[0]
    assert rows[1]["error"] == sk.METHODS["symplectic"].refusal(odd.name)
    assert "n/a" in bench_table(rows)
    with pytest.raises(ValueError, match="unknown method 'magic'; known: backprop"):
        run_benchmark(model="mixture", methods=["magic"])
    with pytest.raises(ValueError, match="unknown benchmark model"):
        run_benchmark(model="vae")


def test_cli_structure():
    assert main([]) == 2  # no subcommand: help
    args = build_parser().parse_args(["bench"])
    assert args.model == "unet" and args.dtype == "float32" and args.ns == [8, 16, 64]
    assert args.solver == "ddim" and args.device == "auto" and not args.json
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--model", "vae"])
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_pivot_table_has_one_line_per_method_and_a_column_per_n():
    from sagkit.lab.bench import pivot_table

    rows = [
        {"n": 2, "method": "backprop", "saved_bytes": 2 * 2**20},
        {"n": 4, "method": "backprop", "saved_bytes": 4 * 2**20},
        {"n": 2, "method": "symplectic", "saved_bytes": 2**19},
        {"n": 4, "method": "symplectic", "error": "refused"},
    ]
    lines = pivot_table(rows, "saved_bytes", unit=2**20).splitlines()
    assert lines[0].split() == ["method", "n=2", "n=4"]
    assert lines[1].split() == ["backprop", "2.00", "4.00"]
    assert lines[2].split() == ["symplectic", "0.50", "-"]


class RecordingBar(bench.tqdm):
    """A progress bar that records its total, its updates and the steps it named."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates, self.named = 0, []
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.updates += n
        return super().update(n)

    def set_postfix_str(self, s="", refresh=True):
        self.named.append(s)
        return super().set_postfix_str(s, refresh)


@pytest.fixture
def recording_bar(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(bench, "tqdm", RecordingBar)
    return RecordingBar.made


def test_the_benchmark_bar_advances_after_every_gradient(recording_bar):
    """No silent stretch: per n one update for the references, then one per warm-up, per timed
    run and per profile, each named before it starts."""
    methods = ["backprop", "symplectic", "adjoint"]
    run_benchmark(model="mixture", dtype="float64", ns=(2, 3), methods=methods, repeats=2)
    (bar,) = recording_bar
    per_n = 1 + len(methods) * (1 + 2) + len(methods)
    assert bar.total == bar.updates == 2 * per_n
    assert len(bar.named) == bar.updates
    assert "n=3: timing adjoint (2/2)" in bar.named


def test_the_accuracy_bar_advances_per_method(recording_bar):
    mixture, _ = bench.build_model("mixture")
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = bench.gradient_accuracy(
        mixture, lambda out: out.square().flatten(1).sum(1), x, ns=(2, 3),
        methods=["backprop", "adjoint"], progress=True,
    )  # fmt: skip
    (bar,) = recording_bar
    assert bar.total == bar.updates == 2 * (1 + 2) and len(rows) == 4
    assert {"dir_err_fd", "rel_err_exact"} <= set(rows[1])
