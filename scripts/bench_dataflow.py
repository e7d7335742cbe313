"""Data-flow search on zoo v2 (issue #17 item 4): its front against parameter-space search.

Three studies on the demo objectives (arithmetic accuracy, maximize; mean answer tokens,
minimize; ``--items`` prompts of the search split), each searched by ``cmaes`` for ``--trials``
COMPLETE trials through the command line a user runs (``mergeopt study create`` / ``study run``,
one worker, SQLite in ``--work``):

- ``ps``: parameter space, the demo study (task arithmetic of both experts, 4 blocks);
- ``dfs``: data-flow space with model A = ``expert-steps`` and ``expert-direct`` as the other
  source (``repeats`` 2, scales in [0.5, 2]);
- ``ps+dfs``: data-flow space over the ``ps`` study's balanced merge (``study export
  --preference 0.5,0.5``) as model A and ``expert-direct`` (Sakana's combined mode).

Prints one markdown table: per study, its Pareto trials, the hypervolume of its front
(reference point accuracy 0, ``max_new_tokens`` tokens), the share of that hypervolume that
the union of all fronts has, and the best accuracy and fewest tokens on the front; plus each
front's points. Not a test: the numbers are a property of the zoo.

    python scripts/bench_dataflow.py --work /tmp/dfs-bench --trials 200
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


def mergeopt(*args: str) -> None:
    started = time.perf_counter()
    command = [sys.executable, "-m", "mergeopt.cli", *args]
    print(f"$ mergeopt {' '.join(args)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def spec(name: str, zoo: Path, items: int, seed: int, models: dict[str, Any]) -> dict[str, Any]:
    from tests.conftest import tiny_spec

    data = tiny_spec(zoo, name=name, seed=seed, models=models)
    data["sampler"] = {"name": "cmaes", "enqueue_experts": True}
    for objective in data["objectives"]:
        objective["limit"] = items
    data["scorer"]["max_new_tokens"] = MAX_NEW_TOKENS
    return data


def run_study(work: Path, data: dict[str, Any], trials: int, storage: str) -> None:
    path = work / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    mergeopt("study", "create", str(path), "--storage", storage, "--load-if-exists")
    mergeopt("study", "run", data["name"], "-n", str(trials), "--storage", storage, "--no-progress")


def front(storage: str, name: str) -> list[list[float]]:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    return sorted(list(t.values) for t in study.best_trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the studies")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from mergeopt.hypervolume import hypervolume
    from tests._zoo_fixture import cached_zoo

    zoo = cached_zoo()
    args.work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{args.work / 'studies.db'}"
    base_models = {"base": str(zoo / "base")}
    direct, steps = str(zoo / "expert-direct"), str(zoo / "expert-steps")
    ps = spec("ps", zoo, args.items, args.seed, {**base_models, "experts": [direct, steps]})
    run_study(args.work, ps, args.trials, storage)
    dfs = spec("dfs", zoo, args.items, args.seed, {"base": steps, "experts": [direct]})
    dfs["merge"] = {"space": "dataflow"}
    run_study(args.work, dfs, args.trials, storage)
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
    run_study(args.work, combined, args.trials, storage)

    fronts = {name: front(storage, name) for name in ("ps", "dfs", "ps-dfs")}
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


if __name__ == "__main__":
    main()
