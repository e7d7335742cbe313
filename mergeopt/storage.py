"""Study storage: which database URL wins, how each backend is opened, masked URLs, and how a
database outage is recognized (``is_connection_error``, ``DatabaseUnreachable``).

Precedence: ``--storage`` > ``MERGEOPT_STORAGE`` > the spec's ``storage:`` > ``sqlite:///mergeopt.db``.
SQLite is the single-machine default (WAL journal, long busy timeout, so that several local
workers can share it); PostgreSQL and MySQL/MariaDB URLs are used as given, with the pure
Python drivers of the ``db`` extra filled in when the URL names no driver.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sqlite3
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.optuna_compat import (
    claim_waiting_trial,
    finish_unfinished_trial,
    storage_of,
    study_id_of,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

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
        callback = (
            RetryUnlessTakenOver(retry_callback(max_retry=max_retry))
            if heartbeat_interval is not None
            else None
        )
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


class RetryUnlessTakenOver:
    """Optuna's retry callback for trials failed as stale, except a queued candidate that a
    waiting trial popped and claimed before its worker died (``mergeopt:taken_by`` on it, the
    taker holding an assignment): the taker, or its own retry, holds that candidate, and a
    second copy would evaluate it twice (seen in the MariaDB SAASBO chaos run)."""

    def __init__(self, retry: Callable[[optuna.Study, FrozenTrial], None]) -> None:
        self._retry = retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        taker = attrs.TAKEN_BY.get(trial)
        if taker is not None:
            storage = storage_of(study)
            taker_id = storage.get_trial_id_from_study_id_trial_number(study_id_of(study), taker)
            if attrs.holds_assignment(storage.get_trial(taker_id)):
                return
        self._retry(study, trial)


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
