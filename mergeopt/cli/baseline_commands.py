"""``mergeopt baseline``: fine-tuning baselines for a preference, beside a study's merges."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from mergeopt.baselines import BaselineTraining
from mergeopt.cli.common import StorageOption, app, new_console, one_device
from mergeopt.errors import UserError
from mergeopt.preference_descent import DESCENTS

DEFAULTS = BaselineTraining()
BaselineMethod = Enum("BaselineMethod", {name: name for name in DESCENTS}, type=str)  # type: ignore[misc]


@app.command("baseline")
def baseline(
    method: Annotated[
        BaselineMethod,
        typer.Argument(
            help="; ".join(f"{name}: {descent.summary}" for name, descent in DESCENTS.items())
        ),
    ],
    spec_path: Annotated[
        Path, typer.Argument(metavar="SPEC.yaml", help="The study spec (classification).")
    ],
    preference: Annotated[
        str | None,
        typer.Option(
            help="One positive weight per objective, e.g. 0.7,0.3 (divided by their sum); a "
            "larger weight asks for a lower loss on that task."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write the baseline to (new).")
    ] = None,
    evaluate_only: Annotated[
        Path | None,
        typer.Option(
            "--evaluate-only",
            help="Re-score the saved baseline in this folder instead of training one.",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = DEFAULTS.steps,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Items of each task per step.")
    ] = DEFAULTS.batch_size,
    learning_rate: Annotated[
        float, typer.Option(min=0.0, help="AdamW's peak rate.")
    ] = DEFAULTS.learning_rate,
    seed: Annotated[
        int, typer.Option(help="Seed of the heads' draw and the batches.")
    ] = DEFAULTS.seed,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", callback=one_device)] = "cpu",
    study_name: Annotated[
        str | None,
        typer.Option("--study", help="Study to record the values in (default: the spec's name)."),
    ] = None,
    storage: StorageOption = None,
) -> None:
    """Fine-tune the spec's base on its classification tasks for a preference (Chebyshev
    scalarization or EPO search), write the model folder and its objective values, and record
    them in the study (shown by study status, study plot and the dashboard)."""
    # Before torch is imported: short OpenMP spins, as `zoo build` (its comment says why).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from mergeopt.baselines import (
        evaluate_saved_baseline,
        read_baseline,
        train_baseline,
    )
    from mergeopt.export_choice import parse_preference
    from mergeopt.progress import stages
    from mergeopt.spec import load_spec

    if (out is None) == (evaluate_only is None):
        raise UserError("give exactly one of --out DIR (train) and --evaluate-only DIR")
    spec = load_spec(spec_path)
    name = method.value
    if evaluate_only is not None:
        if preference is not None:
            raise UserError("--evaluate-only re-scores the saved preference; drop --preference")
        # training options would be ignored: the saved baseline was trained with its own
        trained_with = {
            "--steps": (steps, DEFAULTS.steps),
            "--batch-size": (batch_size, DEFAULTS.batch_size),
            "--learning-rate": (learning_rate, DEFAULTS.learning_rate),
            "--seed": (seed, DEFAULTS.seed),
        }
        for option, (value, default) in trained_with.items():
            if value != default:
                raise UserError(
                    f"--evaluate-only re-scores the saved baseline without training; drop {option}"
                )
        saved = read_baseline(evaluate_only)
        if saved["method"] != name:
            raise UserError(f"{evaluate_only}: a {saved['method']} baseline, not {name}")
        record = evaluate_saved_baseline(spec, evaluate_only, device=device)
        folder = evaluate_only
    else:
        if preference is None:
            raise UserError("--preference is required to train a baseline (e.g. 0.7,0.3)")
        assert out is not None
        training = BaselineTraining(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            device=device,
        )
        with stages(True) as progress:
            record = train_baseline(
                spec,
                method=name,
                preference=parse_preference(preference),
                out_dir=out,
                training=training,
                progress=progress,
            )
        folder = out
    _report(
        record,
        folder,
        spec_name=spec.name,
        study_name=study_name,
        storage=storage,
        spec_storage=spec.storage,
    )


def _report(
    record: dict[str, Any],
    folder: Path,
    *,
    spec_name: str | None,
    study_name: str | None,
    storage: str | None,
    spec_storage: str | None,
) -> None:
    from mergeopt.baselines import baseline_label, record_in_study
    from mergeopt.cli.study_output import refresh_dashboard
    from mergeopt.storage import load_study, mask_url, open_storage, resolve_storage_url

    console = new_console()
    values = ", ".join(f"{k} {v:.4g}" for k, v in record["values"].items())
    console.print(f"{baseline_label(record)} written to {folder}", markup=False)
    console.print(f"values: {values}", markup=False)
    if record["heldout"]:
        held = ", ".join(f"{k} {v:.4g}" for k, v in record["heldout"].items())
        console.print(f"held-out: {held}", markup=False)
    console.print(
        f"fine-tuning {record['train_seconds']:.1f} s, scoring {record['evaluate_seconds']:.1f} s",
        markup=False,
    )
    url = resolve_storage_url(storage, spec_storage)
    wanted = study_name or spec_name
    if wanted is None:
        console.print("not recorded in a study: the spec has no name (give --study)")
        return
    try:
        study = load_study(wanted, open_storage(url, must_exist=True))
    except UserError as missing:
        if study_name is not None:
            raise
        console.print(f"not recorded in a study: {missing}", markup=False)
        return
    label = record_in_study(study, record, folder)
    console.print(f"recorded in study {wanted} ({mask_url(url)}) as {label!r}", markup=False)
    refresh_dashboard(study, console)
