"""Crashed workers and lost work: a worker that crashes (an uncaught exception) is restarted
and reported in one line, a bounded number of times; `study run` exits 4 when work was lost,
and returns at once, starting no worker, when the study already holds the trials asked for.

The crashes are real: ``tests/crashing_cli.py`` is mergeopt's command line with a bug planted
in its workers' evaluation (mergeopt has no test hook for it)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mergeopt.workers import RESTARTS_WITHOUT_PROGRESS_PER_DEVICE, WORK_LOST_EXIT, RunSummary
from tests.conftest import REPO, run_cli, tiny_spec, write_spec

# A crashed worker's trial is failed (and its candidate retried) 3 s after its last heartbeat.
FAST_RECOVERY = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
CRASH_LINE = re.compile(
    r"worker on cpu \(pid (\d+)\) crashed with exit code 1 \(its traceback is above on stderr, "
    r"after '\[worker (\d+)\] crashed'\); (restarting it|not restarted)"
)


def create(tmp_path: Path, zoo: Path, url: str, name: str) -> None:
    spec = tiny_spec(zoo, name=name, worker=FAST_RECOVERY)
    for objective in spec["objectives"]:
        objective["limit"] = 8
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / f"{name}.yaml", spec)), "--storage", url
    )
    assert result.returncode == 0, result.stderr


def run_with_crashes(
    tmp_path: Path, name: str, url: str, n_trials: int, crashes: int
) -> subprocess.CompletedProcess[str]:
    """`study run NAME -n N -w 1` whose workers crash on the study's first ``crashes``
    evaluations."""
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CRASHES": str(crashes),
        "CRASH_DIR": str(crash_dir),
    }
    env.pop("MERGEOPT_STORAGE", None)
    command = ["study", "run", name, "-n", str(n_trials), "-w", "1", "--storage", url]
    return subprocess.run(
        [sys.executable, "-m", "tests.crashing_cli", *command, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )


def load(url: str, name: str) -> optuna.Study:
    from mergeopt.storage import load_study

    return load_study(name, url)


@pytest.mark.slow
def test_a_crashed_worker_is_restarted_reported_and_its_trial_retried(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "crash-once")
    result = run_with_crashes(tmp_path, "crash-once", sqlite_url, n_trials=3, crashes=1)
    assert result.returncode == 0, result.stderr
    reports = CRASH_LINE.findall(result.stderr)
    assert len(reports) == 1, result.stderr
    pid, traceback_pid, action = reports[0]
    assert pid == traceback_pid and action == "restarting it"
    # Its traceback is on stderr, under the pid the report names, before the report.
    traceback_at = result.stderr.index(f"[worker {pid}] crashed:\nTraceback")
    assert traceback_at < result.stderr.index("crashed with exit code 1")
    assert "RuntimeError: planted bug" in result.stderr[traceback_at:]
    assert "(3/3 in the study, 1 worker restarts)" in " ".join(result.stdout.split())
    study = load(sqlite_url, "crash-once")
    crashed = study.trials[0]  # the first expert, whose evaluation crashed
    assert crashed.state == TrialState.FAIL
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3 and crashed.params in [t.params for t in complete]
    assert not study.get_trials(states=(TrialState.RUNNING,))


@pytest.mark.slow
def test_a_worker_that_keeps_crashing_ends_the_run_with_work_lost(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "crash-always")
    result = run_with_crashes(tmp_path, "crash-always", sqlite_url, n_trials=3, crashes=100)
    assert result.returncode == WORK_LOST_EXIT, result.stderr
    actions = [action for _, _, action in CRASH_LINE.findall(result.stderr)]
    restarts = RESTARTS_WITHOUT_PROGRESS_PER_DEVICE
    assert actions == ["restarting it"] * restarts + ["not restarted"], result.stderr
    assert f"not restarted ({restarts} restarts in a row without a new complete trial)" in (
        result.stderr
    )
    assert result.stderr.rstrip().splitlines()[-1] == (
        "error: work lost: worker on cpu (exit code 1) died and was not restarted (see above); "
        "0/3 trials complete; run the same command again to continue"
    )
    assert "Pareto" not in result.stdout


def test_work_is_lost_when_a_crashed_worker_stays_down_even_if_others_finish() -> None:
    summary = RunSummary(0, 10, 10, crashed=["cuda:1 (exit code 1)"])
    assert summary.work_lost


@pytest.mark.parametrize(
    ("why", "summary", "lost"),
    [
        ("done", RunSummary(0, 10, 10), False),
        ("stopped short", RunSummary(0, 7, 10), True),
        ("interrupted", RunSummary(0, 7, 10, interrupted=True), False),
        ("past --timeout", RunSummary(0, 7, 10, timed_out=True), False),
        ("grid used up", RunSummary(0, 4, 10, exhausted=True), False),
        ("a mistake (exit 2)", RunSummary(0, 7, 10, user_errors=["cpu"]), False),
        ("database down (exit 3)", RunSummary(0, 7, 10, database_unreachable=["cpu"]), False),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_run_short_of_its_trials_lost_work_unless_it_was_told_to_stop(
    why: str, summary: RunSummary, lost: bool
) -> None:
    assert summary.work_lost is lost, why


def test_a_run_that_stopped_short_says_how_many_of_how_many_in_one_line() -> None:
    from mergeopt.cli.study_lifecycle import work_lost_text

    assert work_lost_text(RunSummary(2, 7, 10)) == (
        "work lost: the workers stopped with 7/10 trials complete; run the same command again "
        "to continue"
    )


def test_a_study_that_already_holds_the_trials_runs_no_worker(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    from mergeopt.storage import load_study
    from mergeopt.study import stored_genome

    # The study's models are deleted after it is created: a worker would fail to load them.
    zoo = shutil.copytree(zoo_dir, tmp_path / "zoo")
    create(tmp_path, zoo, sqlite_url, "done")
    shutil.rmtree(zoo)
    study = load_study("done", sqlite_url)
    genome = stored_genome(study)
    queued = len(study.trials)  # the experts, enqueued by `study create`
    for expert in range(2):
        study.add_trial(
            optuna.trial.create_trial(
                params=genome.expert_alone(expert),
                distributions=genome.distributions(),
                values=[0.5, 10.0],
            )
        )
    started = time.monotonic()
    result = run_cli("study", "run", "done", "-n", "2", "-w", "2", "--storage", sqlite_url)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "study done already holds 2 complete trials (2 asked for); nothing to run\n"
    )
    assert result.stderr == ""
    assert seconds < 20, f"{seconds:.1f} s"
    assert len(load_study("done", sqlite_url).trials) == queued + 2


class _ScriptedProcess:
    """A worker process that has already ended with the next exit code of its device's
    script; records the stream it was started with, as spawn hands it over (pickled)."""

    pid = 0

    def __init__(self, target: object, args: tuple, name: str, log: list, script: dict) -> None:
        self.stream = pickle.loads(pickle.dumps(args[-1]))
        self.exitcode: int | None = script[args[3]].pop(0)
        log.append(self.stream)

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass


def test_a_restarted_worker_draws_from_a_new_stream_of_its_run_and_slot(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each invocation claims the next run number; the worker restarted on a device keeps its
    slot and counts one more start, so it does not replay its predecessor's draws."""
    from mergeopt import workers
    from mergeopt.seeds import WorkerStream
    from mergeopt.storage import open_storage

    study = optuna.create_study(study_name="streams", storage=open_storage(sqlite_url))
    started: list[WorkerStream] = []

    class ScriptedContext:
        def __init__(self, method: str) -> None:
            assert method == "spawn"  # what a real run pickles the stream through
            self.script = {"cpu": [1, 0], "cuda:0": [0]}  # the cpu worker crashes once

        def Process(self, target: object, args: tuple, name: str) -> _ScriptedProcess:  # noqa: N802
            return _ScriptedProcess(target, args, name, started, self.script)

    monkeypatch.setattr(workers.multiprocessing, "get_context", ScriptedContext)
    monkeypatch.setattr(workers, "_sampler_exhausted", lambda study: False)
    monkeypatch.setattr(workers.time, "sleep", lambda seconds: None)
    for run in (0, 1):
        started.clear()
        summary = workers.run_workers(
            study, sqlite_url, n_trials=1, devices=["cpu", "cuda:0"], progress=False
        )
        assert summary.restarts == 1
        assert started == [
            WorkerStream(run, 0, 0),
            WorkerStream(run, 1, 0),
            WorkerStream(run, 0, 1),
        ]
    assert len({s.seed(0) for s in started}) == len(started)


def test_workers_share_the_hosts_cores_whatever_their_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergeopt.workers import worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert worker_threads(["cuda:0"]) == 32
    assert worker_threads(["cuda:0", "cuda:1"]) == 16
    assert worker_threads(["cpu", "cpu", "cuda:0", "cuda:1"]) == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert worker_threads(["cpu", "cpu", "cpu"]) == 1
