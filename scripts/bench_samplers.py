"""Sampler benchmark: hypervolume after 24/48/88 evaluations on a 37-D two-objective problem.

Problem ``synthetic`` (one per seed): 37 parameters ``b00.e0.weight`` ... ``b36.e0.weight`` in
[0, 1] (one weight per block, like SIPBMM's 37 blocks); 6 relevant blocks ``R`` drawn per seed; both
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

Problem ``zoo`` (``--problem zoo``): the demo study ``studies/tiny.yaml`` on the model zoo
(``.cache/zoo-2``, built by the test fixtures): 5 blocks x 2 experts = 10 weights, objectives
accuracy (maximize) and mean answer tokens (minimize) on 24 arithmetic prompts, CPU; experts not
enqueued (every sampler starts from nothing). Its true maximum hypervolume is unknown: the table
normalizes by the best hypervolume any run found (reference point accuracy 0, 32 tokens =
``max_new_tokens``). Importance priors: ``prior`` = the block importance mergeopt computed for
the study (task-vector norms), ``misleading`` = the same values given to the blocks in reverse
order. Same checkpoints as the synthetic problem. ``--problem zoo-experts``: the same, but the two
experts themselves are the first two trials (``enqueue_experts: true``, as in
``studies/tiny.yaml``), for every sampler.

Model-based samplers (saasbo-qnehvi, Optuna's ``gp``, optuna-integration's ``BoTorchSampler``
with a cheaper qLogNEHVI candidates function than its default (``cheaper_qlognehvi_candidates``),
and the baselines ``sipbmm-reference`` and
``ap-bmm`` of ``scripts/sipbmm_reference.py``: the optimizer the SIPBMM / AP-BMM authors released,
given the same importance as ``saasbo-prior``) start with ``STARTUP`` = 4 random points;
saasbo-qnehvi otherwise runs with its defaults (MAP mode; on the zoo
its default design puts each expert alone before those 4, unless the experts were enqueued).

Every sampler is run as 4 workers would run it: 4 asks, then 4 tells (Optuna's samplers see the
3 other points as RUNNING; ours enqueue a batch of 4).

A run appends one JSON line per checkpoint reached to ``--out`` (so a run cut off by a time
limit still reports its early checkpoints); the table takes each (sampler, seed)'s last line.
``--variants '{"label": {options}}'`` runs the saasbo samplers once per set of extra
``SaasQnehviSampler`` options (rows ``saasbo-prior[label]``).

Usage:
    python scripts/bench_samplers.py run --samplers all --seeds 0,1,2 --budget 88 \
        --jobs 8 --threads 2 --pin --out bench.jsonl
    python scripts/bench_samplers.py run --problem zoo,zoo-experts --samplers ap-bmm,random \
        --seeds 0,1,2 --budget 48 --jobs 30 --threads 1 --pin --out zoo.jsonl --state-dir st
        (rerun the same command to continue runs a time limit cut: --state-dir keeps each run's
        points after every batch)
    python scripts/bench_samplers.py table bench.jsonl --machine "..." > docs/bench/samplers-x.md
    python scripts/bench_samplers.py timing --observations 88 --threads 2 --options '{}'
"""

from __future__ import annotations

import argparse
import json
import math
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
PROBLEMS = ("synthetic", "zoo", "zoo-experts")
STARTUP = 4  # design points of every model-based sampler (saasbo, gp, botorch)
ZOO_CHECKPOINTS = CHECKPOINTS
ZOO_REFERENCE = np.array([0.0, -32.0])  # (accuracy, -mean tokens): nothing, max_new_tokens
SAMPLERS = (
    "saasbo-prior",
    "saasbo-noprior",
    "saasbo-misleading",
    "cmaes",
    "model-level",
    "grid",
    "nsga2",
    "tpe",
    "gp",
    "botorch",
    "sipbmm-reference",
    "ap-bmm",
    "random",
)
# Seconds per suggestion, most first (device table of 2026-11-30): the order jobs start in.
SLOWEST_FIRST = ("ap-bmm", "sipbmm-reference", "botorch", "saasbo-prior", "saasbo-misleading")
SLOWEST_FIRST += ("saasbo-noprior", "gp")
IMPORTANCE_READERS = ("saasbo-prior", "saasbo-misleading", "sipbmm-reference", "ap-bmm")


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
    from mergeopt.hypervolume import hypervolume as dominated_volume

    return dominated_volume(points.tolist(), ref.tolist(), [True, True])


