"""Each recovery branch of the worker loop (``mergeopt/trial_loop.py``), one fault at a time.

A real Optuna RDB storage on SQLite, a runner that merges nothing, and a storage wrapper that
makes chosen calls lose their connection (``tests/fault_storage.py``). The slow versions of
these faults, with real processes and a real PostgreSQL restart, are ``test_database_faults.py``
and ``test_chaos.py``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from mergeopt import attrs
from mergeopt.objectives.fidelity import Finished
from mergeopt.storage import DatabaseUnreachable, open_storage
from tests.fault_storage import (
    GENOME,
    FaultyStorage,
    Harness,
    NoopRunner,
    create_study,
    fail_running_trials_as_stale,
)

pytestmark = [
    # Workers filter this one too: they beat their trials themselves (TrialHeartbeats).
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
    # Each takes about a second; a broken branch tends to wait for a stale trial (minutes).
    pytest.mark.timeout(60),
]

CANDIDATE = GENOME.expert_alone(0)


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """``run_worker`` installs its Ctrl-C/SIGTERM/SIGHUP handlers; give pytest its own back."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {signum: signal.getsignal(signum) for signum in signums}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(url=f"sqlite:///{tmp_path / 'loop.db'}", monkeypatch=monkeypatch)


@pytest.fixture
def warnings_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="mergeopt")
    return caplog


