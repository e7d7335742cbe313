"""The one exception type for mistakes a user can make (spec, paths, models, data, storage)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLI prints ``error: <message>`` on one line and exits 2.

    The message must say what is wrong and where (file and field, path, URL without password)
    in a single line; nothing may have been written to a study or an export when it is raised.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