def true_hypervolume(prob: dict[str, Any]) -> tuple[float, np.ndarray]:
    distance = prob["D"]
    ref = np.array([-1.1 * distance, -1.1 * distance])
    t = np.linspace(0.0, 1.0, 20_000)
    front = np.stack([-(t**2) * distance, -((1 - t) ** 2) * distance], axis=1)
    return hypervolume(front, ref), ref


def grid_points(genome: Any, budget: int) -> int:
    """Points per axis of the smallest model-level grid with ``budget`` points or more."""
    axes = genome.num_experts * len(genome.searched)
    return max(2, math.ceil(budget ** (1 / axes) - 1e-9))


def make_sampler(
    name: str,
    seed: int,
    genome: Any,
    extra_options: dict[str, Any] | None = None,
    budget: int = 0,
) -> Any:
    import optuna

    from mergeopt.samplers import create_sampler

    if name.startswith("saasbo"):
        options: dict[str, Any] = {"n_startup_trials": STARTUP, "batch_size": BATCH}
        options.update(extra_options or {})
        if name == "saasbo-noprior":
            options["enable_importance_prior"] = False
        return create_sampler("saasbo-qnehvi", options, seed=seed, genome=genome, num_objectives=2)
    if name == "grid":
        # The model-level grid (one weight per expert, every block the same): the smallest
        # square grid with at least ``budget`` points, handed out in lexicographic order.
        return create_sampler(
            "model-level",
            {"mode": "grid", "grid_points": grid_points(genome, budget)},
            seed=seed,
            genome=genome,
            num_objectives=2,
        )
    if name == "model-level":
        return create_sampler(
            "model-level",
            {"bounds": {name: [0.0, 1.0] for name in genome.searched}},
            seed=seed,
            genome=genome,
            num_objectives=2,
        )
    if name == "botorch":
        from optuna_integration import BoTorchSampler

        # Its pending-point handling, off by default: this benchmark asks 4 before telling.
        return BoTorchSampler(
            n_startup_trials=STARTUP,
            seed=seed,
            consider_running_trials=True,
            candidates_func=cheaper_qlognehvi_candidates,
        )
    if name in ("sipbmm-reference", "ap-bmm"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sipbmm_reference import SipbmmReferenceSampler

        return SipbmmReferenceSampler(
            seed=seed, n_startup_trials=STARTUP, batch_size=BATCH, rerank=name == "ap-bmm"
        )
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=STARTUP)
    return create_sampler(name, {}, seed=seed, genome=genome, num_objectives=2)


def cheaper_qlognehvi_candidates(
    train_x: Any, train_obj: Any, train_con: Any, bounds: Any, pending_x: Any
) -> Any:
    """``BoTorchSampler``'s candidates function for this benchmark: optuna-integration's
    ``qnehvi_candidates_func`` (one ``SingleTaskGP`` over both objectives, qLogNEHVI with a
    pruned baseline and the running trials as pending points, reference point the observed
    minimum) with saasbo-qnehvi's default acquisition effort (4 restarts, 256 raw samples, 100
    iterations, 128 MC samples) instead of 20 / 1024 / 200 / 256. The sampler's default for two
    objectives (qLogEHVI, that larger effort) took 10.6-11.9 s a suggestion over the first 24
    evaluations on the device machine's CPUs (18-29 s on the shared dev machine): 3 seeds x 2
    problems did not reach 48 evaluations in one device call."""
    import torch
    from botorch.acquisition.multi_objective.logei import (
        qLogNoisyExpectedHypervolumeImprovement,
    )
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from botorch.optim import optimize_acqf
    from botorch.sampling.normal import SobolQMCNormalSampler
    from botorch.utils.transforms import normalize, unnormalize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    if train_con is not None:
        raise ValueError("this benchmark has no constraints")
    train_x = normalize(train_x, bounds=bounds)
    if pending_x is not None:
        pending_x = normalize(pending_x, bounds=bounds)
    model = SingleTaskGP(train_x, train_obj, outcome_transform=Standardize(m=train_obj.shape[-1]))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    acquisition = qLogNoisyExpectedHypervolumeImprovement(
        model=model,
        ref_point=(train_obj.min(dim=0).values - 1e-8).tolist(),
        X_baseline=train_x,
        prune_baseline=True,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([128])),
        X_pending=pending_x,
    )
    unit = torch.zeros_like(bounds)
    unit[1] = 1
    candidates, _ = optimize_acqf(
        acq_function=acquisition,
        bounds=unit,
        q=1,
        num_restarts=4,
        raw_samples=256,
        options={"batch_limit": 5, "maxiter": 100},
        sequential=True,
    )
    return unnormalize(candidates.detach(), bounds=bounds)


