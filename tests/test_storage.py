"""Storage URLs: precedence, drivers, masked passwords, clear errors for unreachable servers."""

from __future__ import annotations

import pytest

from mergeopt.errors import UserError
from mergeopt.storage import DEFAULT_STORAGE, mask_url, open_storage, resolve_storage_url


def test_precedence_is_flag_then_environment_then_spec_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MERGEOPT_STORAGE", raising=False)
    assert resolve_storage_url(None, None) == DEFAULT_STORAGE
    assert resolve_storage_url(None, "sqlite:///spec.db") == "sqlite:///spec.db"
    monkeypatch.setenv("MERGEOPT_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url(None, "sqlite:///spec.db") == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///flag.db", "sqlite:///spec.db") == "sqlite:///flag.db"


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://u:hunter2@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert "hunter2" not in mask_url("mysql+pymysql://root:hunter2@127.0.0.1/x")


def test_sqlite_storage_uses_wal(sqlite_url: str) -> None:
    import sqlite3

    open_storage(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.postgres
def test_postgres_url_without_driver_works(postgres_url: str) -> None:
    assert open_storage(postgres_url).url.startswith("postgresql+psycopg://")


@pytest.mark.mysql
def test_mysql_url_without_driver_works(mariadb_url: str) -> None:
    assert open_storage(mariadb_url).url.startswith("mysql+pymysql://")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:hunter2@127.0.0.1:1/x", "cannot connect"),
        ("mysql://root:hunter2@127.0.0.1:3306/test", "Access denied"),
        ("mongodb://localhost/x", "unsupported database"),
        ("not a url", "not a database URL"),
        ("sqlite:////no/such/folder/x.db", "does not exist"),
    ],
)
def test_bad_storage_urls_are_one_line_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(UserError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert expected in message
    assert "hunter2" not in message
    assert "\n" not in message
