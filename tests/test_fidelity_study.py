"""Fidelity rungs in real studies on the zoo: hopeless merges are stopped as PRUNED with their
partial values and cost, status counts what they saved, two workers share one study, and a
worker SIGKILLed mid-rung leaves a stale trial that is retried from rung 0."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

from mergeopt import attrs
from mergeopt.objectives.fidelity import rung_size
from tests.conftest import run_cli
from tests.test_study_run import (
    FAST_RECOVERY,
    create,
    load,
    running_trials,
    start_run,
    states,
    wait_for,
)

pytestmark = pytest.mark.slow

ITEMS = 48
# The zoo's merges lie close to its front: with 24 items of 48, intervals at a useful
# confidence are wider than the gaps, and few trials stop. A confidence near 0 stops a merge
# whose estimate alone is dominated, and random merges dominated by the experts (the study's
# first trials) are common: what these tests need is trials of both kinds.
FIDELITY = {"rungs": [0.5, 1.0], "confidence": 0.05}


def run(name: str, url: str, n_trials: int, workers: int = 1) -> None:
    result = run_cli(
        "study", "run", name, "-n", str(n_trials), "-w", str(workers), "--storage", url,
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def enqueue_dominated_line_points(url: str, name: str) -> None:
    """After the two experts, two model-level merges that each expert dominates on the full
    task (docs/bench/zoo-landscape-2026-11-30.md: 0.1 of expert-direct scores 0.85 at the
    steps expert's 21.2 tokens, which scores 0.90; 0.9 scores 0.58 at the direct expert's 4.6
    tokens, which scores 0.63), so that the study stops a merge whatever its sampler draws."""
    from mergeopt.study import stored_genome

    study = load(url, name)
    for direct in (0.1, 0.9):  # expert 0 is expert-direct, expert 1 expert-steps
        study.enqueue_trial(
            {
                param: direct if ".e0." in param else 1.0 - direct
                for param in stored_genome(study).param_names
            }
        )


def assert_rungs_kept_their_promises(study_trials: list, items: int) -> None:
    """COMPLETE trials scored every item once; stopped ones the first rung's, with their
    partial values, intervals and cost."""
    first = rung_size(FIDELITY["rungs"][0], items)  # both objectives answer one pass of a task
    for trial in study_trials:
        if trial.state == TrialState.COMPLETE:
            assert trial.user_attrs[attrs.ITEMS_SCORED] == items
            assert attrs.FIDELITY.read(trial)["stopped"] is False
            assert attrs.FIDELITY.read(trial)["rung"] == 1
        elif trial.state == TrialState.PRUNED:
            record = attrs.FIDELITY.read(trial)
            assert (
                record["stopped"] is True
                and record["rung"] == 0
                and record["fraction"] == FIDELITY["rungs"][0]
            )
            assert trial.user_attrs[attrs.ITEMS_SCORED] == first
            assert trial.user_attrs[attrs.TOKENS_GENERATED] > 0
            assert trial.user_attrs[attrs.EVAL_SECONDS] > 0
            assert set(record["values"]) == {"accuracy", "tokens"}
            low, high = record["intervals"]["accuracy"]
            assert low <= record["values"]["accuracy"] <= high
            assert trial.user_attrs[attrs.RECIPE] and attrs.SEED in trial.user_attrs


def test_a_study_with_fidelity_stops_hopeless_merges_and_says_what_it_saved(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    create(tmp_path, zoo_dir, sqlite_url, "rungs", limit=ITEMS, fidelity=FIDELITY)
    enqueue_dominated_line_points(sqlite_url, "rungs")
    run("rungs", sqlite_url, 12)
    study = load(sqlite_url, "rungs")
    counts = states(study)
    assert counts["COMPLETE"] == 12 and counts["RUNNING"] == 0
    assert counts["PRUNED"] > 0, "no merge was stopped"
    assert_rungs_kept_their_promises(study.trials, ITEMS)
    # The first rung's items are the same for every trial of the study: they are stored once.
    assert attrs.FIDELITY_PLAN.get(study) is not None
    report = json.loads(
        run_cli("study", "status", "rungs", "--json", "--storage", sqlite_url).stdout
    )
    search = report["evaluation_cost"]["search"]
    assert search["stopped"] == counts["PRUNED"]
    assert search["tokens_saved"] > 0 and 0 < search["fraction_saved"] < 1
    wide = {"COLUMNS": "200"}  # rich fits the lines to 80 columns off a terminal
    text = run_cli("study", "status", "rungs", "--storage", sqlite_url, env=wide).stdout
    assert f"pruned {counts['PRUNED']} (stopped early)" in text
    assert f"{counts['PRUNED']} stopped early by fidelity rungs" in text


def test_two_workers_share_a_study_with_fidelity(
    tmp_path: Path, zoo_dir: Path, postgres_url: str
) -> None:
    create(tmp_path, zoo_dir, postgres_url, "rungs2", limit=ITEMS, fidelity=FIDELITY)
    run("rungs2", postgres_url, 10, workers=2)
    study = load(postgres_url, "rungs2")
    counts = states(study)
    assert counts["COMPLETE"] == 10 and counts["RUNNING"] == 0
    assert_rungs_kept_their_promises(study.trials, ITEMS)
    workers = {attrs.WORKER.get(t) for t in study.trials if t.state.is_finished()}
    assert len(workers - {None}) == 2


def test_a_worker_killed_mid_rung_leaves_a_trial_retried_from_rung_0(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    # Whole task files (200 prompts), so that a rung runs long enough to be killed inside.
    create(
        tmp_path, zoo_dir, sqlite_url, "killed", limit=None, worker=FAST_RECOVERY,
        fidelity=FIDELITY,
    )  # fmt: skip
    process = start_run("killed", sqlite_url, n_trials=4, workers=2)
    victim = wait_for(
        lambda: next(
            (t for t in running_trials(sqlite_url, "killed") if attrs.WORKER in t.user_attrs),
            None,
        )
    )
    pid = int(victim.user_attrs[attrs.WORKER].split(":")[1].split("/")[0])
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    study = load(sqlite_url, "killed")
    assert states(study)["COMPLETE"] == 4 and states(study)["RUNNING"] == 0
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL
    # Nothing of its rungs was written into it: a partial score never mixes with a retry's.
    assert attrs.ITEMS_SCORED not in killed.user_attrs and attrs.FIDELITY not in killed.user_attrs
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retried and retried[0].params == killed.params
    total = len(zoo_items(zoo_dir))
    assert_rungs_kept_their_promises(study.trials, total)


def zoo_items(zoo: Path) -> list[str]:
    return [line for line in (zoo / "tasks" / "arith.jsonl").read_text().splitlines() if line]