def row_name(name: str, label: str, genome: Any = None, budget: int = 0) -> str:
    if name == "grid" and genome is not None:
        points = grid_points(genome, budget)
        return f"grid[{'x'.join([str(points)] * genome.num_experts * len(genome.searched))}]"
    return f"{name}[{label}]" if label and name.startswith("saasbo") else name


def run_one(
    name: str,
    seed: int,
    budget: int,
    *,
    label: str = "",
    options: dict[str, Any] | None = None,
    report: Callable[[dict[str, Any]], None] = lambda record: None,
    state: Path | None = None,
) -> dict[str, Any]:
    """The synthetic problem; ``report`` gets the record so far at every checkpoint."""
    import optuna

    from mergeopt.genome import Genome

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prob = problem(seed)
    genome = Genome(num_blocks=DIMENSION, num_experts=1, searched={"weight": (0.0, 1.0)})
    study = optuna.create_study(
        directions=["maximize", "maximize"],
        sampler=make_sampler(name, seed, genome, options, budget),
    )
    importance = [0.1] * DIMENSION
    target = prob["wrong"] if name == "saasbo-misleading" else prob["relevant"]
    for d in target:
        importance[d] = 1.0
    if name in IMPORTANCE_READERS:
        study.set_user_attr("mergeopt:block_importance", importance)
    names = genome.param_names
    best, ref = true_hypervolume(prob)

    def evaluate(trial: Any) -> tuple[float, float]:
        return values_of(prob, np.array([trial.params[n] for n in names]))

    def hv_fraction(values: list[tuple[float, float]]) -> float:
        return hypervolume(np.array(values), ref) / best

    return _ask_tell_loop(
        study,
        genome.distributions(),
        evaluate,
        hv_fraction,
        budget=budget,
        checkpoints=CHECKPOINTS,
        record={"problem": "synthetic", "sampler": row_name(name, label), "seed": seed},
        report=report,
        state=state,
    )


def _ask_tell_loop(
    study: Any,
    distributions: dict[str, Any],
    evaluate: Callable[[Any], tuple[float, float]],
    hv_value: Callable[[list[tuple[float, float]]], float],
    *,
    budget: int,
    checkpoints: tuple[int, ...],
    record: dict[str, Any],
    report: Callable[[dict[str, Any]], None],
    state: Path | None = None,
) -> dict[str, Any]:
    """4 asks, then 4 tells, until ``budget``; ``hv_value`` of the values at each checkpoint.

    ``state``: a JSON file rewritten after every batch (the evaluated points, the seconds spent
    asking, the checkpoints reached) from which a run cut off by a time limit resumes: its trials
    are added to ``study`` as COMPLETE trials, which the caller makes without them (the samplers
    re-read everything from the study; a resumed run's random draws differ from an uncut one's).
    """
    import optuna

    values: list[tuple[float, float]] = []
    points: list[dict[str, float]] = []
    hv: dict[str, float] = {}
    ask_seconds = 0.0
    record = {**record, "budget": budget}
    if state is not None and state.exists():
        saved = json.loads(state.read_text())
        for params, value in zip(saved["params"], saved["values"], strict=True):
            study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions=distributions, values=list(value)
                )
            )
            points.append(params)
            values.append((value[0], value[1]))
        hv, ask_seconds = saved["hv"], saved["ask_seconds"]
        record = {**record, "resumed_at": len(values)}
    while len(values) < budget:
        start = time.perf_counter()
        trials = [study.ask(distributions) for _ in range(min(BATCH, budget - len(values)))]
        ask_seconds += time.perf_counter() - start
        for trial in trials:
            v = evaluate(trial)
            study.tell(trial, list(v))
            values.append(v)
            points.append(dict(trial.params))
            if len(values) in checkpoints:
                hv[str(len(values))] = hv_value(values)
                record = {
                    **record,
                    "evaluations": len(values),
                    "hv_fraction": dict(hv),
                    "seconds_per_suggestion": ask_seconds / len(values),
                }
                report(record)
        if state is not None:
            saved = {"params": points, "values": values, "hv": hv, "ask_seconds": ask_seconds}
            state.with_suffix(".tmp").write_text(json.dumps(saved))
            state.with_suffix(".tmp").replace(state)  # a kill mid-write keeps the last batch
    return record


