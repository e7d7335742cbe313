"""Study storage: which database URL wins, how each backend is opened, and masked URLs.

Precedence: ``--storage`` > ``MERGEOPT_STORAGE`` > the spec's ``storage:`` > ``sqlite:///mergeopt.db``.
SQLite is the single-machine default (WAL journal, long busy timeout, so that several local
workers can share it); PostgreSQL and MySQL/MariaDB URLs are used as given, with the pure
Python drivers of the ``db`` extra filled in when the URL names no driver.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.optuna_compat import (
    CreateTrial,
    SetTrialState,
    can_write_trial_rows,
    claim_waiting_trial,
    count_trial_states,
    finish_unfinished_trial,
    rdb_backend,
    read_trial_state,
    redirect_trial_writes,
    storage_of,
    study_id_of,
    trial_id_of,
    trial_state_changes_wrapped,
    wrap_trial_creation,
    wrap_trial_state_changes,
    write_finished_trial_user_attrs,
    write_trial_rows,
)
from mergeopt.optuna_compat import (  # re-exported for the worker loop
    clock_unbeaten_trials as clock_unbeaten_trials,
)

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage

DEFAULT_STORAGE = "sqlite:///mergeopt.db"
STORAGE_ENV = "MERGEOPT_STORAGE"
SQLITE_BUSY_TIMEOUT_S = 120
CONNECT_TIMEOUT_S = 10


def resolve_storage_url(cli_url: str | None, spec_url: str | None = None) -> str:
    """The storage URL by precedence: CLI flag, environment, spec, default."""
    return cli_url or os.environ.get(STORAGE_ENV) or spec_url or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, errors and stored attrs)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Unparseable: hide anything between "://user:" and "@".
        head, sep, tail = url.partition("://")
        if sep and "@" in tail:
            credentials, _, host = tail.rpartition("@")
            user = credentials.split(":", 1)[0]
            return f"{head}://{user}:***@{host}"
        return url


def _with_driver(url: str) -> str:
    """Name an installed driver when the URL names none (SQLAlchemy would pick psycopg2/MySQLdb)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    installed = importlib.util.find_spec
    if parsed.drivername == "postgresql" and not installed("psycopg2") and installed("psycopg"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif (
        parsed.drivername in ("mysql", "mariadb")
        and not installed("MySQLdb")
        and installed("pymysql")
    ):
        parsed = parsed.set(drivername="mysql+pymysql")
    return parsed.render_as_string(hide_password=False)


def _engine_kwargs(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql" or backend in ("mysql", "mariadb"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None  # open_storage says what is wrong with it
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    return Path(database) if database and database != ":memory:" else None


def remove_sqlite_file(path: Path) -> None:
    """Remove a SQLite database file with its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def _prepare_sqlite(url: str, *, must_exist: bool) -> None:
    """Switch a SQLite file to WAL (persistent per database file); with ``must_exist``, refuse
    a missing file instead of creating an empty database."""
    path = sqlite_file(url)
    if path is None:
        return
    if not path.parent.exists():
        raise UserError(f"storage {url}: folder {path.parent} does not exist")
    if must_exist and not path.is_file():
        raise UserError(
            f"storage {url}: no database file {path} (create a study there first with "
            "`mergeopt study create SPEC --storage URL`)"
        )
    try:
        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise UserError(f"storage {url}: cannot open SQLite database ({exc})") from None


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = None,
    must_exist: bool = False,
) -> RDBStorage:
    """An Optuna RDB storage for ``url``; unreachable or malformed URLs raise ``UserError``,
    and so does a missing SQLite file with ``must_exist`` (commands that only read a study).

    With ``heartbeat_interval``, trials whose worker stopped heartbeating for ``grace_period``
    seconds are failed by the next ``fail_stale_trials`` and re-enqueued up to ``max_retry``
    times (Optuna's ``RetryFailedTrialCallback``).
    """
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    masked = mask_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise UserError(
            f"storage {masked}: not a database URL "
            "(expected e.g. sqlite:///mergeopt.db or postgresql://user@host/db)"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise UserError(
            f"storage {masked}: unsupported database {backend!r} (use sqlite, postgresql or mysql)"
        )
    if backend == "sqlite":
        _prepare_sqlite(url, must_exist=must_exist)
    url = _with_driver(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna 4.9 renamed the callback (the old name warns on every worker start).
        retry_callback = getattr(
            optuna.storages,
            "RetryHeartbeatStaleTrialCallback",
            optuna.storages.RetryFailedTrialCallback,
        )
        callback = retry_callback(max_retry=max_retry) if heartbeat_interval is not None else None
        try:
            return _claiming_storage_class()(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=callback,
            )
        except ImportError:
            raise UserError(
                f"storage {masked}: the database driver is not installed "
                "(pip install -e '.[db]' in mergeopt's clone)"
            ) from None
        except (SQLAlchemyError, OSError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            detail = reason[0] if reason else exc.__class__.__name__
            detail = detail.replace(url, masked)
            if parsed.password:
                detail = detail.replace(str(parsed.password), "***")
            raise UserError(f"storage {masked}: cannot connect ({detail})") from None


def load_study(
    name: str, storage: RDBStorage | str, *, sampler: optuna.samplers.BaseSampler | None = None
) -> optuna.Study:
    """Load an existing study or raise ``UserError`` naming it and the (masked) storage."""
    import optuna

    if isinstance(storage, str):
        storage = open_storage(storage, must_exist=True)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise UserError(
            f"no study named {name!r} in {mask_url(str(storage.url))} (see `mergeopt study list`)"
        ) from None


# --------------------------------------------------------------------------- database outages

_DRIVER_MODULES = ("psycopg", "psycopg2", "pymysql", "MySQLdb", "sqlite3")


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from, says the database is unreachable.

    Optuna wraps SQLAlchemy errors in ``StorageInternalError``, so the whole cause/context
    chain is searched: SQLAlchemy ``OperationalError``/``InterfaceError``/pool timeouts, a
    ``DBAPIError`` that invalidated its connection, the drivers' own connection errors
    (psycopg, pymysql, MySQLdb, sqlite3 ``OperationalError``/``InterfaceError``) and socket
    errors. Programming errors (bad SQL, integrity, data too long) are not: retrying them
    cannot help.
    """
    from sqlalchemy import exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(
            current, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
        ):
            return True
        kind = type(current)
        if kind.__module__.split(".")[0] in _DRIVER_MODULES and kind.__name__ in (
            "OperationalError",
            "InterfaceError",
        ):
            return True
        if isinstance(current, ConnectionError):
            return True
        current = current.__cause__ or current.__context__
    return False


def connection_error_text(exc: BaseException, url: str) -> str:
    """The first line of the driver's message for ``exc``, with the URL's password masked."""
    from sqlalchemy.engine import make_url

    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    line = text[0] if text else type(cause).__name__
    password = make_url(url).password if "://" in url else None
    if password:
        line = line.replace(str(password), "***")
    return line[:200]


class DatabaseUnreachable(Exception):
    """The study's database stayed unreachable for longer than ``worker.database_outage_limit``.

    Not a ``UserError`` (nothing the user typed is wrong): a worker stops with this one line
    and its own exit code, and the study is left as a crash would leave it — the running
    trial's heartbeat goes stale and the next worker fails and retries it.
    """

    def __init__(self, masked_url: str, seconds: float) -> None:
        self.masked_url = masked_url
        self.seconds = seconds
        super().__init__(
            f"database {masked_url} unreachable for {seconds:.0f} s; the study is consistent, "
            "rerun `mergeopt study run` to continue"
        )


@functools.cache
def _claiming_storage_class() -> type[RDBStorage]:
    """Optuna's RDB storage whose state changes are conditional ``UPDATE``s, atomic on every
    backend: the hand-out of a queued trial (``... WHERE state = WAITING``) and the end of an
    unfinished one (``... WHERE state IN (WAITING, RUNNING)``, its values written in the same
    transaction).

    Optuna reads the state and then writes it, relying on ``SELECT ... FOR UPDATE``, which
    SQLite ignores: two SQLite workers could both take the same enqueued trial (the demo's
    expert trials, a CMA-ES generation, a SAASBO batch) and one then failed on the unique
    constraint of its parameters; and two workers that found the same trial stale both failed
    it, so Optuna's retry callback ran twice and its candidate was evaluated twice (the SQLite
    CMA-ES chaos run). The loser now gets ``UpdateFinishedTrialError``, as on PostgreSQL.
    """
    import optuna
    from optuna.trial import TrialState
    from sqlalchemy.exc import IntegrityError

    class ClaimingRDBStorage(optuna.storages.RDBStorage):
        def set_trial_state_values(
            self, trial_id: int, state: TrialState, values: Any = None
        ) -> bool:
            if state.is_finished():
                return self._finish(trial_id, state, values)
            if state != TrialState.RUNNING or values is not None:
                return super().set_trial_state_values(trial_id, state, values)
            # Taken by another worker (False) or already finished (Optuna's error).
            return claim_waiting_trial(self, trial_id)

        def _finish(self, trial_id: int, state: TrialState, values: Any) -> bool:
            """End an unfinished trial; ``UpdateFinishedTrialError`` when another process
            ended it first. The conditional ``UPDATE`` comes first: it takes the row's (on
            SQLite the database's) write lock, so the values belong to the winner alone."""
            try:
                return self._finish_once(trial_id, state, values)
            except IntegrityError:  # values already stored: as Optuna's own path answers
                return False

        def _finish_once(self, trial_id: int, state: TrialState, values: Any) -> bool:
            return finish_unfinished_trial(self, trial_id, state, values)

    return ClaimingRDBStorage


class TrialHeartbeats:
    """Beats every trial this worker holds, from the moment the trial row exists.

    ``study.ask`` can block for a long time inside a batch sampler (a CMA-ES worker waits for
    its generation, a SAASBO worker for the fitter), and a worker killed there would leave a
    RUNNING trial with no heartbeat, which Optuna never considers stale. So ``watch`` wraps the
    storage's trial creation and ``set_trial_state_values``: a trial created RUNNING, or
    a queued trial this process moves to RUNNING, is held and beaten at once; a trial this
    process finishes is released. A daemon thread beats the held trials every ``interval``
    seconds; a failed beat is logged once per outage (the thread keeps trying), and the time
    of the last failure tells the worker not to fail other workers' trials as stale until
    their heartbeats had time to resume.
    """

    def __init__(
        self,
        storage: RDBStorage,
        interval: float,
        on_error: Callable[[BaseException], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self._storage = storage
        self._interval = interval
        self._on_error = on_error
        self._on_recovered = on_recovered
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing = False
        self.last_outage: float | None = None
        self._thread = threading.Thread(target=self._run, name="trial-heartbeats", daemon=True)

    def watch(self) -> TrialHeartbeats:
        """Wrap the storage's trial creation and state changes (see the class docstring)."""
        from optuna.trial import TrialState

        def holding_created(create_new_trial: CreateTrial) -> CreateTrial:
            def create_and_hold(study_id: int, template_trial: Any = None) -> Any:
                frozen = create_new_trial(study_id, template_trial)
                if frozen.state == TrialState.RUNNING:
                    self.hold(trial_id_of(frozen))
                return frozen

            return create_and_hold

        def tracking_states(set_trial_state_values: SetTrialState) -> SetTrialState:
            def set_state_and_track(trial_id: int, state: Any, values: Any = None) -> bool:
                changed = set_trial_state_values(trial_id, state, values)
                if state == TrialState.RUNNING and changed:
                    self.hold(trial_id)
                elif state.is_finished():
                    self.release(trial_id)
                return changed

            return set_state_and_track

        wrap_trial_creation(self._storage, holding_created)
        wrap_trial_state_changes(self._storage, tracking_states)
        return self

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self._held.add(trial_id)
        self._beat(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def note_outage(self) -> None:
        self.last_outage = time.monotonic()

    def outage_within(self, seconds: float) -> bool:
        return self.last_outage is not None and time.monotonic() - self.last_outage < seconds

    def __enter__(self) -> TrialHeartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self, trial_id: int) -> None:
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the trial
            self.note_outage()
            if not self._failing and self._on_error is not None:
                self._on_error(exc)
            self._failing = True
        else:
            if self._failing and self._on_recovered is not None:
                self._on_recovered()
            self._failing = False

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for trial_id in self.held():
                self._beat(trial_id)


# --------------------------------------------------------------------------- cheap trial I/O
# Optuna commits every parameter and every user attr in a transaction of its own, and answers
# "how many trials are COMPLETE" by reading every trial. The worker loop does both on every
# trial; on a 2-core machine with 4 workers that made the storage, not the objective, the
# bottleneck (scripts/bench_storage.py, docs/bench/storage-*.md).


def count_trials(study: optuna.Study, *, below_number: int | None = None) -> dict[str, int]:
    """Trials of ``study`` per state name (``COMPLETE``, ``RUNNING``, ...), optionally only those
    numbered below ``below_number``: one ``COUNT ... GROUP BY`` on an RDB storage."""
    from optuna.trial import TrialState

    counts = {state.name: 0 for state in TrialState}
    backend = rdb_backend(storage_of(study))
    if backend is None:
        for trial in study.get_trials(deepcopy=False):
            if below_number is None or trial.number < below_number:
                counts[trial.state.name] += 1
        return counts
    for state, count in count_trial_states(
        backend, study_id_of(study), below_number=below_number
    ).items():
        counts[state.name] += count
    return counts


def trial_state(storage: Any, trial_id: int) -> optuna.trial.TrialState:
    """The state of one trial, read alone (``get_trial`` also loads its params and attrs)."""

    backend = rdb_backend(storage)
    if backend is None:
        return storage.get_trial(trial_id).state
    return read_trial_state(backend, trial_id)


@contextlib.contextmanager
def batched_trial_writes(storage: Any) -> Iterator[None]:
    """Write the trial parameters and user attrs set inside the block in one transaction.

    ``study.ask(distributions)`` stores each parameter with its own commit (148 for a 37-block,
    2-expert, 2-parameter genome) and ``trial.set_user_attr`` does the same per key; inside
    this block those calls on ``storage`` (``optuna_compat.storage_of(study)``) are collected
    and written together when the block ends without an exception. If it raises, nothing
    collected is written: the trial stays RUNNING without parameters and is failed like any
    abandoned trial. A trial ended inside the block (a batch sampler closes a queued trial it
    takes over) gets its collected writes first, while it can still take them. Storages other
    than Optuna's RDB storage are written to directly.
    """
    backend = rdb_backend(storage)
    if backend is None or not can_write_trial_rows(backend):
        yield
        return
    params: list[tuple[int, str, float, Any]] = []
    user_attrs: list[tuple[int, str, Any]] = []

    def write(trial_ids: set[int] | None = None) -> None:
        """Write the collected writes (of ``trial_ids`` only, when given) in one transaction."""
        chosen_params = [p for p in params if trial_ids is None or p[0] in trial_ids]
        chosen_attrs = [a for a in user_attrs if trial_ids is None or a[0] in trial_ids]
        params[:] = [p for p in params if trial_ids is not None and p[0] not in trial_ids]
        user_attrs[:] = [a for a in user_attrs if trial_ids is not None and a[0] not in trial_ids]
        if chosen_params or chosen_attrs:
            write_trial_rows(backend, chosen_params, chosen_attrs)

    def writing_first(set_state: SetTrialState) -> SetTrialState:
        def write_then_set_state(trial_id: int, state: Any, values: Any = None) -> bool:
            if state.is_finished():
                write({trial_id})
            return set_state(trial_id, state, values)

        return write_then_set_state

    with (
        redirect_trial_writes(
            storage,
            set_trial_param=lambda trial_id, name, value, distribution: params.append(
                (trial_id, name, value, distribution)
            ),
            set_trial_user_attr=lambda trial_id, key, value: user_attrs.append(
                (trial_id, key, value)
            ),
        ),
        trial_state_changes_wrapped(storage, writing_first),
    ):
        yield
    write()


def set_finished_trial_user_attrs(
    study: optuna.Study, trial_id: int, values: dict[str, Any]
) -> None:
    """Write user attrs onto a finished trial, in one transaction (insert or overwrite each key).

    Optuna refuses ``set_trial_user_attr`` once a trial is finished; what is learnt about a
    COMPLETE trial afterwards (its held-out values) is written here, straight into Optuna's
    ``trial_user_attributes`` table. Writing the same values again changes nothing. This
    process's cached copy of the trial is stale afterwards: load the study again to read them.
    """
    backend = rdb_backend(storage_of(study))
    if backend is None:
        raise TypeError("attrs of finished trials can only be written to an RDB storage")
    write_finished_trial_user_attrs(backend, trial_id, values)
