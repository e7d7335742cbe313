"""Data-flow search on zoo v2 (issue #17 item 4): its front against parameter-space search, and
the Mixture-of-Experts model of a Pareto set against its members.

Three studies on the demo objectives (arithmetic accuracy, maximize; mean answer tokens,
minimize; ``--items`` prompts of the search split), each searched by ``cmaes`` for ``--trials``
COMPLETE trials through the command line a user runs (``mergeopt study create`` / ``study run``,
``--workers`` CPU workers of one thread each, SQLite in ``--work``):

- ``ps``: parameter space, the demo study (task arithmetic of both experts, 4 blocks);
- ``dfs``: data-flow space with model A = ``expert-steps`` and ``expert-direct`` as the other
  source (``repeats`` 2, scales in [0.5, 2]);
- ``ps-dfs``: data-flow space over the ``ps`` study's balanced merge (``study export
  --preference 0.5,0.5``) as model A and ``expert-direct`` (Sakana's combined mode).

Then the MoE: ``study export ps --moe --pareto`` is refused (both of ``ps``'s objectives are on
the arithmetic task, so every expert's router would get the same prompts); a fourth parameter-
space study, ``tasks``, trades arithmetic accuracy against reversal accuracy (``--moe-trials``
cmaes trials), and ``study export tasks --moe --pareto`` builds the MoE of its Pareto set (when
two Pareto trials are strongest on one task that is refused too, and the MoE of the Pareto trial
best on each task, ``--moe --trials``, is built instead, and the whole Pareto set as the
experts of a random router, ``--moe --pareto --gate-mode random``). The MoEs, the base model
(whose attention, embeddings and head the MoEs keep) and every Pareto trial are scored on the
first ``--heldout-items`` held-out prompts of both tasks (greedy, ``MAX_NEW_TOKENS``).

Prints markdown tables: per study, its Pareto trials, the hypervolume of its front (reference
point accuracy 0, ``MAX_NEW_TOKENS`` tokens), the share of that hypervolume that the union of
all fronts has, and the best accuracy and fewest tokens on the front; each front's points; the
MoEs against the base and their members. ``--raw FILE`` writes every COMPLETE trial and every
held-out score as JSON lines. Not a test: the numbers are a property of the zoo.

    nice -n 10 python scripts/bench_dataflow.py --work /tmp/dfs-bench --trials 200 --workers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MAX_NEW_TOKENS = 32
REFERENCE = [0.0, float(MAX_NEW_TOKENS)]
MAXIMIZE = [True, False]
FRONT_STUDIES = ("ps", "dfs", "ps-dfs")
TASK_EXTRACT = {"arith": "last_number", "reverse": "exact"}
"""The zoo's two tasks and how their answers are read (as ``zoo.json`` scores them)."""


def mergeopt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "mergeopt.cli", *args]
    print(f"$ mergeopt {' '.join(args)}", file=sys.stderr, flush=True)
    # the CLI's output goes to the log (stderr), stdout is the tables; a command allowed to fail
    # has its stderr kept (for its refusal line), others stream it
    stderr = None if check else subprocess.PIPE
    result = subprocess.run(
        command, cwd=REPO, stdout=sys.stderr, stderr=stderr, text=True, check=False
    )
    sys.stderr.write(result.stderr or "")
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"mergeopt {' '.join(args)} exited {result.returncode}")
    return result


def spec(name: str, zoo: Path, items: int, seed: int, models: dict[str, Any]) -> dict[str, Any]:
    from tests.conftest import tiny_spec

    data = tiny_spec(zoo, name=name, seed=seed, models=models)
    data["sampler"] = {"name": "cmaes", "enqueue_experts": True}
    for objective in data["objectives"]:
        objective["limit"] = items
    data["scorer"]["max_new_tokens"] = MAX_NEW_TOKENS
    return data


def run_study(work: Path, data: dict[str, Any], trials: int, storage: str, workers: int) -> None:
    path = work / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    mergeopt("study", "create", str(path), "--storage", storage, "--load-if-exists")
    mergeopt(
        "study", "run", data["name"], "-n", str(trials), "--storage", storage,
        "--workers", str(workers), "--no-progress",
    )  # fmt: skip