def run_one_zoo(
    name: str,
    seed: int,
    budget: int,
    *,
    label: str = "",
    options: dict[str, Any] | None = None,
    report: Callable[[dict[str, Any]], None] = lambda record: None,
    experts_first: bool = False,
    state: Path | None = None,
) -> dict[str, Any]:
    """The zoo merge study (module docstring); ``hv_fraction`` holds raw hypervolumes here."""
    import tempfile

    import optuna

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mergeopt.runner import TrialRunner
    from mergeopt.spec import StudySpec
    from mergeopt.study import create_study, stored_genome
    from tests._zoo_fixture import cached_zoo
    from tests.conftest import tiny_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec_data = tiny_spec(cached_zoo(), sampler={"name": "random", "enqueue_experts": False})
    spec_data["seed"] = seed
    spec = StudySpec.model_validate(spec_data)
    folder = tempfile.mkdtemp(prefix="bench-zoo-")
    created = create_study(spec, storage_url=f"sqlite:///{folder}/zoo.db", name="zoo")
    genome = stored_genome(created)
    importance = list(created.user_attrs["mergeopt:block_importance"])
    if name == "saasbo-misleading":
        created.set_user_attr("mergeopt:block_importance", importance[::-1])
    # The run itself goes to an in-memory copy: one process asks 4 trials before telling them,
    # which the batch samplers only allow on in-memory storage (on a shared database the 5th ask
    # would wait for the other workers, here itself).
    study = optuna.create_study(
        directions=created.directions, sampler=make_sampler(name, seed, genome, options, budget)
    )
    for key, value in created.user_attrs.items():
        study.set_user_attr(key, value)
    if experts_first and not (state is not None and state.exists()):  # else resumed with them
        for expert in range(genome.num_experts):
            study.enqueue_trial(genome.expert_alone(expert))
    runner = TrialRunner(study, device="cpu")

    def evaluate(trial: Any) -> tuple[float, float]:
        values, _ = runner.evaluate(trial.params, seed=seed)
        return float(values[0]), float(values[1])

    def hv_raw(values: list[tuple[float, float]]) -> float:
        # (accuracy, -tokens): both maximized, as hypervolume() wants
        return hypervolume(np.array(values) * np.array([1.0, -1.0]), ZOO_REFERENCE)

    try:
        return _ask_tell_loop(
            study,
            genome.distributions(),
            evaluate,
            hv_raw,
            budget=budget,
            checkpoints=ZOO_CHECKPOINTS,
            record={
                "problem": "zoo-experts" if experts_first else "zoo",
                "sampler": row_name(name, label, genome, budget),
                "seed": seed,
            },
            report=report,
            state=state,
        )
    finally:
        runner.close()


