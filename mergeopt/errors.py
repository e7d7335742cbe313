"""The one exception type for mistakes a user can make (spec, paths, models, data, storage)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input from the user: the CLI prints ``error: <message>`` on one line and exits 2.

    The message must say what is wrong and where (file and field, path, URL without password)
    in a single line; nothing may have been written to a study or an export when it is raised.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def read_user_text(path: Path, what: str) -> str:
    """The UTF-8 text of a file the user named (``what``: "spec file", "task file"); a missing
    file, a folder, bytes that are not UTF-8 or a read error is a one-line ``UserError``."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not a UTF-8 text file (byte {exc.start} cannot be decoded)"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
