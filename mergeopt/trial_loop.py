"""The fault-tolerant worker loop: ask -> merge -> score -> tell, and its recovery.

It keeps the study at exactly the requested number of COMPLETE trials: a worker asks for a new
trial only while COMPLETE + RUNNING trials are fewer than the target, and waits while the
remaining ones are running (they may still fail and need a replacement). Every database call
survives an outage (``_Reconnect``); a trial left behind by a lost ``ask`` is failed and its
candidate requeued (``_abandon``), a result whose trial was failed as stale meanwhile is
reported as its retry copy (``_adopt_retry``), and a surplus trial is given back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergeopt import attrs
from mergeopt.heartbeats import TrialHeartbeats
from mergeopt.interrupts import Interrupts
from mergeopt.optuna_compat import (
    clock_unbeaten_trials,
    fixed_params,
    retry_history,
    storage_of,
    trial_id_of,
)
from mergeopt.runner import TrialRunner, TrialStopped
from mergeopt.seeds import WorkerStream, derive_seed
from mergeopt.storage import (
    DatabaseUnreachable,
    connection_error_text,
    is_connection_error,
    load_study,
    mask_url,
    open_storage,
)
from mergeopt.study import stored_genome, stored_spec, trial_counts
from mergeopt.tracking import WorkerTrackers
from mergeopt.trial_io import batched_trial_writes, count_trials, trial_state

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage

    from mergeopt.objectives.fidelity import Finished
    from mergeopt.spec import WorkerSpec

logger = logging.getLogger("mergeopt")

POLL_SECONDS = 0.5


def _default_runner(study: optuna.Study, device: str) -> TrialRunner:
    return TrialRunner(study, device=device)


def worker_label(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}/{device}"


def open_worker_storage(storage_url: str, worker: WorkerSpec) -> RDBStorage:
    """The storage as workers open it: heartbeats, grace period and retries of the study's
    worker settings."""
    return open_storage(
        storage_url,
        heartbeat_interval=worker.heartbeat_interval,
        grace_period=worker.effective_grace_period,
        max_retry=worker.max_retry,
    )


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    n_trials: int,
    device: str = "cpu",
    timeout: float | None = None,
    on_trial_end: Callable[[int], None] | None = None,
    runner_factory: Callable[[optuna.Study, str], TrialRunner] | None = None,
    stream: WorkerStream | None = None,
) -> int:
    """Run trials of ``study_name`` until it holds ``n_trials`` COMPLETE trials (or timeout).

    Returns how many trials this worker completed. Ctrl-C fails the running trial, enqueues its
    parameters again (so a rerun evaluates the same candidate first) and re-raises.
    ``runner_factory(study, device)`` replaces the merge-and-score runner (benchmarks of the
    storage use a no-op objective). ``stream`` seeds the sampler (``study run`` gives each
    worker its own); without it the sampler draws from a stream of the process id.

    Every database call of the loop survives an outage (see ``_Reconnect``): the worker backs
    off and continues when the database is back, a finished evaluation is reported then, and
    past ``worker.database_outage_limit`` seconds it raises ``DatabaseUnreachable``.
    """
    import optuna
    from optuna.trial import TrialState

    from mergeopt.objectives.scorers.base import TrialEvaluationError
    from mergeopt.samplers import create_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    probe = load_study(study_name, open_storage(storage_url))
    spec = stored_spec(probe)
    worker = spec.worker
    storage = open_worker_storage(storage_url, worker)
    masked = mask_url(storage_url)
    heartbeats = TrialHeartbeats(
        storage,
        worker.heartbeat_interval,
        on_error=lambda e: logger.warning(
            "heartbeat failed (%s); retrying", connection_error_text(e, storage_url)
        ),
        on_recovered=lambda: logger.warning("heartbeat recorded again"),
    ).watch()
    reconnect = _Reconnect(
        url=storage_url, masked_url=masked, limit=worker.database_outage_limit, marks=heartbeats
    )
    genome = stored_genome(probe)
    sampler = create_sampler(
        spec.sampler.name,
        spec.sampler.options,
        seed=_worker_seed(spec.seed, stream),
        genome=genome,
        num_objectives=len(spec.objectives),
    )
    study = load_study(study_name, storage, sampler=sampler)
    interrupts = Interrupts.install()
    runner = (runner_factory or _default_runner)(study, device)
    if spec.sampler.name.startswith("saasbo"):
        # After the scorer: a vLLM engine that forks its workers does so before this thread.
        from mergeopt.samplers.saasbo_acquisition import start_fused_kernel_load

        start_fused_kernel_load()
    runner.front = lambda: reconnect.call(_complete_trials, study)
    distributions = genome.distributions()
    label = worker_label(device)
    trackers = WorkerTrackers.open(
        spec.tracking,
        study_name=study_name,
        metric_names=[objective.name for objective in spec.objectives],
        worker=label,
    )
    # After an outage every heartbeat is old: wait until the other workers' heartbeats had
    # time to resume before failing their trials as stale.
    stale_check_pause = 2 * worker.heartbeat_interval + 1
    started = time.monotonic()
    completed = 0

    def look() -> tuple[bool, dict[str, int]]:
        """Fail stale trials; whether to stop, and the trial counts.

        A trial whose worker died before its first heartbeat is never stale to Optuna; its
        clock is started here, or the last trials of a study could wait for it forever.
        """
        if not heartbeats.outage_within(stale_check_pause):
            clock_unbeaten_trials(study)
            optuna.storages.fail_stale_trials(study)
        if _sampler_exhausted(study):
            return True, {}
        return False, trial_counts(study)

    orphans: list[int] = []

    def ask() -> optuna.Trial:
        """``study.ask``; a trial left behind by an ask that lost its connection is failed
        (and its queued candidate enqueued again) before asking anew."""
        while orphans:
            _abandon(study, orphans[0], reason="the database connection was lost during ask")
            orphans.pop(0)
        try:
            # A trial row must never exist without its handle; its parameters and worker
            # label go to the database in one transaction.
            asked = None
            with interrupts.deferred(), batched_trial_writes(storage_of(study)):
                asked = study.ask(distributions)
                asked.set_user_attr(attrs.WORKER, label)
            return asked
        except KeyboardInterrupt:  # raised as the deferred section ends: the trial exists
            if asked is not None:
                reason = f"interrupted ({interrupts.signal_name}); requeued"
                _give_back(study, asked, reason=reason, requeue_sampled=True)
            raise
        except Exception as exc:
            if is_connection_error(exc):
                for trial_id in heartbeats.held():
                    heartbeats.release(trial_id)
                    orphans.append(trial_id)
            raise

    with heartbeats:
        try:
            while True:
                if timeout is not None and time.monotonic() - started > timeout:
                    break
                exhausted, counts = reconnect.call(look)
                if exhausted or counts["COMPLETE"] >= n_trials:
                    break
                if counts["COMPLETE"] + counts["RUNNING"] >= n_trials:
                    time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; one may fail
                    continue
                trial = None
                try:
                    trial = reconnect.call(ask)
                    if reconnect.call(_is_surplus, study, trial.number, n_trials):
                        reason = f"surplus: the study already has {n_trials}"
                        reconnect.call(_give_back, study, trial, reason=reason)
                        continue
                    outcome = _run_one(study, trial, runner, reconnect, TrialEvaluationError)
                except KeyboardInterrupt:
                    if trial is not None:
                        _give_back(
                            study,
                            trial,
                            reason=f"interrupted ({interrupts.signal_name}); requeued",
                            requeue_sampled=True,
                        )
                    raise
                finally:
                    for trial_id in heartbeats.held():  # finished or given back
                        heartbeats.release(trial_id)
                trackers.report(study, trial)  # never raises: a tracker cannot fail a trial
                if outcome is TrialState.COMPLETE:
                    completed += 1
                    if on_trial_end is not None:
                        on_trial_end(trial.number)
        finally:
            trackers.close()
            runner.close()
    return completed


@dataclass
class _Reconnect:
    """Retries a database step with exponential back-off while the database is unreachable.

    ``call(step, *args)`` runs ``step(*args)``; on a connection-level error
    (``is_connection_error``) it logs one line per attempt with the masked URL, sleeps 0.5 s
    doubling up to 15 s, and runs it again, until ``limit`` seconds have passed since the first
    failure: then it raises ``DatabaseUnreachable``. Steps must be safe to repeat (they re-read
    what they need).
    """

    url: str
    masked_url: str
    limit: float
    marks: TrialHeartbeats
    first_delay: float = 0.5
    max_delay: float = 15.0

    def call(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delay = self.first_delay
        down_since: float | None = None
        attempt = 0
        while True:
            try:
                result = step(*args, **kwargs)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                self.marks.note_outage()
                attempt += 1
                elapsed = now - down_since
                if elapsed >= self.limit:
                    raise DatabaseUnreachable(self.masked_url, elapsed) from None
                wait = min(delay, self.limit - elapsed)
                logger.warning(
                    "database %s unreachable (%s); attempt %d, retrying in %.1f s",
                    self.masked_url,
                    connection_error_text(exc, self.url),
                    attempt,
                    wait,
                )
                time.sleep(wait)
                delay = min(2 * delay, self.max_delay)
                continue
            if down_since is not None:
                self.marks.note_outage()
                logger.warning(
                    "database %s reachable again after %.1f s; continuing",
                    self.masked_url,
                    time.monotonic() - down_since,
                )
            return result


def _worker_seed(seed: int, stream: WorkerStream | None) -> int:
    if stream is not None:
        return stream.seed(seed)
    # Distinct per process, so that independent samplers do not propose identical points.
    return derive_seed(seed, os.getpid())


def _sampler_exhausted(study: optuna.Study) -> bool:
    """Samplers with a finite space (model-level grid) mark the study when it is used up;
    other samplers never do, so their workers skip the read (a query per trial)."""
    from mergeopt.samplers.model_level import ModelLevelSampler, is_exhausted

    return isinstance(study.sampler, ModelLevelSampler) and is_exhausted(study)


def _is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Another worker asked at the same moment: trials before this one already fill the study."""
    earlier = count_trials(study, below_number=number)
    return earlier["COMPLETE"] + earlier["RUNNING"] >= n_trials