def command_run(args: argparse.Namespace) -> None:
    jobs = []
    # Each --group (JSON: any of samplers, seeds, problem, variants, budget) adds its runs to
    # one pool, taking what it does not name from the command line.
    for group in [json.loads(g) for g in args.group] or [{}]:
        samplers = group.get("samplers", args.samplers)
        names = SAMPLERS if samplers == "all" else tuple(samplers.split(","))
        seeds = [int(s) for s in str(group.get("seeds", args.seeds)).split(",")]
        problems = group.get("problem", args.problem).split(",")
        if unknown := [p for p in problems if p not in PROBLEMS]:
            sys.exit(f"--problem: unknown {', '.join(unknown)} (choose from {', '.join(PROBLEMS)})")
        variants: dict[str, dict[str, Any]] = group.get("variants") or json.loads(args.variants)
        budget = int(group.get("budget", args.budget))
        jobs += [
            (problem_name, name, seed, budget, label, options)
            for name in names
            for problem_name in problems
            for label, options in (variants.items() if name.startswith("saasbo") else [("", {})])
            for seed in seeds
        ]
    # The slowest samplers start first, so the last jobs to finish are short ones.
    jobs.sort(key=lambda job: SLOWEST_FIRST.index(job[1]) if job[1] in SLOWEST_FIRST else 99)
    if args.state_dir:
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)

    def state_of(problem_name: str, name: str, seed: int, budget: int, label: str) -> str:
        if not args.state_dir:
            return ""
        run = f"{problem_name}-{row_name(name, label)}-{seed}-{budget}"
        return str(Path(args.state_dir) / f"{run}.json")

    if args.jobs <= 1:
        for problem_name, name, seed, budget, label, options in jobs:
            state = state_of(problem_name, name, seed, budget, label)
            run_and_report(
                problem_name, name, seed, budget, label, options, args.out, state or None
            )
        return
    # One process per (sampler, variant, seed), each limited to --threads threads.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    running: dict[int, subprocess.Popen[bytes]] = {}  # by slot: a slot's cores are its own
    pending = list(jobs)
    while pending or running:
        for slot in range(args.jobs):
            if not pending or slot in running:
                continue
            problem_name, name, seed, budget, label, options = pending.pop(0)
            first = slot * args.threads + args.first_cpu
            cpus = ",".join(str((first + i) % (os.cpu_count() or 1)) for i in range(args.threads))
            cmd = [sys.executable, __file__, "one", name, str(seed), str(budget)]
            cmd += ["--problem", problem_name, "--label", label, "--options", json.dumps(options)]
            if args.out:
                cmd += ["--out", args.out]
            if state := state_of(problem_name, name, seed, budget, label):
                cmd += ["--state", state]
            if args.pin and sys.platform.startswith("linux"):
                cmd = ["taskset", "-c", cpus, *cmd]
            running[slot] = subprocess.Popen(cmd, env=env)
        for slot, proc in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
        time.sleep(0.5)


