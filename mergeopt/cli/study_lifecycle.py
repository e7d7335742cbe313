"""``mergeopt study create/run/status/list/delete``: a study's life in the database."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergeopt.cli.common import StorageOption, new_console, study_app
from mergeopt.cli.study_output import print_status, refresh_dashboard
from mergeopt.errors import UserError

if TYPE_CHECKING:
    from mergeopt.workers import RunSummary


@study_app.command("create")
def study_create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="The study spec.")],
    storage: StorageOption = None,
    name: Annotated[str | None, typer.Option(help="Study name (default: the spec's name).")] = None,
    load_if_exists: Annotated[
        bool,
        typer.Option(
            "--load-if-exists", help="Reuse an existing study of that name with the same spec."
        ),
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Accept models that have only pickle checkpoints (*.bin, *.pt): they are read "
            "once with torch.load(weights_only=True) and converted to safetensors. Unpickling "
            "files you do not trust is unsafe. Same as models.allow_pickle: true.",
        ),
    ] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Accept models whose config.json asks for their own Python code (auto_map); "
            "the scorer then runs that code. Same as models.trust_remote_code: true.",
        ),
    ] = False,
) -> None:
    """Validate a spec and create its study (one direction per objective)."""
    from mergeopt.genome import DataflowGenome
    from mergeopt.spec import load_spec
    from mergeopt.storage import mask_url, resolve_storage_url
    from mergeopt.study import create_study, stored_genome

    spec = load_spec(spec_path)
    opt_ins = {"allow_pickle": True} if allow_pickle else {}
    if trust_remote_code:
        opt_ins["trust_remote_code"] = True
    if opt_ins:  # the flags only ever turn a policy on; the stored spec records the choice
        spec = spec.model_copy(update={"models": spec.models.model_copy(update=opt_ins)})
    url = resolve_storage_url(storage, spec.storage)
    study = create_study(
        spec, storage_url=url, name=name, load_if_exists=load_if_exists, spec_path=str(spec_path)
    )
    genome = stored_genome(study)
    console = new_console()
    if isinstance(genome, DataflowGenome):
        kinds = "take and scale" if genome.scale is not None else "take"
        space = (
            f"data-flow paths over {sum(genome.source_layers)} layers x {genome.repeats} "
            f"repeats = {len(genome.hops)} hops ({kinds}) = {genome.dimension} dimensions"
        )
    else:
        space = (
            f"{genome.num_blocks} blocks x {genome.num_experts} experts x "
            f"{len(genome.searched)} parameters = {genome.dimension} dimensions"
        )
    console.print(
        f"study [bold]{study.study_name}[/] in {mask_url(url)}: {space}, "
        f"objectives {', '.join(o.name for o in spec.objectives)}"
    )
    console.print(
        f"next: mergeopt study run {study.study_name} --n-trials 16"
        + (f" --storage '{mask_url(url)}'" if storage else "")
    )


@study_app.command("run")
def study_run(
    name: Annotated[str, typer.Argument(help="Study name.")],
    n_trials: Annotated[
        int,
        typer.Option(
            "--n-trials",
            "-n",
            min=1,
            help="Run until the study holds this many COMPLETE trials in total "
            "(a rerun continues).",
        ),
    ],
    storage: StorageOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", "-w", min=1, help="Worker processes (one per GPU if there are GPUs)."
        ),
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated devices, one worker each, e.g. cuda:0,cuda:1 or cpu,cpu."
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop starting new trials after this many seconds.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run workers against a study until it holds N complete trials.

    A worker that crashes or is killed is restarted (at most twice per device in a row without
    a new complete trial). Exit codes: 0 the study holds N complete trials (or the sampler's
    grid is used up, or --timeout was reached); 2 a mistake (one `error:` line); 3 the database
    stayed unreachable; 4 work was lost (a crashed worker was not restarted, or the workers
    stopped short of N); 128 + the signal when interrupted (130 Ctrl-C, 143 SIGTERM, 129
    SIGHUP).
    """
    from mergeopt.storage import load_study, open_storage, resolve_storage_url
    from mergeopt.study import stored_spec, trial_counts
    from mergeopt.workers import WORK_LOST_EXIT, check_device_options, parse_devices, run_workers

    url = resolve_storage_url(storage)
    study = load_study(name, open_storage(url, must_exist=True))
    stored_spec(study)
    check_device_options(workers, devices)
    complete = trial_counts(study)["COMPLETE"]
    if complete >= n_trials:  # no worker starts, no model is loaded
        print(
            f"study {name} already holds {complete} complete trials ({n_trials} asked for); "
            "nothing to run"
        )
        return
    chosen = parse_devices(workers, devices)
    summary = run_workers(
        study, url, n_trials=n_trials, devices=chosen, timeout=timeout, progress=progress
    )
    console = new_console()
    if summary.user_errors and summary.completed_after < n_trials:
        raise typer.Exit(code=2)
    if summary.database_unreachable and summary.completed_after < n_trials:
        raise typer.Exit(code=3)  # each worker printed its `error: database ...` line
    if summary.interrupted:
        console.print(
            f"interrupted ({summary.signal_name}): {summary.completed_after}/{n_trials} trials "
            "complete; run the same command again to continue"
        )
        raise typer.Exit(code=128 + signal.Signals[summary.signal_name].value)
    if summary.work_lost:
        print(f"error: {work_lost_text(summary)}", file=sys.stderr)
        raise typer.Exit(code=WORK_LOST_EXIT)
    completed = summary.completed_after - summary.completed_before
    rate = f", {60 * completed / summary.seconds:.1f} per minute" if summary.seconds else ""
    console.print(
        f"{completed} trials completed in {summary.seconds:.1f} s{rate} "
        f"({summary.completed_after}/{n_trials} in the study"
        + (f", {summary.restarts} worker restarts" if summary.restarts else "")
        + ")"
    )
    print_status(study, console, throughput=False)
    refresh_dashboard(study, console)
    from mergeopt.storage import mask_url

    print(f"inspect: {dashboard_command()} --host 127.0.0.1 '{mask_url(url)}'")


