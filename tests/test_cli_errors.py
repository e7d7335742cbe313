"""The command line's error path: an unexpected error is one line naming its traceback file and
exit code 1, Ctrl-C is one line and exit code 130, never a bare traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeopt import cli


def run_main(monkeypatch: pytest.MonkeyPatch, raised: BaseException) -> int:
    def failing_app(**kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "app", failing_app)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code)


def test_an_unexpected_error_is_one_line_naming_the_file_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.ERRORS_DIR_ENV, str(tmp_path / "errors"))

    code = run_main(monkeypatch, RuntimeError("the merge kernel exploded\nsecond line"))

    stderr = capsys.readouterr().err
    assert code == 1
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    (log,) = (tmp_path / "errors").iterdir()
    assert stderr == (
        f"error: unexpected RuntimeError: the merge kernel exploded (traceback in {log})\n"
    )
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: the merge kernel exploded" in text and "failing_app" in text


def test_an_unwritable_errors_folder_falls_back_to_the_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cli.ERRORS_DIR_ENV, str(blocker / "errors"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR

    assert run_main(monkeypatch, ValueError("boom")) == 1

    (log,) = (tmp_path / "tmp").iterdir()
    assert f"(traceback in {log})" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(monkeypatch, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_user_error_stays_exit_2_without_a_traceback_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.ERRORS_DIR_ENV, str(tmp_path / "errors"))
    assert run_main(monkeypatch, cli.UserError("no study named 'x'")) == 2
    assert capsys.readouterr().err == "error: no study named 'x'\n"
    assert not (tmp_path / "errors").exists()
