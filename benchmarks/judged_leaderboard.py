"""The judged leaderboard: every guidance method tuned and ranked by what it did not optimise.

The loss-only leaderboard (``benchmarks/leaderboard.py``) tunes each method by the loss it
minimises and scores accuracy with the classifier that guided it, so a method that fools the
classifier wins: its backward guidance, tuned to scale 512, scores 1.00 on the class task with
samples that are not digits (the judge below calls all 48 of them 4, and none passes the
realism check). Here every method of its ``TUNABLES`` still guides with the
task's loss exactly as there (the class task's: the shipped classifier's), but

- its scales are tuned (the beam search of :mod:`sagkit.lab.tuning`, same budget for every
  method, on the tuning samples) for the accuracy of an independent judge: an RBF
  support-vector machine on the 8×8 pixels trained only on digits the classifier never saw
  (:mod:`sagkit.digits.judge`), with the digit the task asks for as the label;
- under a realism constraint: a candidate whose pass rate of the realism check
  (:func:`sagkit.digits.evaluation.realism_check`) on its ``--tune-samples`` tuning samples
  (default 24) is more than ``--slack`` points (default 10) below unguided sampling's pass
  rate on the first ``--base-samples`` samples of the tuning split (default 128, a superset of
  every candidate's; unguided sampling is cheap, and a baseline of the candidates' own few
  samples is too noisy to bound anything: on 12 it was 0.58, against 0.85 on the 48
  evaluation samples) is infeasible: its score, 2 + the shortfall, exceeds every feasible
  candidate's (:func:`tuning_score`), so one is chosen only where no candidate is feasible
  (the row says so). Among feasible candidates of the same judge accuracy the more realistic
  wins;
- at evaluation the constraint is applied again, on the evaluation samples (disjoint from the
  tuning samples): a row whose realism pass rate is more than ``--slack`` points below the
  unguided row's, on the same seeds, is infeasible (``"feasible": false``; the table says
  "infeasible"). No method may win by leaving the data: the feasible rows are ranked first, by
  the judge's accuracy (rank 1 + the number of feasible rows of the task with a higher
  accuracy, so ties share a rank), then the infeasible rows after them, by the same rule
  (rank 1 + the number of feasible rows + the number of infeasible rows with a higher
  accuracy). Beside it, as a contrast, the rank each method had in the stored loss-only
  leaderboard (``results/leaderboard.json``, read, not run again; its rank by mean loss, ties
  sharing);
- SAG's question, whether its n-step estimate helps, is asked of the judge in paired
  comparisons on the same seeds (:data:`PAIRS`: SAG n=3 against FreeDoM, TFG+SAG n=3 against
  TFG): the mean ± standard error of the per-sample differences of the judge's correct (1) or
  incorrect (0) verdicts.

Tasks: ``class`` (guide toward the digit :data:`sagkit.lab.evaluation.CLASS_TARGET`; the judge
must call the sample that digit) and ``inpaint`` (complete the bottom half of a held-out
digit; the judge must call the completion the reference's digit). Columns per row: the guided
loss, the judge's accuracy ± its standard error, the guiding classifier's accuracy, the
realism pass rate, the Fréchet distance in the classifier's features to real digits of the
label (:mod:`sagkit.lab.evaluation`), whether the tuned candidate was feasible on the tuning
samples and whether the row is feasible on the evaluation samples.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judged_leaderboard.py \
        --out-dir /tmp/judged-shards --note "one process, OMP_NUM_THREADS=1, ..."
        # the stored size: the defaults (48 evaluation samples, 24 tuning samples per
        # candidate, budget 12, a baseline of 128 unguided tuning samples); ~30 min on one
        # shared CPU core; --out-dir keeps the shards, so a stopped run resumes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judged_leaderboard.py --steps 4 \
        --num-samples 4 --tune-samples 3 --base-samples 6 --budget 3 \
        --methods freedom "sag n=3" --json /tmp/judged.json   # a toy size (TFG's 3 scales
                                                              # need budget 7)

writes ``--json`` (default ``benchmarks/results/judged_leaderboard.json``, with every tuning
candidate's judge accuracy, realism and score, and the paired comparisons) and a ``.md``
of its tables beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch

import sagkit as sk
from sagkit.core.device import apply_cpu_threads
from sagkit.digits.evaluation import realism_check
from sagkit.digits.judge import load_judge
from sagkit.lab.evaluation import default_tasks, evaluate_guidance
from sagkit.lab.tuning import tune_methods, tuned_variants

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASKS = ("class", "inpaint")
PAIRS = (("sag n=3", "freedom"), ("tfg+sag n=3", "tfg"))
"""(method, baseline): the paired comparisons of the judge's accuracy, SAG's n-step estimate
against the one-step estimate it replaces."""


def _sibling(name: str):
    """A module of benchmarks/ (not a package) loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


