"""Storage load benchmark: trial throughput and per-trial storage overhead with 1-8 workers.

Each configuration (backend x workers x objective) gets a fresh database, a study created
from the zoo spec (random sampler, so that sampling costs nothing) and K worker processes that
run mergeopt's real worker loop (``run_worker``: ask, heartbeat, tell, exact-N counting,
stale-trial checks) against it. Objectives:

- ``noop``: returns at once; throughput is bounded by the storage alone.
- ``sleep``: sleeps ``--sleep`` seconds (1 s by default), an objective that does not compete
  with the storage for the CPU; the issue's scaling target is read on it.
- ``zoo``: the real merge-and-score runner on the tiny zoo (CPU-bound: on a 2-core machine it
  cannot scale past 2 workers, it shows what the storage adds to a real trial).

Reported per configuration:

- trials/s: COMPLETE trials / (last evaluation's end - the barrier's release), wall clock;
- scaling: trials/s divided by K x the 1-worker trials/s of the same backend and objective;
- overhead ms/trial: per worker, the time between the end of one evaluation and the start of
  the next (tell, counting, stale-trial check, ask, heartbeat start), mean over trials.

Workers wait at a barrier after their setup (imports, model loading), so that all K start the
loop together. Usage:

    python scripts/bench_storage.py --zoo .cache/zoo-2 --backends sqlite,postgresql,mariadb \
        --workers 1,2,4,8 --objectives noop,sleep --out bench-storage.jsonl
    python scripts/bench_storage.py --table bench-storage.jsonl --machine "..."
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MARIADB_ADMIN = "mysql+pymysql://root@127.0.0.1:3306/"
TRIALS_PER_WORKER = {"noop": 25, "sleep": 8, "zoo": 4}


class _TimedRunner:
    """Stands in for ``TrialRunner``: times the gaps between evaluations (the loop's overhead)."""

    def __init__(self, study: Any, device: str, *, objective: str, sleep: float) -> None:
        from mergeopt.runner import TrialRunner
        from mergeopt.study import stored_spec

        self.spec = stored_spec(study)
        self.inner = TrialRunner(study, device=device) if objective == "zoo" else None
        self.objective = objective
        self.sleep = sleep
        self.gaps: list[float] = []
        self.evaluations = 0
        self._last_end: float | None = None
        self.loop_started = self.last_end_wall = time.time()

    def evaluate(self, params: dict[str, float], *, seed: int) -> tuple[list[float], dict]:
        start = time.perf_counter()
        if self._last_end is not None:
            self.gaps.append(start - self._last_end)
        if self.inner is not None:
            values, user_attrs = self.inner.evaluate(params, seed=seed)
        else:
            if self.objective == "sleep":
                time.sleep(self.sleep)
            mean = sum(params.values()) / max(1, len(params))
            values, user_attrs = [mean, 1.0 - mean], {}
        self.evaluations += 1
        self._last_end = time.perf_counter()
        self.last_end_wall = time.time()
        return values, user_attrs

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def _worker(
    study_name: str,
    url: str,
    n_trials: int,
    objective: str,
    sleep: float,
    threads: int,
    barrier: Any,
    results: Any,
) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(threads)
    from mergeopt.trial_loop import run_worker

    runners: list[_TimedRunner] = []

    def factory(study: Any, device: str) -> _TimedRunner:
        runner = _TimedRunner(study, device, objective=objective, sleep=sleep)
        runners.append(runner)
        barrier.wait()
        runner.loop_started = time.time()
        return runner

    run_worker(study_name, url, n_trials=n_trials, device="cpu", runner_factory=factory)
    runner = runners[0]
    results.put(
        {
            "gaps": runner.gaps,
            "evaluations": runner.evaluations,
            "started": runner.loop_started,
            "ended": runner.last_end_wall,
        }
    )


def _fresh_database(backend: str, folder: Path) -> tuple[str, Any]:
    """A URL of a new empty database and a function that drops it."""
    import sqlalchemy

    if backend == "sqlite":
        path = folder / f"{uuid.uuid4().hex[:8]}.db"
        return f"sqlite:///{path}", lambda: None
    admin = POSTGRES_ADMIN if backend == "postgresql" else MARIADB_ADMIN
    name = f"mergeopt_bench_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with engine.connect() as connection:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        engine.dispose()

    if backend == "postgresql":
        return f"postgresql://postgres@127.0.0.1:5432/{name}", drop
    return f"mysql://root@127.0.0.1:3306/{name}", drop


def _zoo_spec(zoo: Path, limit: int) -> Any:
    """The demo spec on ``zoo`` (the tests' ``tiny_spec``), random sampler, ``limit`` prompts."""
    from mergeopt.spec import StudySpec
    from tests.conftest import tiny_spec

    raw = tiny_spec(zoo, sampler={"name": "random", "enqueue_experts": False})
    for objective in raw["objectives"]:
        objective["limit"] = limit
    raw["scorer"]["batch_size"] = limit
    return StudySpec.model_validate(raw)


def run_one(
    backend: str, workers: int, objective: str, args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    from optuna.trial import TrialState

    from mergeopt.study import create_study

    n_trials = workers * args.trials_per_worker.get(objective, TRIALS_PER_WORKER[objective])
    url, drop = _fresh_database(backend, folder)
    try:
        spec = _zoo_spec(args.zoo, args.limit)
        study = create_study(spec, storage_url=url, name=f"bench-{backend}-{workers}-{objective}")
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(workers)
        results = context.Queue()
        threads = max(1, (os.cpu_count() or 1) // workers)
        processes = [
            context.Process(
                target=_worker,
                args=(study.study_name, url, n_trials, objective, args.sleep, threads)
                + (barrier, results),
            )
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        reports = [results.get(timeout=args.timeout) for _ in processes]
        for process in processes:
            process.join()
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        # Wall clock of the workers (MySQL's timestamps have whole seconds only).
        seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
        gaps = [gap for report in reports for gap in report["gaps"]]
        states = {s.name: 0 for s in TrialState}
        for trial in study.get_trials(deepcopy=False):
            states[trial.state.name] += 1
        return {
            "backend": backend,
            "workers": workers,
            "objective": objective,
            "trials": len(complete),
            "requested": n_trials,
            "states": states,
            "seconds": round(seconds, 3),
            "trials_per_second": round(len(complete) / seconds, 4) if seconds > 0 else None,
            "overhead_ms_mean": round(1000 * statistics.fmean(gaps), 2) if gaps else None,
            "overhead_ms_p90": (
                round(1000 * statistics.quantiles(gaps, n=10)[-1], 2) if len(gaps) > 1 else None
            ),
        }
    finally:
        drop()


def table(path: Path, machine: str) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    single = {
        (r["backend"], r["objective"]): r["trials_per_second"] for r in rows if r["workers"] == 1
    }
    lines = [
        f"machine: {machine}",
        "",
        "| backend | objective | workers | trials | trials/s | scaling vs 1 worker | "
        "overhead ms/trial (mean) | p90 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = single.get((r["backend"], r["objective"]))
        scaling = (
            f"{r['trials_per_second'] / (r['workers'] * base):.2f}"
            if base and r["trials_per_second"]
            else "-"
        )
        lines.append(
            f"| {r['backend']} | {r['objective']} | {r['workers']} | {r['trials']} | "
            f"{r['trials_per_second']} | {scaling} | {r['overhead_ms_mean']} | "
            f"{r['overhead_ms_p90']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo-2")
    parser.add_argument("--backends", default="sqlite,postgresql,mariadb")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--objectives", default="noop,sleep")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds of the sleep objective")
    parser.add_argument("--limit", type=int, default=8, help="task items per zoo objective")
    parser.add_argument(
        "--trials-per-worker",
        type=json.loads,
        default={},
        help=f"JSON overrides, e.g. '{{\"noop\": 50}}' (defaults: {TRIALS_PER_WORKER})",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("bench-storage.jsonl"))
    parser.add_argument("--table", type=Path, help="print the markdown table of a results file")
    parser.add_argument("--machine", default=f"{platform.node()}, {os.cpu_count()} cores")
    args = parser.parse_args()
    if args.table:
        print(table(args.table, args.machine))
        return
    if not (args.zoo / "base").is_dir():
        sys.exit(f"error: no zoo at {args.zoo} (run `mergeopt zoo build --out {args.zoo}`)")
    from tqdm import tqdm

    configs = [
        (backend, int(workers), objective)
        for objective in args.objectives.split(",")
        for backend in args.backends.split(",")
        for workers in args.workers.split(",")
    ]
    with tempfile.TemporaryDirectory() as folder, args.out.open("a") as out:
        for backend, workers, objective in tqdm(configs, desc="configurations"):
            row = run_one(backend, workers, objective, args, Path(folder))
            row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            out.write(json.dumps(row) + "\n")
            out.flush()
            tqdm.write(
                f"{backend:10s} {objective:5s} x{workers}: {row['trials']} trials, "
                f"{row['trials_per_second']} trials/s, overhead {row['overhead_ms_mean']} ms"
            )


if __name__ == "__main__":
    main()