# User attrs that describe one evaluation attempt, not the candidate: not copied on requeue.
_ATTEMPT_ATTRS = (attrs.FAIL_REASON, attrs.WORKER, attrs.REQUEUED_FROM)


def _requeue_attrs(user_attrs: Mapping[str, Any], number: int) -> dict[str, Any]:
    """The candidate's user attrs (a batch sampler's generation and index) for its new trial."""
    kept = {k: v for k, v in user_attrs.items() if k not in _ATTEMPT_ATTRS}
    return {**kept, attrs.REQUEUED_FROM: number}


def _give_back(
    study: optuna.Study, trial: optuna.Trial, *, reason: str, requeue_sampled: bool = False
) -> None:
    """Fail a trial that will not be evaluated and enqueue its candidate again.

    A candidate popped from the queue (a sampler's batch point) always goes back, with its user
    attrs (so CMA-ES still counts it in its generation); a freshly sampled one only with
    ``requeue_sampled``. Safe to repeat after a lost connection: a finished trial is not told
    again.
    """
    from optuna.trial import TrialState

    frozen = storage_of(study).get_trial(trial_id_of(trial))
    if frozen.state.is_finished():
        return
    fixed = fixed_params(frozen)
    params = fixed or (dict(frozen.params) if requeue_sampled else None)
    trial.set_user_attr(attrs.FAIL_REASON, reason)
    trial.set_user_attr(attrs.GIVEN_BACK, True)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if params:
        study.enqueue_trial(params, user_attrs=_requeue_attrs(frozen.user_attrs, trial.number))


