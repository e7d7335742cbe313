"""Sampler benchmark: hypervolume after 24/48/88 evaluations on a 37-D two-objective problem.

Problem (one per seed): 37 parameters ``b00.e0.weight`` ... ``b36.e0.weight`` in [0, 1] (one
weight per block, like SIPBMM's 37 blocks); 6 relevant blocks ``R`` drawn per seed; both
objectives maximized:

    f1(x) = -||x_R - a||^2,   f2(x) = -||x_R - b||^2

with ``a``, ``b`` per-seed points in [0.15, 0.85]^6. The Pareto set is the segment from ``a`` to
``b`` (the other 31 parameters do not matter); the Pareto front is ``(-t^2 D, -(1-t)^2 D)``,
``D = ||a - b||^2``, so the true maximum hypervolume (reference point ``(-1.1 D, -1.1 D)``) is
computed from 20,000 points on it. Reported: hypervolume of the evaluated points / true
maximum, after 24, 48 and 88 evaluations, mean (min-max) over seeds; and wall seconds per
suggested point.

Importance priors given to ``saasbo-qnehvi`` (study user attr ``mergeopt:block_importance``):
``prior`` = 1.0 on the relevant blocks and 0.1 elsewhere; ``misleading`` = 1.0 on 6 wrong
blocks and 0.1 elsewhere (relevant ones included); ``no prior`` = ``enable_importance_prior:
false``.

Every sampler is run as 4 workers would run it: 4 asks, then 4 tells (Optuna's samplers see the
3 other points as RUNNING; ours enqueue a batch of 4).

Usage:
    python scripts/bench_samplers.py run --samplers all --seeds 0,1,2 --budget 88 \
        --jobs 8 --threads 2 --out bench.jsonl
    python scripts/bench_samplers.py table bench.jsonl --machine "..." > docs/bench/samplers-x.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DIMENSION = 37
RELEVANT = 6
BATCH = 4
CHECKPOINTS = (24, 48, 88)
SAMPLERS = (
    "saasbo-prior",
    "saasbo-noprior",
    "saasbo-misleading",
    "cmaes",
    "model-level",
    "nsga2",
    "tpe",
    "gp",
    "botorch",
    "random",
)


def problem(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(1000 + seed)
    relevant = sorted(rng.choice(DIMENSION, RELEVANT, replace=False).tolist())
    wrong = sorted(
        rng.choice(
            [d for d in range(DIMENSION) if d not in relevant], RELEVANT, replace=False
        ).tolist()
    )
    a = rng.uniform(0.15, 0.85, RELEVANT)
    b = rng.uniform(0.15, 0.85, RELEVANT)
    distance = float(np.sum((a - b) ** 2))
    return {"relevant": relevant, "wrong": wrong, "a": a, "b": b, "D": distance}


def values_of(prob: dict[str, Any], x: np.ndarray) -> tuple[float, float]:
    z = x[prob["relevant"]]
    return -float(np.sum((z - prob["a"]) ** 2)), -float(np.sum((z - prob["b"]) ** 2))


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """2-D hypervolume (maximization) of ``points`` (n x 2) above ``ref``."""
    pts = points[np.all(points > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[np.argsort(-pts[:, 0])]
    volume, best_y = 0.0, ref[1]
    for x, y in pts:
        if y > best_y:
            volume += (x - ref[0]) * (y - best_y)
            best_y = y
    return float(volume)


def true_hypervolume(prob: dict[str, Any]) -> tuple[float, np.ndarray]:
    distance = prob["D"]
    ref = np.array([-1.1 * distance, -1.1 * distance])
    t = np.linspace(0.0, 1.0, 20_000)
    front = np.stack([-(t**2) * distance, -((1 - t) ** 2) * distance], axis=1)
    return hypervolume(front, ref), ref


def make_sampler(name: str, seed: int, prob: dict[str, Any]) -> Any:
    import optuna

    from mergeopt.genome import Genome
    from mergeopt.samplers import create_sampler

    genome = Genome(num_blocks=DIMENSION, num_experts=1, searched={"weight": (0.0, 1.0)})
    if name.startswith("saasbo"):
        options = {"n_startup_trials": 8, "batch_size": BATCH}
        if name == "saasbo-noprior":
            options["enable_importance_prior"] = False
        return create_sampler("saasbo-qnehvi", options, seed=seed, genome=genome, num_objectives=2)
    if name == "model-level":
        return create_sampler(
            "model-level",
            {"bounds": {"weight": [0.0, 1.0]}},
            seed=seed,
            genome=genome,
            num_objectives=2,
        )
    if name == "botorch":
        from optuna_integration import BoTorchSampler

        return BoTorchSampler(n_startup_trials=8, seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=8)
    return create_sampler(name, {}, seed=seed, genome=genome, num_objectives=2)


def run_one(name: str, seed: int, budget: int) -> dict[str, Any]:
    import optuna

    from mergeopt.genome import Genome

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prob = problem(seed)
    genome = Genome(num_blocks=DIMENSION, num_experts=1, searched={"weight": (0.0, 1.0)})
    study = optuna.create_study(
        directions=["maximize", "maximize"], sampler=make_sampler(name, seed, prob)
    )
    importance = [0.1] * DIMENSION
    target = prob["wrong"] if name == "saasbo-misleading" else prob["relevant"]
    for d in target:
        importance[d] = 1.0
    if name in ("saasbo-prior", "saasbo-misleading"):
        study.set_user_attr("mergeopt:block_importance", importance)
    distributions = genome.distributions()
    names = genome.param_names
    values: list[tuple[float, float]] = []
    ask_seconds = 0.0
    while len(values) < budget:
        start = time.perf_counter()
        trials = [study.ask(distributions) for _ in range(min(BATCH, budget - len(values)))]
        ask_seconds += time.perf_counter() - start
        for trial in trials:
            x = np.array([trial.params[n] for n in names])
            v = values_of(prob, x)
            study.tell(trial, list(v))
            values.append(v)
    best, ref = true_hypervolume(prob)
    fractions = {
        str(n): hypervolume(np.array(values[:n]), ref) / best for n in CHECKPOINTS if n <= budget
    }
    return {
        "sampler": name,
        "seed": seed,
        "budget": budget,
        "hv_fraction": fractions,
        "seconds_per_suggestion": ask_seconds / len(values),
    }


def command_run(args: argparse.Namespace) -> None:
    names = SAMPLERS if args.samplers == "all" else tuple(args.samplers.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(name, seed) for name in names for seed in seeds]
    if args.jobs <= 1:
        for name, seed in jobs:
            print(json.dumps(run_one(name, seed, args.budget)), flush=True)
        return
    # One process per (sampler, seed), each limited to --threads threads.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    running: list[tuple[subprocess.Popen[str], Callable[[], None]]] = []
    out = open(args.out, "a") if args.out else sys.stdout  # noqa: SIM115
    pending = list(jobs)
    cpu = 0
    while pending or running:
        while pending and len(running) < args.jobs:
            name, seed = pending.pop(0)
            cpus = ",".join(str((cpu + i) % (os.cpu_count() or 1)) for i in range(args.threads))
            cpu += args.threads
            cmd = [sys.executable, __file__, "one", name, str(seed), str(args.budget)]
            if args.pin and sys.platform.startswith("linux"):
                cmd = ["taskset", "-c", cpus, *cmd]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            running.append((proc, lambda: None))
        for proc, _ in list(running):
            if proc.poll() is not None:
                line = (proc.stdout.read() if proc.stdout else "").strip()
                if line:
                    print(line.splitlines()[-1], file=out, flush=True)
                running.remove((proc, _))
        time.sleep(0.5)


def command_one(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(json.dumps(run_one(args.name, args.seed, args.budget)), flush=True)


def command_timing(args: argparse.Namespace) -> None:
    """Seconds of one fit + acquisition for a batch of 4 at 37-D with --observations points."""
    import torch

    from mergeopt.samplers.saasbo import SaasQnehviSampler, propose_batch

    torch.set_num_threads(args.threads)
    prob = problem(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.observations, DIMENSION))
    y = np.array([values_of(prob, row) for row in x])
    importance = np.full(DIMENSION, 0.1)
    importance[prob["relevant"]] = 1.0
    options = json.loads(args.options)
    sampler = SaasQnehviSampler(**options)
    start = time.perf_counter()
    _, fit, acq = propose_batch(
        train_x=x,
        train_y=y,
        pending_x=x[:3] + 0.01,
        q=BATCH,
        importance=importance,
        ref_point=None,
        sampler=sampler,
        seed=0,
    )
    total = time.perf_counter() - start
    print(
        json.dumps(
            {
                "options": options,
                "observations": args.observations,
                "threads": args.threads,
                "fit_s": round(fit, 2),
                "acq_s": round(acq, 2),
                "total_s": round(total, 2),
            }
        ),
        flush=True,
    )


def command_table(args: argparse.Namespace) -> None:
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in args.results:
        for line in Path(path).read_text().splitlines():
            if line.strip().startswith("{"):
                record = json.loads(line)
                rows.setdefault(record["sampler"], []).append(record)
    print(f"# Sampler benchmark ({args.date}, {args.machine})\n")
    print(
        "Synthetic 37-D two-objective problem, 6 relevant dimensions (see "
        "`scripts/bench_samplers.py`); hypervolume of the evaluated points as a fraction of "
        "the true maximum, mean (min-max) over seeds; batches of 4.\n"
    )
    print(f"Command: `{args.how}`\n")
    header = "| sampler | seeds | " + " | ".join(f"HV@{n}" for n in CHECKPOINTS)
    print(header + " | s / suggestion |")
    print("|" + " --- |" * (len(CHECKPOINTS) + 3))
    order = [s for s in SAMPLERS if s in rows] + [s for s in rows if s not in SAMPLERS]
    for name in order:
        records = rows[name]
        cells = []
        for n in CHECKPOINTS:
            got = [r["hv_fraction"][str(n)] for r in records if str(n) in r["hv_fraction"]]
            cells.append(
                f"{np.mean(got):.3f} ({min(got):.2f}-{max(got):.2f})" if got else "not run"
            )
        seconds = np.mean([r["seconds_per_suggestion"] for r in records])
        seeds = ",".join(str(r["seed"]) for r in sorted(records, key=lambda r: r["seed"]))
        print(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--samplers", default="all")
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--budget", type=int, default=88)
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--pin", action="store_true", help="taskset each job to --threads cores")
    run.add_argument("--out", default=None)
    one = sub.add_parser("one")
    one.add_argument("name")
    one.add_argument("seed", type=int)
    one.add_argument("budget", type=int)
    table = sub.add_parser("table")
    table.add_argument("results", nargs="+")
    table.add_argument("--machine", required=True)
    table.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    table.add_argument("--how", default="scripts/bench_samplers.py run ...", help="the run command")
    timing = sub.add_parser("timing")
    timing.add_argument("--observations", type=int, default=88)
    timing.add_argument("--threads", type=int, default=2)
    timing.add_argument("--options", default="{}", help="SaasQnehviSampler options as JSON")
    args = parser.parse_args()
    commands = {"run": command_run, "one": command_one, "table": command_table}
    commands["timing"] = command_timing
    commands[args.command](args)


if __name__ == "__main__":
    main()