leaderboard = _sibling("leaderboard")
TUNABLES = leaderboard.TUNABLES


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num-samples", type=int, default=48, help="evaluation samples")
    parser.add_argument("--tune-samples", type=int, default=24, help="samples per candidate")
    parser.add_argument(
        "--base-samples", type=int, default=128, help="unguided tuning samples: the baseline"
    )
    parser.add_argument("--budget", type=int, default=12, help="candidates per method and task")
    parser.add_argument("--beam", type=int, default=2)
    parser.add_argument("--window", type=float, nargs=2, default=[0.3, 0.7])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slack", type=int, default=10, help="realism points below unguided")
    parser.add_argument("--batch-size", type=int, default=48, help="samples per shard")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=None, help="labels of TUNABLES")
    parser.add_argument("--out-dir", type=Path, default=None, help="shard files (resume)")
    parser.add_argument("--loss-only", type=Path, default=RESULTS / "leaderboard.json")
    parser.add_argument("--json", type=Path, default=RESULTS / "judged_leaderboard.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default="", help="recorded with the run (e.g. the load)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.base_samples < args.tune_samples:
        raise SystemExit("--base-samples must be at least --tune-samples (a superset of them)")
    return leaderboard.run(args, judged, markdown)


def judged(args, ctx, say) -> dict:
    """Tune every method for the judge under the realism constraint, evaluate, rank."""
    model = sk.digits.load_pretrained("digits", device=ctx.device)
    classifier = sk.digits.load_classifier("digits", device=ctx.device)
    judge = load_judge()
    realism = realism_check()
    tasks = [t for t in default_tasks(classifier) if t.name in args.tasks]
    tunables = leaderboard.chosen(args)
    shared = {"steps": args.steps, "window": tuple(args.window), "repeats": args.repeats}
    common = {"seed": args.seed, "batch_size": args.batch_size, "out_dir": args.out_dir}
    loss_only = loss_only_ranks(json.loads(args.loss_only.read_text()))
    unguided, unguided_evaluation, tuning, rows = {}, {}, {}, []
    for task in tasks:
        (base,) = evaluate_guidance(
            model,
            classifier,
            tasks=[task],
            methods=("none",),
            num_samples=args.base_samples,
            split="tuning",
            keep_samples=True,
            # its shards apart: a shard file's name does not hold the split, and the
            # evaluation's unguided shards would have the same names
            **common | {"out_dir": None if args.out_dir is None else args.out_dir / "unguided"},
            **shared,
        )
        base_passed = int(realism(base["samples"]).sum())
        unguided[task.name] = base_passed / args.base_samples
        say(f"unguided realism on {task.name}: {base_passed}/{args.base_samples} tuning samples")

        def measure(row, task=task, base_passed=base_passed) -> dict:
            correct = judge.predict(row["samples"]) == task.label
            passed = int(realism(row["samples"]).sum())
            n = len(correct)
            ok = feasible(passed, n, base_passed, args.base_samples, slack=args.slack)
            accuracy = float(correct.double().mean())
            realistic = passed / n
            return {
                "score": tuning_score(
                    accuracy, realistic, base_passed / args.base_samples, ok=ok, n=n
                ),
                "judge_accuracy": accuracy,
                "realism": realistic,
                "feasible": ok,
            }

        say(f"tuning {len(tunables)} methods on {task.name}, budget {args.budget}")
        tuning[task.name] = tune_methods(
            model,
            classifier,
            tunables,
            tasks=[task],
            num_samples=args.tune_samples,
            budget=args.budget,
            beam=args.beam,
            measure=measure,
            log=say,
            **common,
            **shared,
        )[task.name]
        part = evaluate_guidance(
            model,
            classifier,
            tasks=[task],
            methods=("none",),
            variants=tuned_variants(tunables, {"tasks": tuning}, task.name),
            num_samples=args.num_samples,
            keep_samples=True,
            **common,
            **shared,
        )
        none_passed = int(realism(next(r for r in part if r["method"] == "none")["samples"]).sum())
        unguided_evaluation[task.name] = none_passed / args.num_samples
        for r in part:
            correct = (judge.predict(r["samples"]) == task.label).double()
            realistic = realism(r["samples"])
            entry = tuning[task.name].get(r["method"])
            rows.append(
                {
                    "task": task.name,
                    "method": r["method"],
                    "guidance": r["guidance"],
                    "scales": None if entry is None else entry["values"],
                    "tuned_feasible": None if entry is None else entry_feasible(entry),
                    "loss": r["loss"],
                    "loss_se": r["loss_se"],
                    "judge_accuracy": float(correct.mean()),
                    "judge_se": standard_error(correct),
                    "classifier_accuracy": r["accuracy"],
                    "realism": float(realistic.double().mean()),
                    "feasible": feasible(
                        int(realistic.sum()),
                        len(correct),
                        none_passed,
                        args.num_samples,
                        slack=args.slack,
                    ),
                    "fd": r["fd"],
                    "sec_per_sample": r["sec_per_sample"],
                    "loss_only_rank": loss_only.get((task.name, r["method"])),
                    "per_sample": {
                        "loss": torch.as_tensor(r["per_sample"]).tolist(),
                        "judge_correct": correct.int().tolist(),
                        "realistic": realistic.int().tolist(),
                    },
                }
            )
        say(f"evaluated {task.name}")
    settings = {
        "model": "digits",
        "tasks": [t.name for t in tasks],
        "steps": args.steps,
        "window": list(args.window),
        "repeats": args.repeats,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "judge": "sagkit.digits.judge.load_judge(): ten one-vs-rest RBF SVCs on 8x8 pixels, "
        "trained on 240 of the 360 held-out digits",
        "judge_accuracy": judge.config["accuracy"],
        "realism": "sagkit.digits.evaluation.realism_check()",
        "slack_points": args.slack,
        "tuning": {
            "tune_samples": args.tune_samples,
            "budget": args.budget,
            "beam": args.beam,
            "split": "tuning",
            "score": "1 - judge accuracy + (1 - realism) / (tune_samples + 1) if feasible, else "
            "2 + the realism shortfall below unguided sampling's pass rate (infeasible: more "
            "than slack_points below it)",
            "unguided_realism": unguided,
            "unguided_samples": args.base_samples,
            "unguided_split": "tuning: its first unguided_samples samples, a superset of every "
            "candidate's tune_samples",
        },
        "evaluation_unguided_realism": unguided_evaluation,
        "feasible": "realism pass rate on the evaluation samples at most slack_points below "
        "the unguided row's on the same samples; feasible rows rank first (by judge "
        "accuracy), then infeasible ones (by judge accuracy)",
        "paired": "judge accuracy of method minus baseline, per sample on the same seeds "
        "(correct 1, incorrect 0): mean, standard error, and the samples only the method "
        "(better) or only the baseline (worse) got right",
        "loss_only_file": args.loss_only.name,
        "loss_only_rank": "rank by mean loss among the task's rows of the loss-only leaderboard",
    }
    rows = ranked(rows)
    return {"settings": settings, "rows": rows, "paired": paired(rows), "tuning": tuning}


def feasible(passed: int, n: int, base_passed: int, base_n: int, *, slack: int) -> bool:
    """Whether a pass rate of ``passed``/n is at most ``slack`` points below the baseline's
    ``base_passed``/base_n: 100 (base_passed · n − passed · base_n) ≤ slack · n · base_n, in
    integers (no rounding at the bound)."""
    return 100 * (base_passed * n - passed * base_n) <= slack * n * base_n


def tuning_score(accuracy: float, realism: float, base: float, *, ok: bool, n: int) -> float:
    """The score the beam search minimises, of a candidate's judge accuracy and realism pass
    rate on n tuning samples (``base``: unguided sampling's pass rate on them).

    Feasible: 1 − accuracy + (1 − realism)/(n + 1) ∈ [0, 1 + 1/(n + 1)]: the judge's accuracy
    first (two accuracies on n samples differ by at least 1/n, more than the realism term
    ever adds), realism breaking ties. Infeasible: 2 + (base − realism) > 2, above every
    feasible score, the least short of unguided sampling's realism first."""
    return 1 - accuracy + (1 - realism) / (n + 1) if ok else 2 + (base - realism)


def standard_error(values: torch.Tensor) -> float:
    """std(values)/√N (Bessel's std), as the loss's ``loss_se``."""
    return float(values.double().std() / math.sqrt(len(values)))


def entry_feasible(entry: dict) -> bool:
    """Whether a tuned entry's chosen values were a feasible candidate."""
    return next(h["feasible"] for h in entry["history"] if h["values"] == entry["values"])


def ranks(values: list[float], *, higher_first: bool) -> list[int]:
    """Competition ranks: 1 + how many values are better (ties share a rank)."""
    sign = -1 if higher_first else 1
    return [1 + sum(sign * w < sign * v for w in values) for v in values]


def loss_only_ranks(stored: dict) -> dict[tuple[str, str], int]:
    """{(task, method): rank by mean loss} of the stored loss-only leaderboard's rows."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in stored["rows"]):
        mine = [r for r in stored["rows"] if r["task"] == task]
        for r, rank in zip(mine, ranks([r["loss"] for r in mine], higher_first=False), strict=True):
            out[(task, r["method"])] = rank
    return out


def ranked(rows: list[dict]) -> list[dict]:
    """The rows with their judge rank, sorted by task, then rank (then method order): the
    feasible rows first, ranked by the judge's accuracy among themselves, then the infeasible
    ones, ranked among themselves after all the feasible ones."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        good = [r for r in mine if r["feasible"]]
        bad = [r for r in mine if not r["feasible"]]
        for group, offset in ((good, 0), (bad, len(good))):
            order = ranks([r["judge_accuracy"] for r in group], higher_first=True)
            out += sorted(
                ({"judge_rank": offset + k} | r for r, k in zip(group, order, strict=True)),
                key=lambda r: r["judge_rank"],
            )
    return out


def paired(rows: list[dict], pairs=PAIRS) -> list[dict]:
    """The paired comparisons of :data:`PAIRS` on each task holding both rows: the per-sample
    differences of the judge's verdicts (method − baseline, on the same seeds)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {r["method"]: r for r in rows if r["task"] == task}
        for method, baseline in pairs:
            if method not in by or baseline not in by:
                continue
            a = torch.tensor(by[method]["per_sample"]["judge_correct"], dtype=torch.float64)
            b = torch.tensor(by[baseline]["per_sample"]["judge_correct"], dtype=torch.float64)
            diff = a - b
            out.append(
                {
                    "task": task,
                    "method": method,
                    "baseline": baseline,
                    "n": len(diff),
                    "mean": float(diff.mean()),
                    "se": standard_error(diff),
                    "better": int((diff > 0).sum()),
                    "worse": int((diff < 0).sum()),
                    "method_feasible": by[method]["feasible"],
                    "baseline_feasible": by[baseline]["feasible"],
                }
            )
    return out


def markdown(result: dict) -> str:
    """The judged leaderboard as Markdown: the settings, how many methods met the constraint,
    one table (feasible rows first, by judge rank, within each task) and the paired
    comparisons."""
    s = result["settings"]
    t = s["tuning"]
    unguided = ", ".join(f"{k} {v:.2f}" for k, v in t["unguided_realism"].items())
    evaluation = ", ".join(f"{k} {v:.2f}" for k, v in s["evaluation_unguided_realism"].items())
    lines = [
        f"{s['num_samples']} evaluation samples per row, {s['steps']} steps, window "
        f"{tuple(s['window'])}, {s['repeats']} repeats. Every method guided by the task's loss "
        "(the class task's: the shipped classifier's), its scales tuned (budget "
        f"{t['budget']}, {t['tune_samples']} tuning samples per candidate) for the judge's "
        "accuracy (ties broken by realism), a candidate more than "
        f"{s['slack_points']} points below unguided sampling's realism pass rate on "
        f"{t['unguided_samples']} unguided tuning samples ({unguided}) infeasible. Judge: an "
        "RBF SVM on 8×8 pixels trained on digits the classifier never saw.\n",
        f"The constraint at evaluation: a row whose realism pass rate is more than "
        f"{s['slack_points']} points below the unguided row's on the same "
        f"{s['num_samples']} evaluation samples ({evaluation}) is **infeasible**. Feasible rows "
        "rank first, by the judge's accuracy (± standard error), then the infeasible ones. "
        "Loss-only rank, a contrast: the method's rank by loss in "
        f"`{s['loss_only_file']}`, where the guiding classifier scores its own guidance.\n",
    ]
    for task in s["tasks"]:
        guided = [r for r in result["rows"] if r["task"] == task and r["method"] != "none"]
        met = sum(r["feasible"] for r in guided)
        lines.append(f"- {task}: {met} of {len(guided)} guided methods met the constraint.")
    lines += [
        "",
        "| task | judge rank | method | constraint | scales | judge acc | classifier acc "
        "| realism | FD | loss | loss-only rank (contrast) | tuned feasible |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        scales = ", ".join(f"{k}={v:.3g}" for k, v in (r["scales"] or {}).items())
        constraint = "met" if r["feasible"] else "**infeasible**"
        tuned = {None: "", True: "yes", False: "no"}[r["tuned_feasible"]]
        lines.append(
            f"| {r['task']} | {r['judge_rank']} | {r['method']} | {constraint} | {scales} "
            f"| {r['judge_accuracy']:.2f} ± {r['judge_se']:.2f} "
            f"| {r['classifier_accuracy']:.2f} | {r['realism']:.2f} | {r['fd']:.2f} "
            f"| {r['loss']:.4g} ± {r['loss_se']:.2g} | {r['loss_only_rank']} | {tuned} |"
        )
    if result["paired"]:
        lines += [
            "",
            "Paired on the same seeds: the judge's accuracy of the method minus the baseline's "
            "(per-sample differences of correct 1 / incorrect 0, mean ± standard error; better: "
            "samples only the method got right, worse: only the baseline).\n",
            "| task | method | baseline | difference | better | worse | n | constraint "
            "(method / baseline) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        word = {True: "met", False: "infeasible"}
        for c in result["paired"]:
            lines.append(
                f"| {c['task']} | {c['method']} | {c['baseline']} "
                f"| {c['mean']:+.3f} ± {c['se']:.3f} | {c['better']} | {c['worse']} | {c['n']} "
                f"| {word[c['method_feasible']]} / {word[c['baseline_feasible']]} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