def run_and_report(
    problem_name: str,
    name: str,
    seed: int,
    budget: int,
    label: str,
    options: dict[str, Any],
    out: str | None,
    state: str | None = None,
) -> None:
    """Run one (sampler, seed) and append its record at every checkpoint to ``out`` (or print);
    ``state``: the run's resume file (see ``_ask_tell_loop``)."""

    def report(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        if out:
            with open(out, "a") as handle:  # one short append per line: no interleaving
                handle.write(line + "\n")
        else:
            print(line, flush=True)

    state_path = Path(state) if state else None
    if problem_name == "synthetic":
        run_one(name, seed, budget, label=label, options=options, report=report, state=state_path)
    else:
        experts_first = problem_name == "zoo-experts"
        run_one_zoo(
            name,
            seed,
            budget,
            label=label,
            options=options,
            report=report,
            experts_first=experts_first,
            state=state_path,
        )


def command_one(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run_and_report(
        args.problem,
        args.name,
        args.seed,
        args.budget,
        args.label,
        json.loads(args.options),
        args.out,
        args.state,
    )


def command_timing(args: argparse.Namespace) -> None:
    """Seconds of one fit + acquisition for a batch of 4 at 37-D with --observations points."""
    import torch

    from mergeopt.samplers.saasbo import SaasQnehviSampler
    from mergeopt.samplers.saasbo_acquisition import propose_batch

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
    last: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in args.results:
        for line in Path(path).read_text().splitlines():
            if line.strip().startswith("{"):
                record = json.loads(line)
                key = (record.get("problem", "synthetic"), record["sampler"], record["seed"])
                evaluations = record.get("evaluations", record["budget"])
                if key not in last or evaluations >= last[key].get("evaluations", 0):
                    last[key] = record
    print(f"# Sampler benchmark ({args.date}, {args.machine})\n")
    print(f"Command: `{args.how}`\n")
    # Both zoo variants are one objective: one scale, the best hypervolume of any zoo run.
    zoo_best = max(
        (max(r["hv_fraction"].values()) for (p, _, _), r in last.items() if p != "synthetic"),
        default=1.0,
    )
    for problem_name in PROBLEMS:
        records = [r for (p, _, _), r in last.items() if p == problem_name]
        if records:
            _print_problem_table(problem_name, records, zoo_best)


def _print_problem_table(problem_name: str, records: list[dict[str, Any]], zoo_best: float) -> None:
    checkpoints = CHECKPOINTS if problem_name == "synthetic" else ZOO_CHECKPOINTS
    scale = 1.0
    if problem_name != "synthetic":
        scale = zoo_best
        experts = ", the two experts as the first trials" if problem_name == "zoo-experts" else ""
        print(
            f"## (b) Zoo merge study (`--problem {problem_name}`{experts})\n\n"
            "Hypervolume as a fraction of the best "
            f"hypervolume found by any zoo run ({scale:.4f}, reference point accuracy 0 / 32 "
            "tokens): the true maximum is unknown.\n"
        )
    else:
        print(
            "## (a) Synthetic 37-D two-objective problem, 6 relevant dimensions\n\n"
            "Hypervolume of the evaluated points as a fraction of the true maximum.\n"
        )
    print("Mean (min-max) over seeds; batches of 4.\n")
    header = "| sampler | seeds | " + " | ".join(f"HV@{n}" for n in checkpoints)
    print(header + " | s / suggestion |")
    print("|" + " --- |" * (len(checkpoints) + 3))
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        rows.setdefault(record["sampler"], []).append(record)
    order = sorted(rows, key=lambda n: (SAMPLERS.index(n.split("[")[0]), n))
    for name in order:
        group = sorted(rows[name], key=lambda r: r["seed"])
        cells = []
        for n in checkpoints:
            got = [r["hv_fraction"][str(n)] / scale for r in group if str(n) in r["hv_fraction"]]
            if got:
                text = f"{np.mean(got):.3f} ({min(got):.2f}-{max(got):.2f})"
            elif all(r["budget"] < n for r in group):
                text = "beyond the budget"
            else:
                text = "not reached"
            if got and len(got) < len(group):
                text += f" [{len(got)} seeds]"
            cells.append(text)
        seconds = np.mean([r["seconds_per_suggestion"] for r in group])
        seeds = ",".join(
            str(r["seed"])
            + ("" if r.get("evaluations", r["budget"]) >= r["budget"] else f" ({r['evaluations']})")
            for r in group
        )
        print(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {seconds:.2f} |")
    print()


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
    run.add_argument("--out", default=None, help="JSON lines file (needed with --jobs > 1)")
    run.add_argument("--problem", default="synthetic", help="one or more, comma-separated")
    run.add_argument("--variants", default='{"": {}}', help="saasbo option sets, by label")
    run.add_argument("--first-cpu", type=int, default=0, help="first core for --pin")
    run.add_argument(
        "--group",
        action="append",
        default=[],
        help="JSON: a set of runs with its own samplers, "
        "seeds, problem, variants, budget (repeatable; all groups share one pool of --jobs)",
    )
    run.add_argument(
        "--state-dir", default=None, help="resume files, one per run: rerun to continue cut runs"
    )
    one = sub.add_parser("one")
    one.add_argument("name")
    one.add_argument("seed", type=int)
    one.add_argument("budget", type=int)
    one.add_argument("--problem", choices=PROBLEMS, default="synthetic")
    one.add_argument("--out", default=None)
    one.add_argument("--label", default="")
    one.add_argument("--options", default="{}")
    one.add_argument("--state", default=None)
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