def _abandon(study: optuna.Study, trial_id: int, *, reason: str) -> None:
    """Fail a RUNNING trial whose ``study.ask`` never returned, and requeue its candidate."""
    import optuna
    from optuna.trial import TrialState

    storage = storage_of(study)
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return
    storage.set_trial_user_attr(trial_id, attrs.FAIL_REASON, reason)
    storage.set_trial_user_attr(trial_id, attrs.GIVEN_BACK, True)
    try:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # failed as stale by another worker meanwhile, and retried by it
    fixed = fixed_params(frozen)
    if fixed:
        study.enqueue_trial(fixed, user_attrs=_requeue_attrs(frozen.user_attrs, frozen.number))


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    runner: TrialRunner,
    reconnect: _Reconnect,
    evaluation_error: type[Exception],
) -> Any:
    """Evaluate one trial (its heartbeat is beaten by the worker's ``TrialHeartbeats``) and
    report the outcome, retrying the report until the database answers."""
    from optuna.trial import TrialState

    try:
        seed = _trial_seed(runner, trial)
        values, user_attrs = runner.evaluate(trial.params, seed=seed)
        user_attrs[attrs.SEED] = seed
    except TrialStopped as stop:
        stopped = {**stop.user_attrs, attrs.SEED: seed}
        return reconnect.call(_tell_stopped, study, trial, stopped)
    except evaluation_error as exc:
        reason = str(exc)

        def tell_failure() -> None:
            if not storage_of(study).get_trial(trial_id_of(trial)).state.is_finished():
                trial.set_user_attr(attrs.FAIL_REASON, reason)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

        reconnect.call(tell_failure)
        logger.warning("trial %d failed: %s", trial.number, exc)
        return TrialState.FAIL
    return reconnect.call(lambda: _tell_result(study, trial, values, user_attrs))