def states(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    return [t.state.name for t in trials]


def test_a_trial_left_behind_by_a_lost_ask_is_failed_and_its_candidate_requeued(
    harness: Harness, warnings_logged: pytest.LogCaptureFixture
) -> None:
    study = create_study(harness.url, enqueue=[CANDIDATE])
    queued_id = study.get_trials(deepcopy=False)[0]._trial_id
    lost: list = []

    def faults(storage: FaultyStorage) -> None:
        # The queued trial is already RUNNING (claimed, held by the heartbeats) when ask reads
        # it back: the connection drops there, and ask never returns the trial.
        lost.append(storage.inject("get_trial", when=lambda call: call["trial_id"] == queued_id))

    assert harness.run(1, faults=faults) == 1

    assert lost[0].injected == 1
    orphan, retry = harness.trials()
    assert (orphan.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert orphan.user_attrs[attrs.FAIL_REASON] == "the database connection was lost during ask"
    # The same candidate, with its user attrs, asked anew and evaluated once.
    assert retry.params == CANDIDATE
    assert retry.user_attrs["mergeopt:requeued_from"] == orphan.number
    assert retry.user_attrs[attrs.PREFIX + "source"] == "queued 0"
    assert harness.runner.evaluated == [CANDIDATE]
    assert harness.ended == [retry.number]
    assert "unreachable (injected: connection lost)" in warnings_logged.text


def test_a_tell_whose_reply_is_lost_is_retried_and_counted_once(
    harness: Harness, warnings_logged: pytest.LogCaptureFixture
) -> None:
    create_study(harness.url)
    lost: list = []

    def faults(storage: FaultyStorage) -> None:
        # The database records the first trial COMPLETE; the worker never hears so.
        lost.append(
            storage.inject(
                "set_trial_state_values",
                when=lambda call: call["state"] == TrialState.COMPLETE,
                reply_lost=True,
            )
        )

    assert harness.run(2, faults=faults) == 2

    assert lost[0].injected == 1
    trials = harness.trials()
    assert states(trials) == ["COMPLETE", "COMPLETE"]
    assert harness.ended == [0, 1]
    assert len(harness.runner.evaluated) == 2
    first = trials[0]
    assert first.values == pytest.approx(
        [sum(first.params.values()) / 4, 1 - sum(first.params.values()) / 4]
    )
    assert "reachable again" in warnings_logged.text


def test_a_result_for_a_trial_failed_as_stale_completes_its_retry_copy(
    harness: Harness, warnings_logged: pytest.LogCaptureFixture
) -> None:
    create_study(harness.url)
    failed: list[list[int]] = []

    def stalls(call: int) -> None:
        # While the first evaluation runs, another worker finds its heartbeat stale.
        if call == 0:
            failed.append(fail_running_trials_as_stale(harness.url, harness.name))

    assert harness.run(1, during_evaluation=stalls) == 1

    assert failed == [[0]]
    stale, retry = harness.trials()
    assert (stale.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.system_attrs["retry_history"] == [stale.number]
    assert retry.user_attrs["mergeopt:adopted_from"] == stale.number
    assert retry.params == stale.params
    assert retry.user_attrs["mergeopt:seed_seen"] == 0  # the values evaluated for trial 0
    assert len(harness.runner.evaluated) == 1  # the candidate was evaluated once
    assert harness.ended == [stale.number]
    assert "reported as its retry, trial 1" in warnings_logged.text


def test_a_surplus_trial_is_given_back_unevaluated_and_not_counted(
    harness: Harness, warnings_logged: pytest.LogCaptureFixture
) -> None:
    create_study(harness.url)

    def another_worker_finishes_first() -> None:
        # Between this worker's count (0 of 1) and its ask, another worker completes trial 0.
        other = optuna.load_study(study_name=harness.name, storage=harness.url)
        other.add_trial(
            optuna.trial.create_trial(
                params=CANDIDATE, distributions=GENOME.distributions(), values=[1.0, 0.0]
            )
        )

    def faults(storage: FaultyStorage) -> None:
        storage.inject("_create_new_trial", effect=another_worker_finishes_first)

    assert harness.run(1, faults=faults) == 0

    done, surplus = harness.trials()
    assert done.state == TrialState.COMPLETE
    assert surplus.state == TrialState.FAIL
    assert surplus.user_attrs[attrs.FAIL_REASON] == "surplus: the study already has 1"
    assert surplus.user_attrs[attrs.GIVEN_BACK] is True  # not a failed candidate
    assert harness.runner.evaluated == []
    assert harness.ended == []
    assert "failed" not in warnings_logged.text  # given back, not reported as a failed trial


def test_an_outage_past_the_limit_raises_database_unreachable(
    harness: Harness, warnings_logged: pytest.LogCaptureFixture
) -> None:
    create_study(harness.url, database_outage_limit=1)
    down: list = []

    def faults(storage: FaultyStorage) -> None:
        down.append(storage.inject("_create_new_trial", times=None))  # every ask, for good

    with pytest.raises(DatabaseUnreachable) as raised:
        harness.run(1, faults=faults)

    assert raised.value.seconds >= 1
    assert harness.url in str(raised.value)
    assert down[0].injected >= 2  # retried with back-off before giving up
    assert warnings_logged.text.count("retrying in") == down[0].injected - 1
    assert harness.runner.closed
    assert harness.trials() == []  # nothing half-written


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(
    harness: Harness,
) -> None:
    """A worker killed between creating its trial and beating it leaves a RUNNING trial with
    no heartbeat row, which Optuna never fails as stale. When it is one of the last trials
    the other workers wait for it (COMPLETE + RUNNING fill the study): their loop must start
    its clock, or they wait forever (the PostgreSQL chaos run hung 900 s in CI)."""
    import datetime

    import sqlalchemy
    from optuna.storages._rdb import models

    create_study(harness.url, heartbeat_interval=1, grace_period=1)
    dead_worker = optuna.load_study(study_name=harness.name, storage=open_storage(harness.url))
    dead_worker.enqueue_trial(CANDIDATE)
    unbeaten = dead_worker.ask()  # RUNNING, never beaten: its worker is gone
    long_ago = datetime.datetime(2000, 1, 1)
    with open_storage(harness.url).engine.begin() as connection:
        connection.execute(
            sqlalchemy.update(models.TrialModel)
            .where(models.TrialModel.trial_id == unbeaten._trial_id)
            .values(datetime_start=long_ago)
        )

    assert harness.run(1) == 1

    abandoned, retry = harness.trials()
    assert abandoned.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE
    assert retry.params == CANDIDATE
    assert harness.runner.evaluated == [CANDIDATE]


def stale_trial_seen_by_two_workers(url: str, name: str) -> tuple[optuna.Study, optuna.Study]:
    """Two workers' studies (storages of their own, retries on) and one RUNNING trial whose
    heartbeat is past the grace period."""
    import datetime

    import sqlalchemy
    from optuna.storages._rdb import models

    storages = [
        open_storage(url, heartbeat_interval=60, grace_period=180, max_retry=3) for _ in range(2)
    ]
    first, second = (optuna.load_study(study_name=name, storage=s) for s in storages)
    first.enqueue_trial(CANDIDATE)
    dead = first.ask()
    storages[0].record_heartbeat(dead._trial_id)
    with storages[0].engine.begin() as connection:
        connection.execute(
            sqlalchemy.update(models.TrialHeartbeatModel)
            .where(models.TrialHeartbeatModel.trial_id == dead._trial_id)
            .values(heartbeat=datetime.datetime(2000, 1, 1))
        )
    return first, second


def test_a_stale_trial_failed_by_two_workers_at_once_is_retried_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other worker fails the trial while this one is failing it too, after this one read
    the trial RUNNING (the SQLite CMA-ES chaos run: SQLite ignores Optuna's SELECT ... FOR
    UPDATE). Only one may fail it: each failure queues a retry copy, and two copies had the
    candidate evaluated twice."""
    from optuna.storages._rdb import models

    create_study(harness.url)
    first, second = stale_trial_seen_by_two_workers(harness.url, harness.name)
    read_row = models.TrialModel.find_or_raise_by_id
    racing: list[bool] = []

    def read_while_the_other_worker_fails_it(*args: object, **kwargs: object) -> object:
        row = read_row(*args, **kwargs)
        if racing and racing.pop():
            optuna.storages.fail_stale_trials(second)
        return row

    monkeypatch.setattr(
        models.TrialModel, "find_or_raise_by_id", read_while_the_other_worker_fails_it
    )
    racing.append(True)
    optuna.storages.fail_stale_trials(first)

    stale, *retries = harness.trials()
    assert stale.state == TrialState.FAIL
    assert len(retries) == 1, "the candidate was queued again twice"
    assert retries[0].state == TrialState.WAITING
    assert retries[0].system_attrs["fixed_params"] == CANDIDATE
    assert retries[0].system_attrs["retry_history"] == [stale.number]


def test_a_tell_that_loses_the_race_to_a_stale_failure_completes_the_retry_copy(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker fails the trial as stale between the loop's read of its state and its
    tell: the tell loses (the trial is FAIL, its retry queued), and the result is reported as
    the retry copy instead of crashing the worker or completing a failed trial."""
    from mergeopt import trial_loop

    create_study(harness.url, enqueue=[CANDIDATE])
    read_state = trial_loop.trial_state

    def read_then_failed_as_stale(storage: object, trial_id: int) -> TrialState:
        state = read_state(storage, trial_id)
        if state == TrialState.RUNNING:
            fail_running_trials_as_stale(harness.url, harness.name)
        return state

    monkeypatch.setattr(trial_loop, "trial_state", read_then_failed_as_stale)
    assert harness.run(1) == 1

    stale, retry = harness.trials()
    assert (stale.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.params == stale.params == CANDIDATE
    assert retry.user_attrs["mergeopt:adopted_from"] == stale.number
    assert len(harness.runner.evaluated) == 1


class StoppingRunner(NoopRunner):
    """Stops a trial, as fidelity rungs do, when a COMPLETE trial dominates its values (read
    through the front the worker loop gives the runner)."""

    front: Callable[[], Sequence[Finished]] | None = None

    def evaluate(
        self, params: Mapping[str, float], *, seed: int
    ) -> tuple[list[float], dict[str, Any]]:
        from mergeopt.objectives.fidelity import dominated
        from mergeopt.runner import TrialStopped

        values, user_attrs = super().evaluate(params, seed=seed)
        assert self.front is not None
        if dominated(values, [f.values for f in self.front()], [True, False]):
            stopped = {attrs.FIDELITY: {"rung": 0, "stopped": True}, attrs.ITEMS_SCORED: 6}
            raise TrialStopped(values, {**user_attrs, **stopped})
        return values, user_attrs


def everywhere(weight: float) -> dict[str, float]:
    return dict.fromkeys(GENOME.param_names, weight)


def test_a_trial_stopped_by_fidelity_rungs_is_told_pruned_and_not_counted(
    harness: Harness,
) -> None:
    create_study(harness.url, enqueue=[everywhere(0.9), everywhere(0.1), everywhere(0.95)])

    assert harness.run(2, runner_type=StoppingRunner) == 2

    first, stopped, better = harness.trials()[:3]
    assert (first.state, stopped.state, better.state) == (
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    )
    assert stopped.values is None  # multi-objective: the partial values stay in user attrs
    assert stopped.user_attrs[attrs.FIDELITY] == {"rung": 0, "stopped": True}
    assert stopped.user_attrs[attrs.ITEMS_SCORED] == 6
    assert stopped.user_attrs[attrs.SEED] == 1 and stopped.user_attrs["mergeopt:seed_seen"] == 1
    assert harness.ended == [0, 2]


def test_a_stopped_trial_failed_as_stale_meanwhile_is_left_to_its_retry(
    harness: Harness,
) -> None:
    create_study(harness.url, enqueue=[everywhere(0.9), everywhere(0.1)])
    failed: list[list[int]] = []

    def stalls(call: int) -> None:
        if call == 1:  # the second trial, to be stopped, is failed as stale meanwhile
            failed.append(fail_running_trials_as_stale(harness.url, harness.name))
            # Queued behind the retry: the study's second COMPLETE trial once the retry is
            # scored (random trials, all dominated by the first, would be stopped for ever).
            other_worker = optuna.load_study(
                study_name=harness.name, storage=open_storage(harness.url)
            )
            other_worker.enqueue_trial(everywhere(0.95))

    assert harness.run(2, during_evaluation=stalls, runner_type=StoppingRunner) == 2

    assert failed == [[1]]
    first, stale, *rest = harness.trials()
    assert (first.state, stale.state) == (TrialState.COMPLETE, TrialState.FAIL)
    assert attrs.FIDELITY not in stale.user_attrs  # nothing written into the failed trial
    retry = next(t for t in rest if t.system_attrs.get("retry_history") == [stale.number])
    assert retry.params == stale.params
    # The retry is scored afresh (from rung 0) and stopped in its own trial.
    assert retry.state == TrialState.PRUNED and retry.user_attrs[attrs.FIDELITY]["stopped"]
    assert [t.state for t in rest] == [TrialState.PRUNED, TrialState.COMPLETE]  # no other trial


def test_a_trial_left_running_by_a_worker_killed_after_the_study_was_done_is_failed(
    harness: Harness,
) -> None:
    """No worker is left to find its trial stale (the MariaDB chaos run: a worker killed
    inside its ask as the last trial completed): the run fails it once stale, and leaves a
    live worker's trial alone."""
    import datetime

    import sqlalchemy
    from optuna.storages._rdb import models

    from mergeopt.workers import _fail_orphaned_trials

    study = create_study(harness.url, heartbeat_interval=1, grace_period=1)
    storage = open_storage(harness.url, heartbeat_interval=1, grace_period=1)
    beating = optuna.load_study(study_name=harness.name, storage=storage)
    dead, live = beating.ask(), beating.ask()
    for trial, beat in (
        (dead, datetime.datetime(2000, 1, 1)),
        (live, datetime.datetime(2100, 1, 1)),
    ):
        storage.record_heartbeat(trial._trial_id)
        with storage.engine.begin() as connection:
            connection.execute(
                sqlalchemy.update(models.TrialHeartbeatModel)
                .where(models.TrialHeartbeatModel.trial_id == trial._trial_id)
                .values(heartbeat=beat)
            )

    assert _fail_orphaned_trials(study, harness.url) == 1
    by_number = {t.number: t.state for t in harness.trials()}
    assert by_number[dead.number] == TrialState.FAIL
    assert by_number[live.number] == TrialState.RUNNING
