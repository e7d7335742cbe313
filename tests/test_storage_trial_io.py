"""The worker loop's cheap trial I/O: batched parameter/attr writes and COUNT-based trial counts
agree with what Optuna's own per-call path stores, on every backend."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from mergeopt.storage import open_storage
from mergeopt.trial_io import batched_trial_writes, count_trials, trial_state
from tests.conftest import EVERY_DATABASE

DISTRIBUTIONS = {f"b{block:02d}.e0.weight": FloatDistribution(0.0, 1.0) for block in range(12)}


def _study(url: str, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=name, storage=open_storage(url), directions=["maximize", "minimize"]
    )


def _exercise(study: optuna.Study) -> None:
    """Trials in every state, asked inside the batch as the worker asks them."""
    for index in range(6):
        with batched_trial_writes(study._storage):
            trial = study.ask(DISTRIBUTIONS)
            trial.set_user_attr("mergeopt:worker", f"w{index}")
        if index < 3:
            with batched_trial_writes(study._storage):
                trial.set_user_attr("mergeopt:metrics", {"accuracy": index / 10})
            study.tell(trial, [index / 10, 1.0])
        elif index == 3:
            study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial({name: 0.5 for name in DISTRIBUTIONS})


@pytest.fixture(params=EVERY_DATABASE)
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(request.param)


def test_batched_writes_store_what_optuna_would(url: str) -> None:
    study = _study(url, "batched")
    _exercise(study)
    reread = optuna.load_study(study_name="batched", storage=open_storage(url))
    trials = reread.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.RUNNING,
        TrialState.WAITING,
    ]
    for index, trial in enumerate(trials[:6]):
        assert set(trial.params) == set(DISTRIBUTIONS)
        assert trial.distributions == DISTRIBUTIONS
        assert trial.user_attrs["mergeopt:worker"] == f"w{index}"
    assert trials[2].user_attrs["mergeopt:metrics"] == {"accuracy": 0.2}
    assert trials[2].values == [0.2, 1.0]


def test_counts_match_a_full_read(url: str) -> None:
    study = _study(url, "counted")
    _exercise(study)
    full = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        full[trial.state.name] += 1
    assert count_trials(study) == full
    assert count_trials(study, below_number=3) == {**dict.fromkeys(full, 0), "COMPLETE": 3}
    trials = study.get_trials(deepcopy=False)
    assert [trial_state(study._storage, t._trial_id) for t in trials] == [t.state for t in trials]


def test_a_failing_batch_writes_nothing(sqlite_url: str) -> None:
    study = _study(sqlite_url, "aborted")
    with pytest.raises(RuntimeError), batched_trial_writes(study._storage):
        trial = study.ask(DISTRIBUTIONS)
        trial.set_user_attr("mergeopt:worker", "w")
        raise RuntimeError("the worker died between ask and the commit")
    (stored,) = optuna.load_study(study_name="aborted", storage=sqlite_url).get_trials()
    assert stored.state == TrialState.RUNNING  # failed later as stale, like any orphan
    assert stored.params == {} and stored.user_attrs == {}
    # The storage's own methods are back: a later write goes straight in.
    study._storage.set_trial_user_attr(stored._trial_id, "later", 1)
    assert study._storage.get_trial(stored._trial_id).user_attrs == {"later": 1}


def test_a_trial_ended_inside_the_batch_gets_its_writes_first(sqlite_url: str) -> None:
    """A batch sampler, inside a worker's ask, takes over a queued candidate and closes its
    trial: the closed trial's reason is written before it ends (written after, it crashed the
    worker in the SQLite SAASBO chaos run: a finished trial takes no more attrs)."""
    study = _study(sqlite_url, "taken-over")
    other_worker = optuna.load_study(study_name="taken-over", storage=open_storage(sqlite_url))
    storage = study._storage
    with batched_trial_writes(storage):
        asked = study.ask(DISTRIBUTIONS)
        other_worker.enqueue_trial({name: 0.5 for name in DISTRIBUTIONS})
        (queued,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        assert storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING)
        storage.set_trial_user_attr(queued._trial_id, "mergeopt:fail_reason", "taken over")
        storage.set_trial_state_values(queued._trial_id, state=TrialState.FAIL)
        asked.set_user_attr("mergeopt:worker", "w")
    own, taken = optuna.load_study(study_name="taken-over", storage=sqlite_url).get_trials()
    assert (own.state, own.user_attrs) == (TrialState.RUNNING, {"mergeopt:worker": "w"})
    assert set(own.params) == set(DISTRIBUTIONS)
    assert (taken.state, taken.user_attrs) == (
        TrialState.FAIL,
        {"mergeopt:fail_reason": "taken over"},
    )
