"""Every use of Optuna's private API in mergeopt, behind small named functions.

mergeopt needs a few things Optuna does not offer publicly: a study's storage and ids (workers
share one study through its storage, and samplers keep their state in study system attrs),
the RDB storage's tables (atomic hand-out of queued trials, one-transaction trial writes, a
``COUNT`` instead of reading every trial), and hooks on trial creation (heartbeats from the
moment a trial row exists). Each such name is used here only, and
``tests/test_optuna_compat.py`` holds a contract test per name that fails on an Optuna release
that renamed or changed it; ``tests/test_optuna_compat.py::test_no_private_optuna_use_outside``
keeps the rest of ``mergeopt/`` off them. ``pyproject.toml`` bounds Optuna below its next
major version.

Names relied on (Optuna 4.8 to 5.x):

- ``Study._storage``, ``Study._study_id``, ``Trial._trial_id``, ``FrozenTrial._trial_id``;
- ``_backend`` of the cache a study keeps around its storage (the ``RDBStorage`` inside);
- ``RDBStorage._create_new_trial`` (both ``create_new_trial`` paths call it) and
  ``RDBStorage._set_trial_attr_without_commit``;
- ``optuna.storages._rdb.storage._create_scoped_session`` and ``optuna.storages._rdb.models``
  (``TrialModel``, ``TrialParamModel``, ``TrialUserAttributeModel``, ``TrialValueModel``,
  ``TrialHeartbeatModel``);
- the undocumented ``RDBStorage`` attributes ``scoped_session``, ``engine`` and
  ``grace_period``;
- the system attrs Optuna writes itself: ``fixed_params`` (``study.enqueue_trial``),
  ``retry_history`` (the heartbeat's retry callback) and ``artifacts:<id>``
  (``optuna.artifacts.upload_artifact``);
- ``Study._get_trials`` (how Optuna's samplers read a study's trials, TPE once per
  parameter): ``StudyReadOnce`` answers it from one read;
- storage methods replaced on one storage object (``set_trial_param``,
  ``set_trial_user_attr``, ``set_trial_state_values``): Optuna's study and trial call them
  through that object.
- TPE's internals, which mergeopt's ``tpe`` (``samplers/tpe.py``, ``samplers/tpe_batch.py``)
  reproduces value for value for many parameters at once: ``TPESampler._sample`` (overridden),
  its attributes ``_rng``, ``_n_ei_candidates``, ``_constant_liar``, ``_gamma``,
  ``_parzen_estimator_cls`` and methods ``_get_params``, ``_build_parzen_estimator``;
  ``optuna.samplers._tpe.sampler._split_trials`` and its default gammas; the estimator's
  ``_mixture_distribution``; ``optuna.samplers._tpe._truncnorm`` (``logpdf``,
  ``_log_gauss_mass``, ``_log_ndtr``, ``_log_sum``, ``_norm_pdf_logC``,
  ``_ndtri_exp_approx_C``). ``tests/test_samplers_tpe.py`` compares proposals with Optuna's.

Nothing here imports Optuna at module level (the command line imports this module early).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.trial import FrozenTrial, TrialState
    from sqlalchemy.engine import CursorResult
    from sqlalchemy.orm import Session

FIXED_PARAMS_ATTR = "fixed_params"
"""Trial system attr: the parameters of a trial made by ``study.enqueue_trial``."""

RETRY_HISTORY_ATTR = "retry_history"
"""Trial system attr: the failed trials a retry copy (heartbeat callback) stands for."""

ARTIFACTS_ATTR_PREFIX = "artifacts:"
"""Study/trial system attr prefix under which ``optuna.artifacts`` keeps artifact metadata."""


# --------------------------------------------------------------------------- handles


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (Optuna's cache around an RDB storage)."""
    return study._storage


def study_id_of(study: optuna.Study) -> int:
    """The study's id in its storage (what storage methods take)."""
    return study._study_id


