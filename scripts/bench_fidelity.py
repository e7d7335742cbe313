"""Fidelity benchmark (issue #13 item 4): what stopping hopeless merges early buys on zoo v2.

The demo study (``studies/tiny.yaml`` on the zoo in ``.cache/zoo-2``: 4 blocks + the rest x 2
experts, task arithmetic, objectives accuracy (maximize) and mean answer tokens (minimize) on
the arithmetic task, CPU, experts not enqueued), with ``--items`` prompts per objective (default
96, of the task file's 200: the demo's 24 leave a first rung of 6 items, which bounds nothing)
and ``max_new_tokens`` 32. Each run evaluates ``--trials`` trials (COMPLETE or stopped), asking
4 at a time as 4 workers would, each told as soon as it is scored (so later trials of a batch
see earlier ones in the front). Modes:

- ``full``: no fidelity, every trial scored on every item;
- ``informative``: ``fidelity: {rungs: RUNGS, confidence: C, first_rung_items: informative}``
  (the default estimator, ``calibrated``);
- ``random``: the same with ``first_rung_items: random``;
- ``informative-design``, ``random-design``: the same with ``estimator: design``.

A sampler ``saasbo-qnehvi:ignore`` is saasbo with ``stopped_trials: ignore`` (the default
observes stopped trials); its fractions are of plain saasbo's ``full`` run, which no stopped
trial can change.

Every stopped trial is also scored fully inside the benchmark (not counted in its tokens), to
know whether full evaluation would have put it on the run's final front.

Reported per (sampler, mode), mean (min-max) over seeds: the hypervolume after all trials
(reference point accuracy 0, 32 tokens) as a fraction of the ``full`` run's of the same
sampler and seed; the tokens generated as a fraction of that run's; the tokens spent when the
run first reached 0.97 of the full run's final hypervolume (fraction of the full run's tokens;
"-" when it never did); stopped trials; and the share of stopped trials that full evaluation
would have put on the final front (non-dominated by every COMPLETE trial of the run).

A run appends one JSON line to ``--out`` when it ends (a rerun skips the runs already there:
the benchmark resumes); ``--jobs`` runs that many at once, one process each.

Usage (the full benchmark, one command; about 2 x 3 x 3 runs of 48 trials):
    python scripts/bench_fidelity.py run --samplers saasbo-qnehvi,tpe \
        --modes full,informative,random --seeds 0,1,2 --trials 48 --jobs 6 --threads 2 \
        --out bench-fidelity.jsonl
    python scripts/bench_fidelity.py table bench-fidelity.jsonl --machine "..."
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's mergeopt and tests, not an installed copy
MODES = ("full", "informative", "random", "informative-design", "random-design")
REFERENCE = [0.0, 32.0]  # accuracy 0, max_new_tokens
MAXIMIZE = [True, False]
BATCH = 4
STARTUP = 4
TARGET_HV = 0.97


def make_spec(mode: str, seed: int, items: int, rungs: list[float], confidence: float) -> Any:
    from mergeopt.spec import StudySpec
    from tests._zoo_fixture import cached_zoo
    from tests.conftest import tiny_spec

    data = tiny_spec(cached_zoo(), sampler={"name": "random", "enqueue_experts": False})
    for objective in data["objectives"]:
        objective["limit"] = items
    data["scorer"]["batch_size"] = min(items, 96)
    data["seed"] = seed
    if mode != "full":
        items, _, estimator = mode.partition("-")
        data["fidelity"] = {
            "rungs": rungs,
            "confidence": confidence,
            "first_rung_items": items,
            "estimator": estimator or "calibrated",
        }
    return StudySpec.model_validate(data)


def make_sampler(name: str, seed: int, genome: Any) -> Any:
    from mergeopt.samplers import create_sampler

    options: dict[str, Any] = {}
    name, _, stopped = name.partition(":")
    if name.startswith("saasbo"):
        options = {"n_startup_trials": STARTUP, "batch_size": BATCH}
        if stopped:
            options["stopped_trials"] = stopped
    return create_sampler(name, options, seed=seed, genome=genome, num_objectives=2)


def run_one(args: argparse.Namespace, sampler: str, mode: str, seed: int) -> dict[str, Any]:
    """One run (module docstring); returns its JSON record."""
    import tempfile

    import optuna
    from optuna.trial import TrialState

    from mergeopt.hypervolume import hypervolume
    from mergeopt.objectives.fidelity import Finished, dominated, finished_trials
    from mergeopt.runner import TrialRunner, TrialStopped
    from mergeopt.seeds import derive_seed
    from mergeopt.study import create_study, stored_genome

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = make_spec(mode, seed, args.items, args.rungs, args.confidence)
    folder = tempfile.mkdtemp(prefix="bench-fidelity-")
    created = create_study(spec, storage_url=f"sqlite:///{folder}/zoo.db", name="zoo")
    genome = stored_genome(created)
    # The run itself on an in-memory copy (the batch samplers hand out 4 asks from one process
    # only there; see scripts/bench_samplers.py).
    study = optuna.create_study(
        directions=created.directions, sampler=make_sampler(sampler, seed, genome)
    )
    for key, value in created.user_attrs.items():
        study.set_user_attr(key, value)
    started = time.perf_counter()
    runner = TrialRunner(study, device="cpu")
    setup_seconds = time.perf_counter() - started

    def complete_trials() -> list[Finished]:
        return finished_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def complete_values() -> list[list[float]]:
        return [list(f.values) for f in complete_trials()]

    trials: list[dict[str, Any]] = []
    curve: list[tuple[int, float]] = []
    spent = 0
    try:
        while len(trials) < args.trials:
            batch = min(BATCH, args.trials - len(trials))
            for trial in [study.ask(genome.distributions()) for _ in range(batch)]:
                merge_seed = derive_seed(seed, trial.number)
                runner.front = complete_trials if mode != "full" else None
                row: dict[str, Any] = {"number": trial.number}
                try:
                    values, user_attrs = runner.evaluate(trial.params, seed=merge_seed)
                    for key, value in user_attrs.items():  # the rungs calibrate on them
                        trial.set_user_attr(key, value)
                    study.tell(trial, values)
                    row.update(state="COMPLETE", values=values)
                except TrialStopped as stop:
                    user_attrs = stop.user_attrs
                    for key, value in user_attrs.items():  # samplers may observe its values
                        trial.set_user_attr(key, value)
                    study.tell(trial, state=TrialState.PRUNED)
                    runner.front = None  # score it fully, outside the run's cost
                    full_values, _ = runner.evaluate(trial.params, seed=merge_seed)
                    row.update(state="PRUNED", values=stop.values, full_values=full_values)
                row["tokens"] = user_attrs["mergeopt:tokens_generated"]
                row["items"] = user_attrs["mergeopt:items_scored"]
                if "mergeopt:fidelity" in user_attrs:
                    row["rung"] = user_attrs["mergeopt:fidelity"]["rung"]
                    row["intervals"] = user_attrs["mergeopt:fidelity"]["intervals"]
                    row["rung_raw"] = user_attrs["mergeopt:fidelity"].get("rung_raw", [])
                    row["raw"] = user_attrs.get("mergeopt:raw_values")
                spent += row["tokens"]
                trials.append(row)
                curve.append((spent, hypervolume(complete_values(), REFERENCE, MAXIMIZE)))
    finally:
        runner.close()
    front = complete_values()
    stopped = [t for t in trials if t["state"] == "PRUNED"]
    on_front = sum(not dominated(t["full_values"], front, MAXIMIZE) for t in stopped)
    return {
        "sampler": sampler,
        "mode": mode,
        "seed": seed,
        "items": args.items,
        "rungs": args.rungs,
        "confidence": args.confidence,
        "trials": trials,
        "hypervolume": curve[-1][1] if curve else 0.0,
        "tokens": spent,
        "curve": curve,
        "stopped": len(stopped),
        "stopped_on_front": on_front,
        "setup_seconds": round(setup_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def done_runs(out: str) -> set[tuple[str, str, int]]:
    if not out or not os.path.exists(out):
        return set()
    with open(out) as handle:
        return {
            (r["sampler"], r["mode"], r["seed"]) for r in map(json.loads, filter(str.strip, handle))
        }


def command_run(args: argparse.Namespace) -> None:
    jobs = [
        (sampler, mode, seed)
        for sampler in args.samplers.split(",")
        for mode in args.modes.split(",")
        for seed in (int(s) for s in args.seeds.split(","))
        if (sampler, mode, seed) not in done_runs(args.out)
    ]
    common = ["--items", str(args.items), "--trials", str(args.trials), "--out", args.out]
    common += ["--rungs", ",".join(map(str, args.rungs)), "--confidence", str(args.confidence)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    running: list[subprocess.Popen[bytes]] = []
    failed = 0
    while jobs or running:
        while jobs and len(running) < args.jobs:
            sampler, mode, seed = jobs.pop(0)
            cmd = [sys.executable, __file__, "one", sampler, mode, str(seed), *common]
            running.append(subprocess.Popen(cmd, env=env))
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                failed += proc.returncode != 0
        time.sleep(0.5)
    if failed:
        sys.exit(f"{failed} run(s) failed; rerun the same command to retry them")


def command_one(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    record = run_one(args, args.sampler, args.mode, args.seed)
    with open(args.out, "a") as handle:  # one append per run: no interleaving
        handle.write(json.dumps(record) + "\n")
    print(
        f"{args.sampler} {args.mode} seed {args.seed}: hv {record['hypervolume']:.4f}, "
        f"{record['tokens']} tokens, {record['stopped']} stopped "
        f"({record['stopped_on_front']} would be on the front)",
        flush=True,
    )


def _summary(values: list[float], percent: bool = False) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if percent:
        return f"{mean:.0%} ({min(values):.0%}-{max(values):.0%})"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(records: list[dict[str, Any]], machine: str) -> str:
    by_key = {(r["sampler"], r["mode"], r["seed"]): r for r in records}
    first = records[0]
    lines = [
        f"Fidelity benchmark, {time.strftime('%Y-%m-%d')}, {machine}: zoo v2 demo study, "
        f"{first['items']} items per objective, {len(first['trials'])} trials, rungs "
        f"{first['rungs']}, confidence {first['confidence']}; fractions are of the `full` run "
        "of the same sampler and seed.",
        "",
        "| sampler | mode | seeds | hypervolume / full | tokens / full | tokens to reach "
        f"{TARGET_HV} x full hv | stopped trials | stopped that full evaluation puts on "
        "the front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sampler in dict.fromkeys(r["sampler"] for r in records):
        for mode in MODES:
            runs = [r for (s, m, _), r in sorted(by_key.items()) if s == sampler and m == mode]
            hv, tokens, reach, stopped, share = [], [], [], [], []
            for run in runs:
                full = by_key.get((sampler.partition(":")[0], "full", run["seed"]))
                if full is None or not full["hypervolume"] or not full["tokens"]:
                    continue
                hv.append(run["hypervolume"] / full["hypervolume"])
                tokens.append(run["tokens"] / full["tokens"])
                goal = TARGET_HV * full["hypervolume"]
                hit = next((c for c, h in run["curve"] if h >= goal), None)
                if hit is not None:
                    reach.append(hit / full["tokens"])
                stopped.append(float(run["stopped"]))
                if run["stopped"]:
                    share.append(run["stopped_on_front"] / run["stopped"])
            if not runs:
                continue
            lines.append(
                f"| {sampler} | {mode} | {len(runs)} | {_summary(hv)} | {_summary(tokens, True)} "
                f"| {_summary(reach, True)} ({len(reach)}/{len(hv)} reached) "
                f"| {_summary(stopped)} | {_summary(share, True)} |"
            )
    return "\n".join(lines)


def command_table(args: argparse.Namespace) -> None:
    with open(args.jsonl) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    print(table(records, args.machine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--items", type=int, default=96, help="prompts per objective (of 200)")
        p.add_argument("--trials", type=int, default=48)
        p.add_argument(
            "--rungs", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 1.0]
        )
        p.add_argument("--confidence", type=float, default=0.9)
        p.add_argument("--out", default="bench-fidelity.jsonl")

    run = sub.add_parser("run", help="run the missing (sampler, mode, seed) runs")
    run.add_argument("--samplers", default="saasbo-qnehvi,tpe")
    run.add_argument("--modes", default=",".join(MODES))
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--threads", type=int, default=2)
    run_options(run)
    run.set_defaults(func=command_run)
    one = sub.add_parser("one", help="one run, appended to --out")
    one.add_argument("sampler")
    one.add_argument("mode", choices=MODES)
    one.add_argument("seed", type=int)
    run_options(one)
    one.set_defaults(func=command_one)
    tab = sub.add_parser("table", help="the markdown table of a JSONL of runs")
    tab.add_argument("jsonl")
    tab.add_argument("--machine", default="unknown machine")
    tab.set_defaults(func=command_table)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
