"""The batch samplers' fit lock: a fitter that died holding it does not stall the others for the
whole lock TTL — its lock is free as soon as its trial is failed as stale; and a waiting trial
whose worker died during the fit does not take its candidate down with it."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from mergeopt.samplers._state import BatchCoordinator, Candidate


def _coordinator() -> BatchCoordinator:
    return BatchCoordinator(
        prefix="test:", lock_ttl_seconds=3600.0, settle_seconds=0.0, poll_seconds=0.01
    )


def _study_with_two_trials() -> tuple[optuna.Study, optuna.trial.FrozenTrial, int]:
    study = optuna.create_study()
    holder = study.ask()
    waiter = study.ask()
    return study, study._storage.get_trial(waiter._trial_id), holder._trial_id


def test_a_live_holder_keeps_the_lock_until_it_expires() -> None:
    study, _, holder_id = _study_with_two_trials()
    coordinator = _coordinator()
    assert coordinator._try_lock(study, holder_id) is not None
    assert coordinator._try_lock(study, holder_id + 1) is None  # holder RUNNING: still held


def test_a_dead_holders_lock_is_taken_over_at_once() -> None:
    study, waiter, holder_id = _study_with_two_trials()
    coordinator = _coordinator()
    dead_token = coordinator._try_lock(study, holder_id)
    assert dead_token is not None
    # Its worker was SIGKILLed mid-fit; the heartbeat check failed its trial as stale.
    study._storage.set_trial_state_values(holder_id, state=TrialState.FAIL)
    new_token = coordinator._try_lock(study, waiter._trial_id)
    assert new_token is not None and new_token != dead_token
    assert coordinator.lock_holder(study) == new_token


def test_the_waiter_fits_instead_of_waiting_for_the_ttl() -> None:
    study, waiter, holder_id = _study_with_two_trials()
    coordinator = _coordinator()
    coordinator._try_lock(study, holder_id)
    study._storage.set_trial_state_values(holder_id, state=TrialState.FAIL)
    produced: list[int] = []

    def produce(needed: int) -> list[Candidate]:
        produced.append(needed)
        return [({"x": 0.25}, {})]

    params = coordinator.run(study, waiter, produce)
    assert params == {"x": 0.25}
    assert produced == [1]


def test_a_candidate_for_a_waiter_that_died_during_the_fit_is_queued() -> None:
    """The fitter lists the waiting trials, fits (SAASBO: seconds to minutes), then assigns
    each a candidate; a waiter failed as stale meanwhile cannot take one (assigning it
    crashed the fitter's worker, again and again in the SQLite SAASBO chaos run)."""
    study, fitter, waiter_id = _study_with_two_trials()
    coordinator = _coordinator()
    study._storage.set_trial_system_attr(waiter_id, coordinator.waiting_key, True)

    def produce(needed: int) -> list[Candidate]:
        # The waiter's worker was SIGKILLed; the heartbeat check fails its trial mid-fit.
        study._storage.set_trial_state_values(waiter_id, state=TrialState.FAIL)
        return [({"x": 0.25}, {"batch": 0}), ({"x": 0.75}, {"batch": 1})][:needed]

    assert coordinator.run(study, fitter, produce) == {"x": 0.25}
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs) for t in queued] == [
        ({"x": 0.75}, {"batch": 1})
    ]
