"""Contracts of the Optuna internals mergeopt relies on (``mergeopt/optuna_compat.py``).

One test per private name: it fails on an Optuna release that renamed, removed or changed what
mergeopt uses, before a worker meets the change. The last test keeps every other module of
``mergeopt/`` off Optuna's private API, so that this file stays the complete list.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from mergeopt import optuna_compat as compat
from mergeopt.storage import open_storage
from tests.conftest import EVERY_DATABASE, SERVER_DATABASES

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]


@pytest.fixture
def study(sqlite_url: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name="compat", storage=open_storage(sqlite_url))


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- handles


def test_study_storage_is_the_storage_the_study_writes_through(study: optuna.Study) -> None:
    storage = study._storage
    assert isinstance(storage, optuna.storages.BaseStorage)
    study.set_user_attr("k", 1)
    assert storage.get_study_user_attrs(study._study_id) == {"k": 1}
    assert compat.storage_of(study) is storage


def test_study_id_is_the_storage_id_of_the_study(study: optuna.Study) -> None:
    assert isinstance(study._study_id, int)
    assert study._study_id == study._storage.get_study_id_from_name("compat")
    assert compat.study_id_of(study) == study._study_id


def test_trial_id_of_live_and_frozen_trials(study: optuna.Study) -> None:
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    assert isinstance(trial._trial_id, int)
    assert trial._trial_id == frozen._trial_id
    assert study._storage.get_trial(trial._trial_id).number == trial.number
    assert compat.trial_id_of(trial) == compat.trial_id_of(frozen) == trial._trial_id


def test_cached_storage_keeps_the_rdb_storage_as_backend(study: optuna.Study) -> None:
    from optuna.storages import RDBStorage

    assert isinstance(study._storage._backend, RDBStorage)  # type: ignore[attr-defined]
    assert compat.rdb_backend(study._storage) is study._storage._backend  # type: ignore[attr-defined]
    assert compat.rdb_backend(optuna.storages.InMemoryStorage()) is None


def test_in_memory_storage_is_recognised(study: optuna.Study) -> None:
    assert compat.uses_in_memory_storage(optuna.create_study())
    assert not compat.uses_in_memory_storage(study)


# --------------------------------------------------------------------------- RDB internals


def test_rdb_storage_attributes(sqlite_url: str) -> None:
    """``scoped_session``, ``engine`` and ``grace_period`` are plain attributes of the storage."""
    storage = open_storage(sqlite_url, heartbeat_interval=5, grace_period=17, max_retry=1)
    assert storage.engine.name == "sqlite"
    assert callable(storage.scoped_session)
    assert storage.grace_period == 17
    assert compat.heartbeat_grace_period(storage) == 17
    assert storage.get_heartbeat_interval() == 5


def test_create_scoped_session_commits_one_transaction(study: optuna.Study) -> None:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    assert _parameters(_create_scoped_session)[:2] == ["scoped_session", "ignore_integrity_error"]
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    with _create_scoped_session(backend.scoped_session) as session:
        assert session.query(models.TrialModel).count() == 0


def test_rdb_models_have_the_columns_used(study: optuna.Study) -> None:
    from optuna.storages._rdb import models

    for model, columns in {
        models.TrialModel: ("trial_id", "study_id", "number", "state", "datetime_start"),
        models.TrialParamModel: ("trial_id", "param_name", "param_value", "distribution_json"),
        models.TrialUserAttributeModel: ("trial_id", "key", "value_json"),
        models.TrialHeartbeatModel: ("trial_id", "heartbeat"),
    }.items():
        for column in columns:
            assert hasattr(model, column), f"{model.__name__}.{column}"
    assert _parameters(models.TrialModel.find_or_raise_by_id)[:2] == ["trial_id", "session"]


def test_trial_states_are_stored_as_trial_state(study: optuna.Study) -> None:
    trial = study.ask()
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    assert compat.read_trial_state(backend, trial._trial_id) == TrialState.RUNNING
    study.tell(trial, 1.0)
    study.enqueue_trial({})
    assert compat.read_trial_state(backend, trial._trial_id) == TrialState.COMPLETE
    counts = compat.count_trial_states(backend, study._study_id)
    assert counts == {TrialState.COMPLETE: 1, TrialState.WAITING: 1}
    assert compat.count_trial_states(backend, study._study_id, below_number=1) == {
        TrialState.COMPLETE: 1
    }


def test_set_trial_attr_without_commit(study: optuna.Study) -> None:
    """Writes a user attr inside the caller's transaction, checking the trial is unfinished."""
    from optuna.storages import RDBStorage

    assert _parameters(RDBStorage._set_trial_attr_without_commit) == [
        "self",
        "session",
        "model_cls",
        "trial_id",
        "key",
        "value",
    ]
    trial = study.ask()
    backend = compat.rdb_backend(study._storage)
    assert backend is not None and compat.can_write_trial_rows(backend)
    distribution = FloatDistribution(0.0, 1.0)
    compat.write_trial_rows(
        backend, [(trial._trial_id, "x", 0.25, distribution)], [(trial._trial_id, "k", [1, 2])]
    )
    frozen = backend.get_trial(trial._trial_id)
    assert frozen.params == {"x": 0.25}
    assert frozen.distributions == {"x": distribution}
    assert frozen.user_attrs == {"k": [1, 2]}
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        compat.write_trial_rows(backend, [], [(trial._trial_id, "k", 3)])


