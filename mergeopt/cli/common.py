"""What the command modules share: the typer apps they register on, the ``--storage`` option,
the console, and the ``--device`` check."""

from __future__ import annotations

from typing import Annotated

import typer


def one_device(value: str | None) -> str | None:
    """``--device``: one device name, checked before any model is read."""
    from mergeopt.workers import DEVICE_NAMES, is_device_name

    if value is not None and not is_device_name(value):
        raise typer.BadParameter(f"{value!r} is not a device ({DEVICE_NAMES})")
    return value


app = typer.Typer(
    name="mergeopt",
    help="Search merge recipes (per-block weights and densities) of fine-tuned LLMs with Optuna "
    "studies kept in a database. Start with `mergeopt zoo build` and "
    "`mergeopt study create studies/tiny.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
study_app = typer.Typer(help="Create, run and inspect studies.", no_args_is_help=True)
zoo_app = typer.Typer(
    help="The tiny model zoo used by the demo and the tests.", no_args_is_help=True
)
app.add_typer(study_app, name="study")
app.add_typer(zoo_app, name="zoo")

StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Database URL (sqlite:///file.db, postgresql://user@host/db, "
        "mysql://user@host/db). Default: $MERGEOPT_STORAGE, else sqlite:///mergeopt.db.",
        show_default=False,
    ),
]


def new_console():  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    return Console()
