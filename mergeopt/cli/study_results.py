"""``mergeopt study evaluate/export/plot``: what a study found, scored on held-out data, written
as models and recipes, and drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from mergeopt.cli.common import StorageOption, new_console, one_device, study_app
from mergeopt.cli.study_output import print_status, refresh_dashboard
from mergeopt.errors import UserError
from mergeopt.export import ExportFormat
from mergeopt.export_choice import PREFERENCE_RULE


@study_app.command("evaluate")
def study_evaluate(
    name: Annotated[str, typer.Argument(help="Study name.")],
    heldout: Annotated[
        bool,
        typer.Option(
            "--heldout", help="Score on the held-out split (the one split this command scores)."
        ),
    ] = False,
    pareto: Annotated[
        bool, typer.Option("--pareto", help="Evaluate every Pareto-optimal trial.")
    ] = False,
    trial: Annotated[
        list[int] | None, typer.Option("--trial", help="Evaluate this trial (repeatable).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Device of the merge and the scorer (default: the first GPU, else cpu).",
            callback=one_device,
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    storage: StorageOption = None,
) -> None:
    """Score chosen COMPLETE trials on the held-out split of every objective, with the same
    merge (recipe and seed), and store the values in each trial (again: the same values)."""
    from mergeopt.heldout import check_heldout, choose_trials, evaluate_heldout
    from mergeopt.storage import load_study, resolve_storage_url
    from mergeopt.study import stored_spec
    from mergeopt.workers import _pin_device, parse_devices

    if not heldout:
        raise UserError("study evaluate scores the held-out split: pass --heldout")
    url = resolve_storage_url(storage)
    study = load_study(name, url)
    check_heldout(stored_spec(study), name)
    trials = choose_trials(study, pareto=pareto, numbers=trial or [])
    chosen = parse_devices(None, device)
    if len(chosen) != 1:
        raise UserError(f"--device: one device, got {device!r}")
    used = _pin_device(chosen[0]) if device is not None else chosen[0]
    console = new_console()
    console.print(
        f"evaluating {len(trials)} trial{'s' if len(trials) != 1 else ''} of study {name} "
        f"on the held-out split on {chosen[0]}"
    )
    results = evaluate_heldout(study, trials, device=used, progress=progress)
    failed = [r for r in results if r.error is not None]
    for result in results:
        if result.values is None:
            print(f"trial {result.trial}: held-out evaluation failed: {result.error}")
        else:
            values = " ".join(f"{k}={v:.4g}" for k, v in result.values.items())
            print(f"trial {result.trial} (seed {result.seed}): held-out {values}")
    study = load_study(name, url)  # this process's copies of the trials predate the results
    print_status(study, console, throughput=False)
    refresh_dashboard(study, console)
    if failed:
        raise typer.Exit(code=1)


@study_app.command(
    "export",
    help="Write chosen trials as Hugging Face model folders and/or "
    "mergekit YAML. Choose exactly one of --trial, --best, --pareto, --preference. "
    f"--preference rule: {PREFERENCE_RULE}",
)
def study_export(
    name: Annotated[str, typer.Argument(help="Study name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create (refused if it exists).")],
    trial: Annotated[int | None, typer.Option(help="Export this trial number.")] = None,
    best: Annotated[
        str | None, typer.Option(help="Export the best trial on this objective (its name).")
    ] = None,
    pareto: Annotated[
        bool,
        typer.Option(
            "--pareto", help="Export every Pareto-optimal trial, one sub-folder each + index."
        ),
    ] = False,
    preference: Annotated[
        str | None,
        typer.Option(
            metavar="W1,W2,...", help="Export the Pareto trial nearest these objective weights."
        ),
    ] = None,
    on: Annotated[
        str | None,
        typer.Option(
            "--on",
            help="search (default) or heldout: --best and --preference choose by the values of "
            "that split (heldout: stored by `mergeopt study evaluate NAME --heldout`).",
        ),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="hf, mergekit or both (default).")
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="Device that redoes the merge (cpu, cuda).", callback=one_device),
    ] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    moe: Annotated[
        bool,
        typer.Option(
            "--moe",
            help="Build one Mixture-of-Experts model (mergekit-moe) from --trials or --pareto, "
            "each trial's merge an expert.",
        ),
    ] = False,
    trials_list: Annotated[
        str | None,
        typer.Option("--trials", metavar="N,M,...", help="With --moe: the trials to combine."),
    ] = None,
    gate_mode: Annotated[
        str | None,
        typer.Option(
            help="With --moe: router initialization: hidden (default; prompts of each trial's "
            "strongest objective), cheap_embed or random."
        ),
    ] = None,
    experts_per_token: Annotated[
        int | None, typer.Option(help="With --moe: experts each token is routed to (default 1).")
    ] = None,
    storage: StorageOption = None,
) -> None:
    from mergeopt.export import FORMATS, export_format, export_trials
    from mergeopt.export_choice import parse_preference, select_trials
    from mergeopt.storage import load_study, resolve_storage_url
    from mergeopt.study import stored_spec

    if moe or trials_list is not None:
        # what an MoE export does not use is refused rather than silently ignored
        for option, value in (("--format", fmt), ("--on", on)):
            if moe and value is not None:
                raise UserError(f"{option} does not apply to --moe (it writes one hf model)")
        _export_moe(
            name,
            out,
            trials_list=trials_list,
            pareto=pareto,
            others=[trial is not None, best is not None, preference is not None],
            gate_mode=gate_mode or "hidden",
            experts_per_token=1 if experts_per_token is None else experts_per_token,
            device=device,
            force=force,
            moe=moe,
            storage=storage,
        )
        return
    for option, given in (
        ("--gate-mode", gate_mode is not None),
        ("--experts-per-token", experts_per_token is not None),
    ):
        if given:
            raise UserError(f"{option} applies only to --moe")
    fmt = fmt or "both"
    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    url = resolve_storage_url(storage)
    study = load_study(name, url)
    # fmt is a FORMATS name, checked above
    written_fmt, note = export_format(stored_spec(study), cast("ExportFormat", fmt))
    trials = select_trials(
        study,
        trial=trial,
        best=best,
        pareto=pareto,
        preference=parse_preference(preference) if preference is not None else None,
        on=on or "search",
    )
    written = export_trials(
        study,
        trials,
        out,
        fmt=written_fmt,
        device=device,
        force=force,
        index=pareto,
        storage_url=url,
    )
    console = new_console()
    if note is not None:
        console.print(note)
    for path in written:
        console.print(f"exported {path}")


def _export_moe(
    name: str,
    out: Path,
    *,
    trials_list: str | None,
    pareto: bool,
    others: list[bool],
    gate_mode: str,
    experts_per_token: int,
    device: str,
    force: bool,
    moe: bool,
    storage: str | None,
) -> None:
    """``study export --moe``: the chosen trials as the experts of one MoE model."""
    from mergeopt.export_choice import select_trials
    from mergeopt.export_moe import export_moe
    from mergeopt.storage import load_study, resolve_storage_url
    from mergeopt.study import complete_trial

    if not moe:
        raise UserError("--trials chooses the experts of --moe; export one trial with --trial N")
    if any(others) or (trials_list is None) == (not pareto):
        raise UserError("--moe takes exactly one of --trials N,M,... or --pareto")
    url = resolve_storage_url(storage)
    study = load_study(name, url)
    if trials_list is not None:
        try:
            numbers = [int(part) for part in trials_list.split(",") if part.strip()]
        except ValueError:
            raise UserError(
                f"--trials: expected trial numbers like 3,7,12, got {trials_list!r}"
            ) from None
        chosen = [complete_trial(study, n, done_to_it="be experts of a MoE") for n in numbers]
    else:
        chosen = select_trials(study, pareto=True)
    written = export_moe(
        study,
        chosen,
        out,
        gate_mode=gate_mode,
        experts_per_token=experts_per_token,
        device=device,
        force=force,
        storage_url=url,
    )
    new_console().print(
        f"exported a MoE of trials {', '.join(str(t.number) for t in chosen)} to {written}"
    )


@study_app.command("plot")
def study_plot(
    name: Annotated[str, typer.Argument(help="Study name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG (and HTML) plots.")],
    artifact_dir: Annotated[
        Path | None,
        typer.Option(
            help="optuna-dashboard artifact folder "
            "(default: <db stem>.artifacts beside a SQLite file)."
        ),
    ] = None,
    storage: StorageOption = None,
) -> None:
    """Plot the Pareto front, hypervolume over trials and per-block parameters of the Pareto
    trials, and attach them to the study for optuna-dashboard."""
    from mergeopt.dashboard import (
        artifact_dir_for,
        attach_plots,
        dashboard_command,
        sqlite_path,
    )
    from mergeopt.plots import plot_study
    from mergeopt.storage import load_study, resolve_storage_url

    url = resolve_storage_url(storage)
    study = load_study(name, url)
    paths = plot_study(study, out)
    console = new_console()
    for path in paths:
        console.print(f"wrote {path}")
    if artifact_dir is None and sqlite_path(url) is None:
        console.print("plots not attached to the study: pass --artifact-dir for a server database")
        return
    folder = artifact_dir_for(url, artifact_dir)
    attach_plots(study, paths, artifact_dir=folder)
    print(f"open: {dashboard_command(url, artifact_dir=folder)}")
