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
    if value is not None and value != "cpu":
        # else torch's own AssertionError or RuntimeError once a model is moved there
        missing = device_missing(value)
        if missing:
            raise typer.BadParameter(f"{value!r}: {missing}")
    return value


def device_missing(device: str) -> str | None:
    """Why this machine has no ``device`` (a valid name other than cpu), or None if it has."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no MPS device"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) < count:
        return None
    return f"this machine sees {count} CUDA device(s)"


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
