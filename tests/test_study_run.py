"""Studies end to end on the zoo: the CLI on SQLite, PostgreSQL and MariaDB with two workers,
exact trial counts, a SIGKILLed worker, Ctrl-C and a rerun that continues, SIGTERM from
`timeout` and SLURM, and workers that leave with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mergeopt import attrs
from tests.conftest import REPO, run_cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow

FAST_RECOVERY = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}


def load(url: str, name: str) -> optuna.Study:
    from mergeopt.storage import load_study

    return load_study(name, url)


def states(study: optuna.Study) -> dict[str, int]:
    from mergeopt.study import trial_counts

    return trial_counts(study)


def create(
    tmp_path: Path, zoo: Path, url: str, name: str, *, limit: int | None = 24, **overrides: object
) -> None:
    spec = tiny_spec(zoo, name=name, **overrides)
    for objective in spec["objectives"]:
        objective["limit"] = limit
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / f"{name}.yaml", spec)), "--storage", url
    )
    assert result.returncode == 0, result.stderr


def assert_finished_study(study: optuna.Study, n_trials: int) -> None:
    counts = states(study)
    assert counts["COMPLETE"] == n_trials
    assert counts["RUNNING"] == 0
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    # The merge really changes the model: both objectives vary across trials.
    for index in range(2):
        assert len({t.values[index] for t in complete}) > 1
    for trial in complete:
        assert trial.user_attrs[attrs.RECIPE]
        assert trial.user_attrs[attrs.METRICS]
        assert trial.user_attrs[attrs.MERGE_SECONDS] >= 0
        assert trial.user_attrs[attrs.EVAL_SECONDS] > 0


def test_demo_study_on_sqlite_with_two_workers(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "tiny")
    result = run_cli(
        "study",
        "run",
        "tiny",
        "--n-trials",
        "16",
        "--workers",
        "2",
        "--storage",
        sqlite_url,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "Pareto trials" in result.stdout
    assert "optuna-dashboard --host 127.0.0.1" in result.stdout
    assert "dashboard note updated; plots: mergeopt study plot tiny --out DIR" in result.stdout
    study = load(sqlite_url, "tiny")
    assert_finished_study(study, 16)
    assert study.metric_names == ["accuracy", "tokens"]
    plotted = run_cli(
        "study", "plot", "tiny", "--out", str(tmp_path / "plots"), "--storage", sqlite_url
    )
    assert plotted.returncode == 0, plotted.stderr
    # A second invocation continues the same count rather than adding 16 more, and refreshes
    # the plots the first one attached.
    result = run_cli(
        "study",
        "run",
        "tiny",
        "--n-trials",
        "18",
        "--workers",
        "2",
        "--storage",
        sqlite_url,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert states(load(sqlite_url, "tiny"))["COMPLETE"] == 18
    assert "dashboard note and plots updated in" in result.stdout
    # Each invocation claimed its own run number, which seeds its workers apart.
    from mergeopt.optuna_compat import study_system_attrs

    runs = {
        key: value
        for key, value in study_system_attrs(load(sqlite_url, "tiny")).items()
        if key.startswith(attrs.RUN_PREFIX)
    }
    assert sorted(runs) == [attrs.RUN_PREFIX + "0", attrs.RUN_PREFIX + "1"]
    assert all(run["devices"] == ["cpu", "cpu"] for run in runs.values())


def test_the_same_study_run_from_scratch_twice_proposes_the_same_recipes(
    tmp_path: Path, zoo_dir: Path
) -> None:
    # The spec's seed and the workers' run, slot and start seed the samplers, not process ids.
    params = []
    for copy in ("a", "b"):
        url = f"sqlite:///{tmp_path / copy}.db"
        create(tmp_path, zoo_dir, url, "again", limit=4)
        result = run_cli("study", "run", "again", "-n", "4", "--storage", url, "--no-progress")
        assert result.returncode == 0, result.stderr
        params.append([t.params for t in load(url, "again").trials])
    assert len(params[0]) == 4 and params[0] == params[1]  # the experts, then two draws


def test_readme_demo_ends_with_a_front_that_holds_merges(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    """README's first command on zoo v2: the demo spec as written (48 items per objective), 16
    trials, 2 workers. Merges of real fine-tunes are working models between the experts, so
    the front holds merges beside the experts and no worker dies. How many merges depends on
    the zoo, whose weights depend on the CPU's floating-point kernels (README, "The model
    zoo"): 1 on CI's Intel zoo in one run, 4 to 10 on an AMD EPYC's in six."""
    from mergeopt.study import stored_genome

    spec = tiny_spec(zoo_dir)
    for objective in spec["objectives"]:
        objective["limit"] = 48
    spec_path = write_spec(tmp_path / "tiny.yaml", spec)
    assert run_cli("study", "create", str(spec_path), "--storage", sqlite_url).returncode == 0
    result = run_cli(
        "study", "run", "tiny", "-n", "16", "-w", "2", "--storage", sqlite_url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    study = load(sqlite_url, "tiny")
    assert_finished_study(study, 16)
    genome = stored_genome(study)
    experts = [genome.expert_alone(e) for e in range(genome.num_experts)]
    front = study.best_trials
    assert any(t.params not in experts for t in front), [t.values for t in front]
    # Experts on the front are labelled by name (a merge may dominate either: with two
    # workers, which worker takes which trial depends on timing, so the front varies between
    # runs).
    names = {0: "expert-direct", 1: "expert-steps"}
    for trial in front:
        if trial.params in experts:
            assert f"{trial.number} ({names[experts.index(trial.params)]})" in result.stdout
    assert "no merge beats the experts" not in result.stdout


def test_off_a_terminal_progress_is_timestamped_lines(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    # stdout is a pipe here, as in a SLURM log or under nohup: a bar would show only at the end.
    create(tmp_path, zoo_dir, sqlite_url, "plain")
    result = run_cli("study", "run", "plain", "-n", "3", "--storage", sqlite_url)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if " study plain: " in line]
    assert lines[0].endswith("study plain: 0/3 complete"), lines
    assert "study plain: 3/3 complete, best of each: accuracy=" in lines[-1], lines
    assert all(line[2] == ":" and line[5] == ":" for line in lines)  # HH:MM:SS first


def test_a_run_that_only_evaluated_the_experts_says_no_merge_beats_them(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "experts")
    result = run_cli("study", "run", "experts", "-n", "2", "--storage", sqlite_url, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "0 (expert-direct)" in result.stdout and "1 (expert-steps)" in result.stdout
    assert "no merge beats the experts yet" in result.stdout
    assert "optuna-dashboard --host 127.0.0.1" in result.stdout


@pytest.mark.postgres
def test_demo_study_on_postgres_with_two_workers(
    tmp_path: Path, zoo_dir: Path, postgres_url: str
) -> None:
    create(tmp_path, zoo_dir, postgres_url, "tiny-pg")
    result = run_cli(
        "study", "run", "tiny-pg", "-n", "16", "-w", "2", "--storage", postgres_url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert_finished_study(load(postgres_url, "tiny-pg"), 16)


@pytest.mark.mysql
def test_demo_study_on_mariadb_with_two_workers(
    tmp_path: Path, zoo_dir: Path, mariadb_url: str
) -> None:
    create(tmp_path, zoo_dir, mariadb_url, "tiny-maria")
    result = run_cli(
        "study",
        "run",
        "tiny-maria",
        "-n",
        "16",
        "-w",
        "2",
        "--storage",
        mariadb_url,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert_finished_study(load(mariadb_url, "tiny-maria"), 16)


def start_run(
    name: str, url: str, n_trials: int, workers: int, *, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "mergeopt.cli",
            "study",
            "run",
            name,
            "-n",
            str(n_trials),
            "-w",
            str(workers),
            "--storage",
            url,
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, timeout: float = 180.0):  # noqa: ANN001, ANN201
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
    return result


def running_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return load(url, name).get_trials(states=(TrialState.RUNNING,))


def test_sigkilled_worker_mid_trial_is_recovered(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    # Whole task files (200 prompts), so that a trial runs long enough to be killed inside.
    create(tmp_path, zoo_dir, sqlite_url, "chaos", limit=None, worker=FAST_RECOVERY)
    process = start_run("chaos", sqlite_url, n_trials=10, workers=2)
    victim = wait_for(
        lambda: next(
            (t for t in running_trials(sqlite_url, "chaos") if attrs.WORKER in t.user_attrs),
            None,
        )
    )
    pid = int(victim.user_attrs[attrs.WORKER].split(":")[1].split("/")[0])
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    study = load(sqlite_url, "chaos")
    counts = states(study)
    assert counts["COMPLETE"] == 10
    assert counts["RUNNING"] == 0
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retried and retried[0].params == killed.params


def test_ctrl_c_leaves_no_running_trial_and_a_rerun_continues(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "interrupt", limit=None)
    process = start_run("interrupt", sqlite_url, n_trials=12, workers=2)
    wait_for(
        lambda: (
            states(load(sqlite_url, "interrupt"))["COMPLETE"] >= 1
            and running_trials(sqlite_url, "interrupt")
        )
    )
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    study = load(sqlite_url, "interrupt")
    assert states(study)["RUNNING"] == 0
    assert states(study)["COMPLETE"] < 12
    interrupted = [
        t for t in study.trials if "interrupted" in str(t.user_attrs.get(attrs.FAIL_REASON, ""))
    ]
    assert interrupted
    result = run_cli(
        "study", "run", "interrupt", "-n", "12", "-w", "2", "--storage", sqlite_url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    study = load(sqlite_url, "interrupt")
    assert states(study)["COMPLETE"] == 12
    # The interrupted candidates were evaluated again first.
    complete_params = [t.params for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert all(t.params in complete_params for t in interrupted)


def worker_pids(study: optuna.Study) -> set[int]:
    """The worker processes that took trials (their label is ``host:pid/device``)."""
    return {
        int(t.user_attrs[attrs.WORKER].split(":")[1].split("/")[0])
        for t in study.trials
        if attrs.WORKER in t.user_attrs
    }


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def interrupted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t for t in study.trials if "interrupted" in str(t.user_attrs.get(attrs.FAIL_REASON, ""))
    ]


def test_timeout_ends_a_run_like_ctrl_c_with_exit_143(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    # `timeout` sends SIGTERM to `study run` only, as SLURM does at a job's end.
    create(tmp_path, zoo_dir, sqlite_url, "timeout", limit=None)
    process = start_run(
        "timeout",
        sqlite_url,
        n_trials=500,
        workers=2,
        prefix=("timeout", "--preserve-status", "40"),
    )
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted (SIGTERM)" in stdout and "Traceback" not in stderr
    study = load(sqlite_url, "timeout")
    assert states(study)["RUNNING"] == 0
    assert interrupted_trials(study)
    assert not [pid for pid in worker_pids(study) if is_alive(pid)]


@pytest.mark.parametrize(
    "signals", [(signal.SIGKILL,), (signal.SIGTERM, signal.SIGKILL)], ids=["kill", "term-then-kill"]
)
def test_workers_requeue_and_leave_when_their_parent_is_killed(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str, signals: tuple[int, ...]
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "orphans", limit=None)
    process = start_run("orphans", sqlite_url, n_trials=500, workers=2)
    wait_for(lambda: len(running_trials(sqlite_url, "orphans")) == 2)
    for signum in signals:  # SLURM's TERM, then KILL before the workers could be waited for
        process.send_signal(signum)
        time.sleep(0.2)
    process.communicate(timeout=60)
    study = load(sqlite_url, "orphans")
    pids = worker_pids(study)
    assert len(pids) == 2
    wait_for(lambda: not any(is_alive(pid) for pid in pids), timeout=60)
    study = load(sqlite_url, "orphans")
    assert states(study)["RUNNING"] == 0
    assert len(interrupted_trials(study)) == 2


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sparsifying_methods_run_as_studies(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str, method: str
) -> None:
    merge = {
        "method": method,
        "blocks": {"num_blocks": 4},
        "search": {"weight": [0.0, 1.0], "density": [0.3, 1.0]},
    }
    create(tmp_path, zoo_dir, sqlite_url, method, merge=merge)
    result = run_cli(
        "study", "run", method, "-n", "6", "-w", "1", "--storage", sqlite_url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert_finished_study(load(sqlite_url, method), 6)


def test_the_vllm_demo_spec_runs_on_the_cpu(tmp_path: Path, zoo_dir: Path, sqlite_url: str) -> None:
    import yaml

    spec = yaml.safe_load((REPO / "studies" / "tiny-vllm.yaml").read_text())
    base = tiny_spec(zoo_dir)
    spec["models"] = base["models"]
    for objective in spec["objectives"]:
        objective["task"] = str(zoo_dir / "tasks" / "arith.jsonl")
        objective["limit"] = 24
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / "v.yaml", spec)), "--storage", sqlite_url
    )
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "study", "run", "tiny-vllm", "-n", "4", "-w", "1", "--storage", sqlite_url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert_finished_study(load(sqlite_url, "tiny-vllm"), 4)


def test_a_grid_study_stops_when_every_grid_point_was_evaluated(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    # 2 experts x 2 grid points of one weight: 4 points, fewer than the 10 trials asked for
    sampler = {"name": "model-level", "options": {"mode": "grid", "grid_points": 2}}
    create(tmp_path, zoo_dir, sqlite_url, "grid", sampler=sampler, limit=8)
    result = run_cli(
        "study", "run", "grid", "-n", "10", "-w", "1", "--storage", sqlite_url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    study = load(sqlite_url, "grid")
    points = {
        tuple(sorted(t.params.items())) for t in study.get_trials(states=(TrialState.COMPLETE,))
    }
    assert len(points) == 4
    assert states(study)["RUNNING"] == 0