def test_user_attrs_of_finished_trials_are_rows_found_by_trial_and_key(
    study: optuna.Study,
) -> None:
    from optuna.storages._rdb import models

    assert _parameters(models.TrialUserAttributeModel.find_by_trial_and_key)[:3] == [
        "trial",
        "key",
        "session",
    ]
    trial = study.ask()
    trial.set_user_attr("kept", 1)
    study.tell(trial, 1.0)
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    compat.write_finished_trial_user_attrs(backend, trial._trial_id, {"kept": 2, "new": [3]})
    compat.write_finished_trial_user_attrs(backend, trial._trial_id, {"new": [3]})  # again
    assert backend.get_trial(trial._trial_id).user_attrs == {"kept": 2, "new": [3]}


def test_claim_waiting_trial_is_one_conditional_update(study: optuna.Study) -> None:
    study.enqueue_trial({})
    (queued,) = study.get_trials(deepcopy=False)
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    assert compat.claim_waiting_trial(backend, queued._trial_id) is True
    assert compat.claim_waiting_trial(backend, queued._trial_id) is False  # taken already
    assert backend.get_trial(queued._trial_id).datetime_start is not None
    backend.set_trial_state_values(queued._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        compat.claim_waiting_trial(backend, queued._trial_id)


def test_finish_unfinished_trial_is_one_conditional_update_with_its_values(
    study: optuna.Study,
) -> None:
    from optuna.storages._rdb import models

    assert _parameters(models.TrialValueModel.value_to_stored_repr)[:1] == ["value"]
    for column in ("trial_id", "objective", "value", "value_type"):
        assert hasattr(models.TrialValueModel, column)
    trial = study.ask()
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    assert compat.finish_unfinished_trial(backend, trial._trial_id, TrialState.COMPLETE, [0.5])
    frozen = backend.get_trial(trial._trial_id)
    assert frozen.state == TrialState.COMPLETE and frozen.values == [0.5]
    assert frozen.datetime_complete is not None
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        compat.finish_unfinished_trial(backend, trial._trial_id, TrialState.FAIL, None)


def test_state_changes_wrapped_for_a_block_only(study: optuna.Study) -> None:
    storage = study._storage
    seen: list[TrialState] = []

    def recording(original: compat.SetTrialState) -> compat.SetTrialState:
        def set_and_record(trial_id: int, state: TrialState, values: object = None) -> bool:
            seen.append(state)
            return original(trial_id, state, values)

        return set_and_record

    trial = study.ask()
    with compat.trial_state_changes_wrapped(storage, recording):
        study.tell(trial, 1.0)  # study.tell ends the trial through the study's storage
    assert seen == [TrialState.COMPLETE]
    assert "set_trial_state_values" not in vars(storage)  # the class's method again
    study.tell(study.ask(), 2.0)
    assert seen == [TrialState.COMPLETE]


def test_heartbeat_rows_are_per_trial(sqlite_url: str) -> None:
    storage = open_storage(sqlite_url, heartbeat_interval=60, grace_period=120, max_retry=1)
    study = optuna.create_study(study_name="beats", storage=storage)
    beaten, silent = study.ask(), study.ask()
    storage.record_heartbeat(beaten._trial_id)
    ids = [beaten._trial_id, silent._trial_id]
    assert compat.trials_with_heartbeat(storage, ids) == {beaten._trial_id}


# --------------------------------------------------------------------------- storage hooks


def test_rdb_trial_creation_goes_through_create_new_trial(study: optuna.Study) -> None:
    from optuna.storages import RDBStorage

    assert _parameters(RDBStorage._create_new_trial) == ["self", "study_id", "template_trial"]
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    created: list[int] = []

    def recording(create: compat.CreateTrial) -> compat.CreateTrial:
        def create_and_record(study_id: int, template_trial: object = None) -> object:
            frozen = create(study_id, template_trial)
            created.append(frozen.number)
            return frozen

        return create_and_record  # type: ignore[return-value]

    compat.wrap_trial_creation(backend, recording)
    study.ask()  # through Optuna's cache
    study.enqueue_trial({})  # a template trial
    backend.create_new_trial(study._study_id)  # the storage's public method
    assert created == [0, 1, 2]


def test_state_changes_go_through_the_storage_object(study: optuna.Study) -> None:
    backend = compat.rdb_backend(study._storage)
    assert backend is not None
    seen: list[TrialState] = []

    def recording(original: compat.SetTrialState) -> compat.SetTrialState:
        def set_and_record(trial_id: int, state: TrialState, values: object = None) -> bool:
            seen.append(state)
            return original(trial_id, state, values)

        return set_and_record

    compat.wrap_trial_state_changes(backend, recording)
    study.enqueue_trial({})
    trial = study.ask()  # pops the queued trial: WAITING -> RUNNING
    study.tell(trial, 1.0)
    assert seen == [TrialState.RUNNING, TrialState.COMPLETE]


def test_ask_and_set_user_attr_write_through_the_study_storage(study: optuna.Study) -> None:
    params: list[tuple[int, str, float, object]] = []
    user_attrs: list[tuple[int, str, object]] = []
    with compat.redirect_trial_writes(
        study._storage,
        set_trial_param=lambda *args: params.append(args),
        set_trial_user_attr=lambda *args: user_attrs.append(args),
    ):
        trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
        trial.set_user_attr("k", 1)
    assert [(p[0], p[1]) for p in params] == [(trial._trial_id, "x")]
    assert user_attrs == [(trial._trial_id, "k", 1)]
    assert study._storage.get_trial(trial._trial_id).params == {}  # nothing reached the storage
    trial.set_user_attr("after", 2)  # the storage's own method again
    assert study._storage.get_trial(trial._trial_id).user_attrs == {"after": 2}


# --------------------------------------------------------------------------- Optuna's own attrs


def test_enqueue_trial_keeps_its_params_in_fixed_params(study: optuna.Study) -> None:
    study.enqueue_trial({"x": 0.5})
    study.ask()
    (queued,) = study.get_trials(deepcopy=False)
    assert queued.system_attrs[compat.FIXED_PARAMS_ATTR] == {"x": 0.5}
    assert compat.fixed_params(queued) == {"x": 0.5}
    assert compat.is_enqueued(queued)
    study.ask()
    sampled = study.get_trials(deepcopy=False)[1]
    assert compat.fixed_params(sampled) is None and not compat.is_enqueued(sampled)


def test_retry_history_names_the_failed_trial(sqlite_url: str) -> None:
    import time

    storage = open_storage(sqlite_url, heartbeat_interval=1, grace_period=1, max_retry=2)
    study = optuna.create_study(study_name="retry", storage=storage)
    study.enqueue_trial({"x": 0.5})
    stale = study.ask()
    storage.record_heartbeat(stale._trial_id)
    time.sleep(2.5)  # the heartbeat row's time has one-second resolution on SQLite
    optuna.storages.fail_stale_trials(study)
    retry = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[0]
    assert retry.system_attrs[compat.RETRY_HISTORY_ATTR] == [stale.number]
    assert compat.retry_history(retry) == [stale.number]
    public = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    assert (public or optuna.storages.RetryFailedTrialCallback).retry_history(retry) == [
        stale.number
    ]


def test_artifact_metadata_is_a_study_system_attr(study: optuna.Study, tmp_path: Path) -> None:
    import json
    import warnings

    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    (tmp_path / "store").mkdir()
    file = tmp_path / "plot.png"
    file.write_bytes(b"png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        artifact_id = upload_artifact(
            artifact_store=FileSystemArtifactStore(str(tmp_path / "store")),
            file_path=str(file),
            study_or_trial=study,
        )
    attrs = compat.study_artifact_attrs(study)
    assert list(attrs) == [compat.ARTIFACTS_ATTR_PREFIX + artifact_id]
    meta = json.loads(attrs[compat.ARTIFACTS_ATTR_PREFIX + artifact_id])
    assert meta["artifact_id"] == artifact_id and meta["filename"] == "plot.png"


def test_study_system_attrs_round_trip(study: optuna.Study) -> None:
    compat.set_study_system_attr(study, "mergeopt:x", {"a": [1]})
    assert compat.study_system_attrs(study)["mergeopt:x"] == {"a": [1]}


def test_a_study_system_attr_is_claimed_once(study: optuna.Study) -> None:
    # The system-attribute table's unique (study, key) constraint refuses a second writer,
    # where set_study_system_attr would overwrite the first one's value.
    assert compat.claim_study_system_attr(study, "mergeopt:run:0", {"pid": 1})
    assert not compat.claim_study_system_attr(study, "mergeopt:run:0", {"pid": 2})
    assert compat.study_system_attrs(study)["mergeopt:run:0"] == {"pid": 1}
    other = optuna.create_study(study_name="other", storage=compat.storage_of(study))
    assert compat.claim_study_system_attr(other, "mergeopt:run:0", {"pid": 3})


@pytest.mark.parametrize(
    "backend",
    EVERY_DATABASE,
)
def test_study_runs_starting_at_once_claim_distinct_run_numbers(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # Each `study run` has its own connections; all count the same claimed numbers first, so
    # all but one lose their first INSERT to the unique key and move on.
    from concurrent.futures import ThreadPoolExecutor

    from mergeopt.workers import claim_run_number

    url = request.getfixturevalue(backend)
    name = f"runs-{request.node.callspec.id}"
    optuna.create_study(study_name=name, storage=open_storage(url))

    def claim(_: int) -> int:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        return claim_run_number(study, ["cpu"])

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(claim, range(4))) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "backend",
    SERVER_DATABASES,
)
def test_a_claim_on_a_deleted_study_is_an_error_not_a_lost_race(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # The study's row is gone (`study delete` meanwhile): the insert breaks the foreign key,
    # not the unique key. Answering False would send claim_run_number to the next number, for
    # ever.
    storage = open_storage(request.getfixturevalue(backend))
    name = f"deleted-{request.node.callspec.id}"
    study = optuna.create_study(study_name=name, storage=storage)
    assert compat.claim_study_system_attr(study, "mergeopt:run:0", {"pid": 1})
    optuna.delete_study(study_name=name, storage=storage)
    with pytest.raises(KeyError, match=name):
        compat.claim_study_system_attr(study, "mergeopt:run:1", {"pid": 1})


# --------------------------------------------------------------------------- the guard

_PRIVATE = re.compile(
    r"""(?x)
      (?<!self)\._(storage|study_id|trial_id|backend|create_new_trial
                   |set_trial_attr_without_commit|cached_frozen_trial)\b
    | \boptuna\.[a-z_.]*\._[a-z]\w*
    | \b_create_scoped_session\b
    | ["'](fixed_params|retry_history|_backend|artifacts:)["']
    """
)


def test_no_private_optuna_use_outside_the_compat_module() -> None:
    """Every other module of ``mergeopt/`` reaches Optuna's internals through
    ``optuna_compat`` (``self._storage`` of mergeopt's own classes is not Optuna's)."""
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "mergeopt").rglob("*.py"))
        if path.name != "optuna_compat.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _PRIVATE.search(line)
    ]
    assert found == []


