"""``mergeopt zoo build`` and ``mergeopt merge``: commands that make models, outside any study."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mergeopt.cli.common import app, new_console, one_device, zoo_app
from mergeopt.errors import UserError


class ZooKind(str, Enum):
    decoder = "decoder"
    encoder = "encoder"


DEFAULT_ZOO_DIRS = {ZooKind.decoder: Path("zoo"), ZooKind.encoder: Path("encoder-zoo")}


@zoo_app.command("build")
def zoo_build(
    out_dir: Annotated[
        Path | None,
        typer.Argument(help="Folder to write the zoo to (default ./zoo, or ./encoder-zoo)."),
    ] = None,
    kind: Annotated[
        ZooKind,
        typer.Option(
            help="decoder: causal LMs (arithmetic, reversal); encoder: a BERT and four "
            "classifiers with heads of 4, 2, 3 and 2 labels."
        ),
    ] = ZooKind.decoder,
    seed: Annotated[int, typer.Option(help="Training seed; the same seed gives the same zoo.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if OUT_DIR holds an up-to-date zoo.")
    ] = False,
) -> None:
    """Train a model zoo on the CPU: a base and experts fine-tuned from it (about two minutes
    for the decoder zoo, one for the encoder zoo, on two idle cores). An up-to-date zoo in
    OUT_DIR is kept unless --force."""
    # Before torch is imported: OpenMP threads spin while they wait for a sibling. libgomp's
    # default spin made training on a busy 2-core machine over 10x slower, never spinning
    # (OMP_WAIT_POLICY=PASSIVE) 1.8x slower when idle; a short spin is the fastest both ways
    # (docs/bench/zoo-build-2026-11-30.md).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    folder = out_dir if out_dir is not None else DEFAULT_ZOO_DIRS[kind]
    if kind is ZooKind.encoder:
        _encoder_zoo_build(folder, seed=seed, force=force)
        return
    from mergeopt.zoo import build_zoo, up_to_date_zoo

    existing = None if force else up_to_date_zoo(folder, seed=seed)
    if existing is not None:
        built = existing.metadata.get("build_seconds")
        new_console().print(
            f"zoo in {existing.root} is up to date (built in {built} s); --force rebuilds it"
        )
        return
    info = build_zoo(folder, seed=seed, progress=True)
    new_console().print(f"zoo written to {info.root} in {info.metadata['build_seconds']:.0f} s")


def _encoder_zoo_build(folder: Path, *, seed: int, force: bool) -> None:
    from mergeopt.zoo.encoder import build_encoder_zoo, up_to_date_encoder_zoo
    from mergeopt.zoo.encoder_scores import score_table

    console = new_console()
    zoo = None if force else up_to_date_encoder_zoo(folder, seed=seed)
    if zoo is not None:
        built = zoo.metadata.get("build_seconds")
        console.print(
            f"encoder zoo in {zoo.root} is up to date (built in {built} s); --force rebuilds it"
        )
    else:
        zoo = build_encoder_zoo(folder, seed=seed, progress=True)
        console.print(f"encoder zoo written to {zoo.root} in {zoo.metadata['build_seconds']:.0f} s")
    console.print("held-out accuracy:", markup=False)
    console.print(score_table(zoo.metadata), markup=False, highlight=False)


@app.command("merge")
def merge(
    config: Annotated[
        Path, typer.Argument(metavar="CONFIG.yml", help="A mergekit config (mergekit's YAML).")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the merged Hugging Face model.")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", callback=one_device)] = "cpu",
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the random masks of dare_*/della* (an exported trial's YAML names it)."
        ),
    ] = 0,
) -> None:
    """Run a mergekit YAML with mergeopt's engine and write a Hugging Face model folder."""
    from mergeopt.merge.mergekit_config import run_mergekit_config

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder (name a new or empty folder)")
    run_mergekit_config(config, out_dir, device=device, seed=seed)
    new_console().print(f"merged model written to {out_dir}")