def trial_id_of(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (what storage methods take; not ``trial.number``)."""
    return trial._trial_id


def rdb_backend(storage: Any) -> RDBStorage | None:
    """The ``RDBStorage`` behind ``storage`` (a study holds it inside Optuna's in-memory cache
    of finished trials), or None for other storages."""
    from optuna.storages import RDBStorage

    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def uses_in_memory_storage(study: optuna.Study) -> bool:
    """The study lives in one process's memory (no other worker can share it)."""
    from optuna.storages import InMemoryStorage

    return isinstance(study._storage, InMemoryStorage)


# --------------------------------------------------------------------------- attributes


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attrs, read from the storage (``Study.system_attrs`` is gone)."""
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def fixed_params(trial: FrozenTrial) -> dict[str, Any] | None:
    """The parameters ``study.enqueue_trial`` gave the trial; None for a sampled trial."""
    return trial.system_attrs.get(FIXED_PARAMS_ATTR)


def is_enqueued(trial: FrozenTrial) -> bool:
    """The trial was made by ``study.enqueue_trial`` (written when the trial is created)."""
    return FIXED_PARAMS_ATTR in trial.system_attrs


def retry_history(trial: FrozenTrial) -> list[int]:
    """Numbers of the failed trials this one retries, oldest first (what Optuna's experimental
    ``RetryHeartbeatStaleTrialCallback.retry_history`` returns, read without its warning)."""
    return list(trial.system_attrs.get(RETRY_HISTORY_ATTR) or [])


def study_artifact_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's artifact metadata attrs (``artifacts:<id>`` -> JSON text, or a value
    mergeopt or optuna-dashboard replaced with ``null`` when it removed the artifact)."""
    return {
        key: value
        for key, value in study_system_attrs(study).items()
        if key.startswith(ARTIFACTS_ATTR_PREFIX)
    }


# --------------------------------------------------------------------------- storage hooks

CreateTrial = Callable[[int, "FrozenTrial | None"], "FrozenTrial"]
SetTrialState = Callable[..., bool]


def wrap_trial_creation(storage: RDBStorage, wrap: Callable[[CreateTrial], CreateTrial]) -> None:
    """Replace the storage's trial creation by ``wrap(original)``.

    ``original(study_id, template_trial)`` returns the new trial as a ``FrozenTrial``. Both
    ``RDBStorage.create_new_trial`` and Optuna's cache around it create trials through the
    private ``_create_new_trial``; that is the one that is wrapped.
    """
    # Replaced on this one storage object; callers always pass template_trial.
    storage._create_new_trial = wrap(  # type: ignore[method-assign,assignment]
        storage._create_new_trial
    )


def wrap_trial_state_changes(
    storage: RDBStorage, wrap: Callable[[SetTrialState], SetTrialState]
) -> None:
    """Replace ``storage.set_trial_state_values`` (on this storage object only) by
    ``wrap(original)``; Optuna's cache and ``study.ask``/``tell`` call it through the object."""
    storage.set_trial_state_values = wrap(  # type: ignore[method-assign]
        storage.set_trial_state_values
    )


@contextlib.contextmanager
def trial_state_changes_wrapped(
    storage: Any, wrap: Callable[[SetTrialState], SetTrialState]
) -> Iterator[None]:
    """Inside the block, ``storage.set_trial_state_values`` (on this storage object: a study's
    storage, through which ``study.tell`` and Optuna's cache end trials) is
    ``wrap(original)``; afterwards it is what it was (a wrapper set on the object before, such
    as ``wrap_trial_state_changes``', stays)."""
    original = storage.set_trial_state_values
    own = "set_trial_state_values" in vars(storage)
    storage.set_trial_state_values = wrap(original)
    try:
        yield
    finally:
        if own:
            storage.set_trial_state_values = original
        else:
            del storage.set_trial_state_values


@contextlib.contextmanager
def redirect_trial_writes(
    storage: Any,
    set_trial_param: Callable[[int, str, float, Any], None],
    set_trial_user_attr: Callable[[int, str, Any], None],
) -> Iterator[None]:
    """Inside the block, the parameters and user attrs written through ``storage`` (a study's
    storage: ``study.ask`` and ``trial.set_user_attr`` write through it) go to the given
    functions instead; the storage's own methods are back afterwards."""
    storage.set_trial_param = set_trial_param
    storage.set_trial_user_attr = set_trial_user_attr
    try:
        yield
    finally:
        del storage.set_trial_param, storage.set_trial_user_attr  # the class's methods again


class StudyReadOnce:
    """A study that reads its trials once: the first ``_get_trials`` / ``get_trials`` reads
    every trial of the study, and it and later ones get that snapshot, filtered by state (the
    ``cache`` dict, which the caller keeps for as long as the snapshot is to be served; one
    read for all sets of states, so they also agree with each other). Everything else is the
    study's.

    For a sampler that reads the study per parameter inside one ``study.ask`` (Optuna's TPE with
    ``constant_liar``, its default since 5.0, re-reads every trial from the storage each time);
    trials changed meanwhile by other workers are seen from the next ask, as Optuna's own
    per-ask cache does without ``constant_liar``."""

    def __init__(self, study: optuna.Study, cache: dict[Any, list[FrozenTrial]]) -> None:
        self._study = study
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Iterable[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        chosen = None if states is None else tuple(states)
        key = None if chosen is None else tuple(sorted({state.value for state in chosen}))
        if None not in self._cache:
            self._cache[None] = self._study._get_trials(deepcopy=False)
        if key not in self._cache:
            wanted = {state.value for state in chosen or ()}
            self._cache[key] = [t for t in self._cache[None] if t.state.value in wanted]
        trials = self._cache[key]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(
        self, deepcopy: bool = True, states: Iterable[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


# --------------------------------------------------------------------------- RDB tables


@contextlib.contextmanager
def _session(backend: RDBStorage, *, ignore_integrity_error: bool = False) -> Iterator[Session]:
    """One transaction of ``backend``, committed when the block ends, as Optuna opens them
    (with ``ignore_integrity_error``, a commit that breaks a unique key is rolled back
    quietly: another process wrote the same row first)."""
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, ignore_integrity_error) as session:
        yield session


def _state_of(trial_row: Any) -> TrialState:
    """A trial row's state (Optuna's models type their attributes as SQLAlchemy columns)."""
    return cast("TrialState", trial_row.state)


def _update_if_state_in(
    backend: RDBStorage,
    session: Session,
    trial_id: int,
    states: tuple[TrialState, ...],
    values: dict[str, Any],
) -> bool:
    """One conditional ``UPDATE ... WHERE state IN (states)`` of a trial row (atomic on every
    backend, SQLite included); True when it changed the row. Otherwise Optuna's
    ``UpdateFinishedTrialError`` if the trial is finished, else False (another process moved
    it to a state outside ``states``)."""
    from optuna.storages._rdb import models
    from sqlalchemy import update

    # Session.execute is typed as returning a Result; an UPDATE's is a CursorResult.
    result = cast(
        "CursorResult[Any]",
        session.execute(
            update(models.TrialModel)
            .where(models.TrialModel.trial_id == trial_id, models.TrialModel.state.in_(states))
            .values(**values)
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount == 1:
        return True
    trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
    backend.check_trial_is_updatable(trial_id, _state_of(trial))
    return False


def claim_waiting_trial(backend: RDBStorage, trial_id: int) -> bool:
    """Move a WAITING trial to RUNNING with one conditional ``UPDATE ... WHERE state =
    WAITING`` (atomic on every backend, SQLite included); True when this call moved it.

    False when another worker took it; a finished trial raises Optuna's
    ``UpdateFinishedTrialError`` as ``set_trial_state_values`` would.
    """
    from datetime import datetime

    from optuna.trial import TrialState

    with _session(backend) as session:
        return _update_if_state_in(
            backend,
            session,
            trial_id,
            (TrialState.WAITING,),
            {"state": TrialState.RUNNING, "datetime_start": datetime.now()},
        )


def finish_unfinished_trial(
    backend: RDBStorage, trial_id: int, state: TrialState, values: Any
) -> bool:
    """End a WAITING or RUNNING trial with one conditional ``UPDATE ... WHERE state IN
    (WAITING, RUNNING)``, its values written in the same transaction; Optuna's
    ``UpdateFinishedTrialError`` when another process ended it first.

    The ``UPDATE`` comes first: it takes the row's (on SQLite the database's) write lock, so
    the values belong to the winner alone. SQLAlchemy's ``IntegrityError`` when the values
    are stored already.
    """
    from datetime import datetime

    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    with _session(backend) as session:
        unfinished = (TrialState.WAITING, TrialState.RUNNING)
        ended = {"state": state, "datetime_complete": datetime.now()}
        if not _update_if_state_in(backend, session, trial_id, unfinished, ended):
            return False  # not reached: a trial that is not unfinished is finished
        for objective, value in enumerate(values or ()):
            stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
            session.add(
                models.TrialValueModel(
                    trial_id=trial_id, objective=objective, value=stored, value_type=value_type
                )
            )
    return True


def claim_study_system_attr(study: optuna.Study, key: str, value: Any) -> bool:
    """Write a study system attr only if no process wrote ``key`` first: one ``INSERT`` that
    the table's unique (study, key) constraint refuses to a second writer, on every backend.
    True when this call wrote it. (``set_study_system_attr`` overwrites instead.) A study
    deleted meanwhile is a ``KeyError``, as Optuna's storage calls raise: PostgreSQL and MySQL
    refuse the row by its foreign key, which is no second writer."""
    import json

    from optuna.storages._rdb import models
    from sqlalchemy.exc import IntegrityError

    backend = rdb_backend(study._storage)
    if backend is None:
        raise TypeError("claim_study_system_attr needs an RDB storage")
    try:
        with _session(backend) as session:
            session.add(
                models.StudySystemAttributeModel(
                    study_id=study._study_id, key=key, value_json=json.dumps(value)
                )
            )
    except IntegrityError:
        with _session(backend) as session:
            if session.get(models.StudyModel, study._study_id) is None:
                raise KeyError(f"study {study.study_name!r} no longer exists") from None
        return False
    return True


def heartbeat_grace_period(backend: RDBStorage) -> float | None:
    """The storage's heartbeat grace period in seconds as configured (None: Optuna's
    default of twice the interval)."""
    return backend.grace_period


def trials_with_heartbeat(backend: RDBStorage, trial_ids: Iterable[int]) -> set[int]:
    """Those of ``trial_ids`` that have a heartbeat row (ever beat)."""
    from optuna.storages._rdb import models

    ids = list(trial_ids)
    with _session(backend) as session:
        return {
            int(row[0])
            for row in session.query(models.TrialHeartbeatModel.trial_id)
            .filter(models.TrialHeartbeatModel.trial_id.in_(ids))
            .all()
        }


def count_trial_states(
    backend: RDBStorage, study_id: int, *, below_number: int | None = None
) -> dict[TrialState, int]:
    """Trials of one study per state (only those numbered below ``below_number`` if given):
    one ``SELECT state, COUNT(*) ... GROUP BY state``."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    query = (
        sqlalchemy.select(models.TrialModel.state, sqlalchemy.func.count())
        .where(models.TrialModel.study_id == study_id)
        .group_by(models.TrialModel.state)
    )
    if below_number is not None:
        query = query.where(models.TrialModel.number < below_number)
    counts: dict[TrialState, int] = {}
    with backend.engine.connect() as connection:
        for state, count in connection.execute(query):
            key = TrialState(state) if isinstance(state, int) else state
            counts[key] = counts.get(key, 0) + count
    return counts


def read_trial_state(backend: RDBStorage, trial_id: int) -> TrialState:
    """One trial's state, read alone (``get_trial`` also loads its params and attrs)."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    query = sqlalchemy.select(models.TrialModel.state).where(models.TrialModel.trial_id == trial_id)
    with backend.engine.connect() as connection:
        state = connection.execute(query).scalar_one()
    return TrialState(state) if isinstance(state, int) else state


def can_write_trial_rows(backend: RDBStorage) -> bool:
    """The RDB storage has what :func:`write_trial_rows` needs."""
    return all(
        hasattr(backend, name)
        for name in ("_set_trial_attr_without_commit", "check_trial_is_updatable")
    )


def write_trial_rows(
    backend: RDBStorage,
    params: list[tuple[int, str, float, Any]],
    user_attrs: list[tuple[int, str, Any]],
) -> None:
    """Write trial parameters ``(trial_id, name, value, distribution)`` and user attrs
    ``(trial_id, key, value)`` in one transaction.

    Optuna's per-parameter path re-reads the trial and an earlier trial's distribution for
    every parameter; here each trial is checked once (it must be unfinished), and the
    distributions are trusted to be the study's.
    """
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    with _session(backend) as session:
        for trial_id in {trial_id for trial_id, *_ in params}:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            backend.check_trial_is_updatable(trial_id, _state_of(trial))
        session.add_all(
            models.TrialParamModel(
                trial_id=trial_id,
                param_name=name,
                param_value=value,
                distribution_json=distribution_to_json(distribution),
            )
            for trial_id, name, value, distribution in params
        )
        for trial_id, key, value in user_attrs:
            backend._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial_id, key, value
            )


def write_finished_trial_user_attrs(
    backend: RDBStorage, trial_id: int, values: dict[str, Any]
) -> None:
    """Insert or overwrite user attrs of a trial, finished or not, in one transaction
    (Optuna's own ``set_trial_user_attr`` refuses finished trials)."""
    import json

    from optuna.storages._rdb import models

    with _session(backend, ignore_integrity_error=True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        for key, value in values.items():
            row = models.TrialUserAttributeModel.find_by_trial_and_key(trial, key, session)
            if row is None:
                session.add(
                    models.TrialUserAttributeModel(
                        trial_id=trial_id, key=key, value_json=json.dumps(value)
                    )
                )
            else:
                row.value_json = json.dumps(value)


def clock_unbeaten_trials(study: optuna.Study) -> list[int]:
    """Start the heartbeat clock of RUNNING trials that never beat; return their ids.

    Optuna's ``study.optimize`` starts a trial's heartbeat thread only after ``study.ask``
    returned, and ``fail_stale_trials`` ignores trials without a heartbeat. A worker killed in
    that gap (a few milliseconds, but right after a trial finishes, which is when a generation
    completes) leaves a trial RUNNING forever, and a batch sampler waiting for it waits
    forever. A trial whose start lies more than the grace period back and that has no
    heartbeat row gets one beat here, so it is failed as stale one grace period later unless
    its worker beats it. (``mergeopt study run`` beats trials from creation and never leaves
    such a gap; this covers plain Optuna code using the samplers.) Only for RDB storages with
    heartbeats on: ask-and-tell code must not enable them, as Optuna itself warns.
    """
    import datetime

    from optuna.trial import TrialState

    backend = rdb_backend(storage_of(study))
    interval = None if backend is None else backend.get_heartbeat_interval()
    if backend is None or interval is None:
        return []
    grace = heartbeat_grace_period(backend) or 2 * interval
    started_before = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    old = [
        trial_id_of(t)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and t.datetime_start < started_before
    ]
    if not old:
        return []
    beaten = trials_with_heartbeat(backend, old)
    unbeaten = [trial_id for trial_id in old if trial_id not in beaten]
    for trial_id in unbeaten:
        backend.record_heartbeat(trial_id)
    return unbeaten


# --------------------------------------------------------------------------- TPE internals


def tpe_truncnorm() -> ModuleType:
    """``optuna.samplers._tpe._truncnorm``: the truncated-normal arithmetic of Optuna's TPE."""
    from optuna.samplers._tpe import _truncnorm

    return _truncnorm


def tpe_split_trials(
    study: optuna.Study, trials: list[FrozenTrial], n_below: int
) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """TPE's split of ``trials`` into the ``n_below`` best ("below") and the rest."""
    from optuna.samplers._tpe.sampler import _split_trials

    return _split_trials(study, trials, n_below)


def tpe_default_gamma(multi_objective: bool) -> Callable[[int], int]:
    """The size of TPE's "below" group that ``TPESampler`` uses when given no ``gamma``."""
    from optuna.samplers._tpe import sampler

    return sampler.default_gamma_multiobjective if multi_objective else sampler.default_gamma


def tpe_standard_parzen_estimator() -> type:
    """Optuna's own Parzen estimator class (``TPESampler._parzen_estimator_cls`` by default)."""
    from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator

    return _ParzenEstimator


def parzen_mixture(estimator: Any) -> Any:
    """A Parzen estimator's mixture: ``weights`` (K,) and one batched distribution per
    parameter (``mu``, ``sigma`` (K,), ``adapted_low``, ``adapted_high``, ``is_log``)."""
    return estimator._mixture_distribution