def _tell_result(
    study: optuna.Study, trial: optuna.Trial, values: list[float], user_attrs: dict[str, Any]
) -> Any:
    """Record a finished evaluation; safe to repeat after a lost connection.

    If the trial was failed as stale meanwhile (its heartbeats could not reach the database, or
    the worker stalled), the evaluation is not thrown away: the retry copy that Optuna's
    ``RetryFailedTrialCallback`` queued for the same candidate is taken (atomic WAITING ->
    RUNNING) and completed with these values, so the candidate is evaluated once.
    """
    import optuna
    from optuna.trial import TrialState

    storage = storage_of(study)
    state = trial_state(storage, trial_id_of(trial))
    if state == TrialState.COMPLETE:
        return TrialState.COMPLETE  # told by an attempt whose reply was lost
    target = trial_id_of(trial)
    if state != TrialState.RUNNING:
        adopted = _adopt_retry(study, trial.number)
        if adopted is None:
            logger.warning(
                "trial %d was failed while its result was on the way; its candidate is "
                "retried by another trial",
                trial.number,
            )
            return TrialState.FAIL
        target = adopted
    try:
        with batched_trial_writes(storage):
            for key, value in user_attrs.items():
                storage.set_trial_user_attr(target, key, value)
        number = trial.number if target == trial_id_of(trial) else storage.get_trial(target).number
        study.tell(number, values, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Failed as stale by another worker since the state was read: report it as its retry.
        return _tell_result(study, trial, values, user_attrs)
    return TrialState.COMPLETE


def _tell_stopped(study: optuna.Study, trial: optuna.Trial, user_attrs: dict[str, Any]) -> Any:
    """Tell a trial that fidelity rungs stopped as PRUNED, with its partial values and cost in
    user attrs. A trial failed as stale meanwhile is left so: its retry starts from rung 0."""
    from optuna.trial import TrialState

    storage = storage_of(study)
    if trial_state(storage, trial_id_of(trial)) != TrialState.RUNNING:
        return TrialState.FAIL
    with batched_trial_writes(storage):
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial_id_of(trial), key, value)
    study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    return TrialState.PRUNED


def _complete_trials(study: optuna.Study) -> list[Finished]:
    """The study's COMPLETE trials (one read), for fidelity rungs."""
    from optuna.trial import TrialState

    from mergeopt.objectives.fidelity import finished_trials

    return finished_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _adopt_retry(study: optuna.Study, failed_number: int) -> int | None:
    """The id of the queued retry copy of trial ``failed_number``, moved to RUNNING here."""
    import optuna
    from optuna.trial import TrialState

    storage = storage_of(study)
    for queued in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        history = retry_history(queued)
        if not history or history[-1] != failed_number:
            continue
        try:
            won = storage.set_trial_state_values(trial_id_of(queued), state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            won = False
        if won:
            storage.set_trial_user_attr(trial_id_of(queued), attrs.ADOPTED_FROM, failed_number)
            logger.warning(
                "trial %d was failed while its result was on the way; reported as its retry, "
                "trial %d",
                failed_number,
                queued.number,
            )
            return trial_id_of(queued)
    return None


def _trial_seed(runner: TrialRunner, trial: optuna.Trial) -> int:
    return derive_seed(runner.spec.seed, trial.number)
