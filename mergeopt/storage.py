"""Study storage: which database URL wins, how each backend is opened, and masked URLs.

Precedence: ``--storage`` > ``MERGEOPT_STORAGE`` > the spec's ``storage:`` > ``sqlite:///mergeopt.db``.
SQLite is the single-machine default (WAL journal, long busy timeout, so that several local
workers can share it); PostgreSQL and MySQL/MariaDB URLs are used as given, with the pure
Python drivers of the ``db`` extra filled in when the URL names no driver.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError

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


def _prepare_sqlite(url: str) -> None:
    """Create the folder of a SQLite file and switch it to WAL (persistent per database file)."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    if not path.parent.exists():
        raise UserError(f"storage {url}: folder {path.parent} does not exist")
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
) -> RDBStorage:
    """An Optuna RDB storage for ``url``; unreachable or malformed URLs raise ``UserError``.

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
        _prepare_sqlite(url)
    url = _with_driver(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = (
            optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)
            if heartbeat_interval is not None
            else None
        )
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=callback,
            )
        except ImportError:
            raise UserError(
                f"storage {masked}: the database driver is not installed "
                "(pip install 'mergeopt[db]')"
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
        storage = open_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise UserError(
            f"no study named {name!r} in {mask_url(str(storage.url))} (see `mergeopt study list`)"
        ) from None


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds on a daemon thread.

    Optuna's own heartbeat thread is started by ``study.optimize`` only; mergeopt's workers use
    ask/tell so that they can keep the study at exactly the requested number of trials.
    """

    def __init__(
        self,
        storage: RDBStorage,
        trial_id: int,
        interval: float,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the trial
                if self._on_error is not None:
                    self._on_error(exc)