def front(storage: str, name: str) -> list[list[float]]:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    return sorted(list(t.values) for t in study.best_trials)


def trial_rows(storage: str, name: str) -> list[dict[str, Any]]:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    pareto = {t.number for t in study.best_trials}
    return [
        {
            "study": name,
            "trial": t.number,
            "values": dict(zip(study.metric_names or [], t.values, strict=True)),
            "pareto": t.number in pareto,
        }
        for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    ]


def heldout_scores(model: Path, zoo: Path, items: int) -> dict[str, dict[str, float]]:
    """Greedy accuracy and mean tokens on the first ``items`` held-out prompts of each task."""
    from mergeopt.zoo.build import score_model

    return {
        task: score_model(
            model,
            zoo / "tasks" / f"{task}.heldout.jsonl",
            limit=items,
            extract=extract,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        for task, extract in TASK_EXTRACT.items()
    }


def build_moes(work: Path, storage: str) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """The MoEs of the ``tasks`` study's Pareto set (module docstring) by label, each with the
    command that built it, and the refusals met on the way."""
    import optuna

    refusals = []
    single_task = mergeopt(
        "study", "export", "ps", "--moe", "--pareto", "--out", str(work / "moe-ps"),
        "--storage", storage, check=False,
    )  # fmt: skip
    if single_task.returncode != 0:
        refusals.append(f"`study export ps --moe --pareto`: {last_line(single_task.stderr)}")
    moes = {}
    pareto = work / "moe-pareto"
    command = ["study", "export", "tasks", "--moe", "--pareto"]
    if not pareto.exists():  # refused before anything is written, so a rerun asks again
        result = mergeopt(*command, "--out", str(pareto), "--storage", storage, check=False)
        if result.returncode != 0:
            refusals.append(f"`{' '.join(command)}`: {last_line(result.stderr)}")
    if pareto.exists():
        moes["MoE of the Pareto set"] = (pareto, " ".join(command))
        return moes, refusals
    # the Pareto trial best on each task, and the whole set behind a random router
    study = optuna.load_study(study_name="tasks", storage=storage)
    best = [max(study.best_trials, key=lambda t, j=j: t.values[j]) for j in (0, 1)]
    numbers = ",".join(str(t.number) for t in best)
    for label, folder, options in (
        (f"MoE of trials {numbers}", work / "moe-best", ["--trials", numbers]),
        ("MoE of the Pareto set, random router", work / "moe-random",
         ["--pareto", "--gate-mode", "random"]),
    ):  # fmt: skip
        command = ["study", "export", "tasks", "--moe", *options]
        if not folder.exists():
            mergeopt(*command, "--out", str(folder), "--storage", storage)
        moes[label] = (folder, " ".join(command))
    return moes, refusals


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the studies")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--moe-trials", type=int, default=None, help="default: --trials")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--heldout-items", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="CPU workers per study")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", type=Path, help="write trials and scores as JSON lines here")
    args = parser.parse_args()
    from mergeopt.hypervolume import hypervolume
    from tests._zoo_fixture import cached_zoo

    zoo = cached_zoo()
    args.work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{args.work / 'studies.db'}"
    base_models = {"base": str(zoo / "base")}
    direct, steps = str(zoo / "expert-direct"), str(zoo / "expert-steps")
    experts = {**base_models, "experts": [direct, steps]}
    ps = spec("ps", zoo, args.items, args.seed, experts)
    run_study(args.work, ps, args.trials, storage, args.workers)
    dfs = spec("dfs", zoo, args.items, args.seed, {"base": steps, "experts": [direct]})
    dfs["merge"] = {"space": "dataflow"}
    run_study(args.work, dfs, args.trials, storage, args.workers)
    balanced = args.work / "ps-balanced"
    if not balanced.exists():
        mergeopt(
            "study", "export", "ps", "--preference", "0.5,0.5", "--format", "hf",
            "--out", str(balanced), "--storage", storage,
        )  # fmt: skip
    combined = spec(
        "ps-dfs", zoo, args.items, args.seed, {"base": str(balanced), "experts": [direct]}
    )
    combined["merge"] = {"space": "dataflow"}
    run_study(args.work, combined, args.trials, storage, args.workers)

    tasks = spec("tasks", zoo, args.items, args.seed, experts)
    tasks["objectives"] = [
        {"name": task, "task": str(zoo / "tasks" / f"{task}.jsonl"), "metric": "accuracy",
         "direction": "maximize", "extract": extract, "limit": args.items}
        for task, extract in TASK_EXTRACT.items()
    ]  # fmt: skip
    run_study(args.work, tasks, args.moe_trials or args.trials, storage, args.workers)
    moes, refusals = build_moes(args.work, storage)
    import optuna

    pareto = sorted(
        optuna.load_study(study_name="tasks", storage=storage).best_trials, key=lambda t: t.number
    )
    scored = {
        label: heldout_scores(folder, zoo, args.heldout_items)
        for label, (folder, _) in moes.items()
    }
    # the MoE's attention, embeddings, norms and head are the base model's
    scored["base"] = heldout_scores(zoo / "base", zoo, args.heldout_items)
    search_values = {}
    for trial in pareto:
        folder = args.work / f"tasks-trial-{trial.number}"
        if not folder.exists():
            mergeopt(
                "study", "export", "tasks", "--trial", str(trial.number), "--format", "hf",
                "--out", str(folder), "--storage", storage,
            )  # fmt: skip
        scored[f"trial {trial.number}"] = heldout_scores(folder, zoo, args.heldout_items)
        search_values[f"trial {trial.number}"] = trial.values

    fronts = {name: front(storage, name) for name in FRONT_STUDIES}
    union = [point for points in fronts.values() for point in points]
    union_hv = hypervolume(union, REFERENCE, MAXIMIZE)
    print(
        f"Data-flow search on zoo v2, {time.strftime('%Y-%m-%d')}: cmaes, {args.trials} "
        f"COMPLETE trials per study, {args.items} items per objective, seed {args.seed}, "
        f"reference point (accuracy 0, {MAX_NEW_TOKENS} tokens)\n"
    )
    print(
        "| study | Pareto trials | hypervolume | / union of fronts | best accuracy "
        "| fewest tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, points in fronts.items():
        hv = hypervolume(points, REFERENCE, MAXIMIZE)
        print(
            f"| {name} | {len(points)} | {hv:.3f} | {hv / union_hv:.3f} "
            f"| {max(p[0] for p in points):.3f} | {min(p[1] for p in points):.2f} |"
        )
    print()
    for name, points in fronts.items():
        print(f"{name} front: " + json.dumps([[round(a, 3), round(t, 2)] for a, t in points]))

    print(
        f"\nMoEs of the `tasks` study's Pareto set ({args.moe_trials or args.trials} COMPLETE "
        "cmaes trials, arithmetic accuracy against reversal accuracy) against its members, "
        f"greedy on the first {args.heldout_items} held-out prompts of each task\n"
    )
    for label, (_, command) in moes.items():
        print(f"- {label}: `mergeopt {command}`")
    for refusal in refusals:
        print(f"- refused: {refusal}")
    print(
        "\n| model | search arith, reverse | arith accuracy | arith tokens "
        "| reverse accuracy | reverse tokens |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for model, scores in scored.items():
        values = search_values.get(model)
        search = f"{values[0]:.3f}, {values[1]:.3f}" if values else ""
        print(
            f"| {model} | {search} | {scores['arith']['accuracy']:.3f} "
            f"| {scores['arith']['mean_tokens']:.2f} | {scores['reverse']['accuracy']:.3f} "
            f"| {scores['reverse']['mean_tokens']:.2f} |"
        )
    if args.raw:
        with args.raw.open("w") as raw:
            for name in (*FRONT_STUDIES, "tasks"):
                for row in trial_rows(storage, name):
                    raw.write(json.dumps(row) + "\n")
            for model, scores in scored.items():
                raw.write(json.dumps({"heldout": model, "scores": scores}) + "\n")


if __name__ == "__main__":
    main()