def test_the_tpe_internals_mergeopts_tpe_reproduces_are_there() -> None:
    """What ``samplers/tpe.py`` and ``tpe_batch.py`` read of Optuna's TPE (the values are
    pinned against Optuna's own sampler in ``tests/test_samplers_tpe.py``)."""
    import numpy as np

    from mergeopt.optuna_compat import (
        parzen_mixture,
        tpe_default_gamma,
        tpe_standard_parzen_estimator,
        tpe_truncnorm,
    )

    sampler = optuna.samplers.TPESampler(seed=0)
    for name in ("_rng", "_n_ei_candidates", "_constant_liar", "_gamma", "_parzen_estimator_cls"):
        assert hasattr(sampler, name), name
    for name in ("_sample", "_get_params", "_build_parzen_estimator"):
        assert callable(getattr(sampler, name)), name
    assert sampler._parzen_estimator_cls is tpe_standard_parzen_estimator()
    assert tpe_default_gamma(False)(100) == 10 and tpe_default_gamma(True)(100) > 0
    truncnorm = tpe_truncnorm()
    for name in ("logpdf", "ppf", "_log_gauss_mass", "_log_ndtr", "_log_sum"):
        assert callable(getattr(truncnorm, name)), name
    assert isinstance(truncnorm._norm_pdf_logC, float)
    assert isinstance(truncnorm._ndtri_exp_approx_C, float)
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    estimator = tpe_standard_parzen_estimator()(
        {"x": np.array([0.2, 0.6])}, space, sampler._parzen_estimator_parameters
    )
    mixture = parzen_mixture(estimator)
    assert mixture.weights.shape == (3,)  # two observations and the prior
    (distribution,) = mixture.distributions
    assert distribution.mu.shape == distribution.sigma.shape == (3,)
    assert (distribution.adapted_low, distribution.adapted_high, distribution.is_log) == (
        0.0,
        1.0,
        False,
    )


def test_tpe_reads_trials_through_study_get_trials_which_study_read_once_serves(
    study: optuna.Study,
) -> None:
    import inspect

    from mergeopt.optuna_compat import StudyReadOnce

    # TPE's per-parameter read: what mergeopt.samplers.tpe answers from one snapshot.
    assert "study._get_trials(" in inspect.getsource(optuna.samplers.TPESampler._sample)
    for value in (0.3, 0.7):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, value)
    cache: dict = {}
    read_once = StudyReadOnce(study, cache)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    first = read_once._get_trials(deepcopy=False, states=states, use_cache=False)
    assert [t.number for t in first] == [
        t.number for t in study._get_trials(deepcopy=False, states=states)
    ]
    study.enqueue_trial({"x": 0.5})
    study.tell(study.ask(), 0.5)  # finished after the snapshot: seen from the next trial on
    assert read_once._get_trials(deepcopy=False, states=states) is first
    assert read_once.directions == study.directions  # everything else is the study's