def work_lost_text(summary: RunSummary) -> str:
    """One line: what was lost, with the study's complete trials out of those asked for."""
    counts = f"{summary.completed_after}/{summary.n_trials} trials complete"
    if summary.crashed:
        return (
            f"work lost: worker on {', '.join(summary.crashed)} died and was not restarted "
            f"(see above); {counts}; run the same command again to continue"
        )
    return f"work lost: the workers stopped with {counts}; run the same command again to continue"


def dashboard_command() -> str:
    """``optuna-dashboard`` as the user can type it: bare when on PATH, else its path (beside
    this Python, e.g. ``.venv/bin/optuna-dashboard`` when the venv is not activated)."""
    import shutil

    beside = Path(sys.executable).parent / "optuna-dashboard"
    found = shutil.which("optuna-dashboard")
    if found and Path(found).resolve() == beside.resolve():
        return "optuna-dashboard"
    if beside.exists():
        try:
            return str(beside.relative_to(Path.cwd()))
        except ValueError:
            return str(beside)
    return "optuna-dashboard"


@study_app.command("status")
def study_status(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Trial states, Pareto (or best) trials and throughput of a study."""
    from mergeopt.report import status_report
    from mergeopt.storage import load_study, resolve_storage_url

    study = load_study(name, resolve_storage_url(storage))
    if as_json:
        print(json.dumps(status_report(study), indent=2))
        return
    print_status(study, new_console())


@study_app.command("list")
def study_list(storage: StorageOption = None) -> None:
    """Studies in the storage, with their objectives and trial counts."""
    import optuna
    from rich.table import Table

    from mergeopt.storage import mask_url, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    backend = open_storage(url, must_exist=True)
    summaries = optuna.get_all_study_summaries(backend, include_best_trial=False)
    table = Table(title=f"studies in {mask_url(url)}")
    for column in ("name", "objectives", "trials", "started"):
        table.add_column(column)
    for summary in summaries:
        stored = optuna.load_study(study_name=summary.study_name, storage=backend).metric_names
        names: list[str | None] = list(stored) if stored else [None] * len(summary.directions)
        objectives = ", ".join(
            f"{name or f'objective {i}'} {'↑' if d.name == 'MAXIMIZE' else '↓'}"
            for i, (name, d) in enumerate(zip(names, summary.directions, strict=True))
        )
        started = (
            summary.datetime_start.strftime("%Y-%m-%d %H:%M") if summary.datetime_start else ""
        )
        table.add_row(summary.study_name, objectives, str(summary.n_trials), started)
    new_console().print(table)


@study_app.command("delete")
def study_delete(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete it and all its trials.")
    ] = False,
) -> None:
    """Delete a study and all its trials (asks for --yes)."""
    import optuna

    from mergeopt.storage import load_study, mask_url, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    study = load_study(name, open_storage(url, must_exist=True))
    if not yes:
        raise UserError(f"deleting study {name!r} and its {len(study.trials)} trials needs --yes")
    optuna.delete_study(study_name=name, storage=open_storage(url, must_exist=True))
    new_console().print(f"deleted study {name} from {mask_url(url)}")
