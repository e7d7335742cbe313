"""Shared fixtures: the tiny zoo (built once per machine, cached), spec files, and real
databases — a fresh PostgreSQL and MariaDB database per test session on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests._zoo_fixture import zoo_dir  # noqa: F401 - a fixture re-exported for every test

REPO = Path(__file__).resolve().parent.parent

# Fixture names of the database URLs, for tests parametrized over the backends
# (`request.getfixturevalue(name)`); the servers' tests carry their markers.
SERVER_DATABASES = [
    pytest.param("postgres_url", marks=pytest.mark.postgres),
    pytest.param("mariadb_url", marks=pytest.mark.mysql),
]
EVERY_DATABASE = ["sqlite_url", *SERVER_DATABASES]
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MARIADB_ADMIN = "mysql+pymysql://root@127.0.0.1:3306/"


def _create_database(admin_url: str, name: str, *, autocommit: bool) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()


def _drop_database(admin_url: str, name: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if admin_url.startswith("postgresql"):
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        else:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test session, dropped afterwards."""
    name = f"mergeopt_test_{uuid.uuid4().hex[:10]}"
    try:
        _create_database(POSTGRES_ADMIN, name, autocommit=True)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is needed for this test: {exc}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    _drop_database(POSTGRES_ADMIN, name)


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A new, empty MariaDB database for this test session, dropped afterwards."""
    name = f"mergeopt_test_{uuid.uuid4().hex[:10]}"
    try:
        _create_database(MARIADB_ADMIN, name, autocommit=True)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"MariaDB on 127.0.0.1:3306 is needed for this test: {exc}")
    yield f"mysql://root@127.0.0.1:3306/{name}"
    _drop_database(MARIADB_ADMIN, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def tiny_spec(zoo: Path, **overrides: object) -> dict:
    """The demo spec with absolute zoo paths; ``overrides`` replace top-level sections."""
    spec = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    spec["models"]["base"] = str(zoo / "base")
    spec["models"]["experts"] = [str(zoo / "expert-direct"), str(zoo / "expert-steps")]
    for objective in spec["objectives"]:
        for key in ("task", "heldout"):
            if key in objective:
                objective[key] = str(zoo / "tasks" / Path(objective[key]).name)
        objective["limit"] = 24
    spec.update(overrides)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``mergeopt ARGS`` in a fresh process, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full_env.pop("MERGEOPT_STORAGE", None)  # tests name their storage explicitly
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mergeopt.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or REPO,
    )
