"""The ``mergeopt`` command line: ``main``, the entry point, and what it does with errors.

The commands are in ``cli/study_lifecycle.py`` (create, run, status, list, delete),
``cli/study_results.py`` (evaluate, export, plot), ``cli/model_commands.py`` (zoo build,
merge) and ``cli/baseline_commands.py`` (baseline), registered on the typer apps of
``cli/common.py`` when this package is imported.

Heavy libraries (torch, transformers, optuna's storages) are imported inside the commands that
use them, so that ``mergeopt --help`` answers at once. Every ``UserError`` becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mergeopt.cli import baseline_commands, model_commands, study_lifecycle, study_results
from mergeopt.cli.common import app
from mergeopt.errors import UserError

# Imported for their commands, which register themselves on the apps in import order: the
# order `mergeopt study --help` lists them in.
_COMMAND_MODULES = (model_commands, baseline_commands, study_lifecycle, study_results)
USAGE_ERROR_EXIT = 2  # the same code as a user error: a mistake in what was typed
ERRORS_DIR_ENV = "MERGEOPT_ERRORS_DIR"  # where unexpected errors' tracebacks go
UNEXPECTED_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130


def errors_dir() -> Path:
    """``$MERGEOPT_ERRORS_DIR``, else ``$XDG_CACHE_HOME/mergeopt/errors`` (``~/.cache/...``)."""
    configured = os.environ.get(ERRORS_DIR_ENV)
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mergeopt" / "errors"


def _write_traceback(exc: BaseException) -> Path | None:
    """The traceback of an unexpected error in a file of its own; None if none can be written."""
    import tempfile
    import time
    import traceback

    text = (
        f"mergeopt {' '.join(sys.argv[1:])}\n"
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, python {sys.version.split()[0]}\n\n"
        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (errors_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def main() -> None:
    """Console entry point. User errors, command-line mistakes included, are one line on stderr
    and exit code 2; Ctrl-C is one line and exit code 130; any other error is one line naming
    the file that holds its traceback, and exit code 1."""
    try:  # typer >= 0.25 ships its own copy of click
        from typer._click import exceptions as click_exceptions
    except ImportError:  # the same module of click itself
        from click import exceptions as click_exceptions  # type: ignore[no-redef]
    # Not every copy of click has Abort (typer 0.29's has not: its Abort, raised on Ctrl-C, is
    # typer.exceptions.Abort); a missing name here would turn every unexpected error into an
    # AttributeError inside this handler.
    abort: type[BaseException]
    try:
        from typer.exceptions import Abort

        abort = Abort
    except ImportError:
        abort = getattr(click_exceptions, "Abort", KeyboardInterrupt)

    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_exceptions.NoArgsIsHelpError as exc:  # `mergeopt study`: the group's help
        exc.show()
        sys.exit(exc.exit_code)
    except click_exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "mergeopt"
        print(f"error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT)
    except click_exceptions.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, abort):
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except Exception as exc:
        path = _write_traceback(exc)
        where = f"traceback in {path}" if path is not None else "no traceback file could be written"
        summary = str(exc).strip().splitlines()
        detail = f": {summary[0]}" if summary else ""
        print(f"error: unexpected {type(exc).__name__}{detail} ({where})", file=sys.stderr)
        sys.exit(UNEXPECTED_ERROR_EXIT)
    sys.exit(code if isinstance(code, int) else 0)
