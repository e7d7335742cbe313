"""Ctrl-C outside a worker (typer's or click's ``Abort``) is one line and exit code 130."""

from __future__ import annotations

import pytest

from mergeopt import cli


def test_an_abort_is_one_line_and_exit_code_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        from typer.exceptions import Abort
    except ImportError:  # typer < 0.25 raises click's
        from click.exceptions import Abort  # type: ignore[assignment]

    def aborted(**_: object) -> None:
        raise Abort()

    monkeypatch.setattr(cli, "app", aborted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
