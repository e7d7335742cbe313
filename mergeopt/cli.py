"""The ``mergeopt`` command line.

Heavy libraries (torch, transformers, optuna's storages) are imported inside the commands that
use them, so that ``mergeopt --help`` answers at once. Every ``UserError`` becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from mergeopt.errors import UserError
from mergeopt.export import PREFERENCE_RULE, ExportFormat

if TYPE_CHECKING:
    from mergeopt.workers import RunSummary

USAGE_ERROR_EXIT = 2  # the same code as a user error: a mistake in what was typed


def _one_device(value: str | None) -> str | None:
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


def _console():  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    return Console()


@zoo_app.command("build")
def zoo_build(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the zoo to.")] = Path("zoo"),
    seed: Annotated[int, typer.Option(help="Training seed; the same seed gives the same zoo.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if OUT_DIR holds an up-to-date zoo.")
    ] = False,
) -> None:
    """Train the model zoo on the CPU: a base and two experts fine-tuned from it (about two
    minutes on two idle cores). An up-to-date zoo in OUT_DIR is kept unless --force."""
    # Before torch is imported: OpenMP threads spin while they wait for a sibling. libgomp's
    # default spin made training on a busy 2-core machine over 10x slower, never spinning
    # (OMP_WAIT_POLICY=PASSIVE) 1.8x slower when idle; a short spin is the fastest both ways
    # (docs/bench/zoo-build-2026-11-30.md).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from mergeopt.zoo import build_zoo, up_to_date_zoo

    existing = None if force else up_to_date_zoo(out_dir, seed=seed)
    if existing is not None:
        built = existing.metadata.get("build_seconds")
        _console().print(
            f"zoo in {existing.root} is up to date (built in {built} s); --force rebuilds it"
        )
        return
    info = build_zoo(out_dir, seed=seed, progress=True)
    _console().print(f"zoo written to {info.root} in {info.metadata['build_seconds']:.0f} s")


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
    console = _console()
    console.print(
        f"study [bold]{study.study_name}[/] in {mask_url(url)}: "
        f"{genome.num_blocks} blocks x {genome.num_experts} experts x "
        f"{len(genome.searched)} parameters = {genome.dimension} dimensions, "
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
    console = _console()
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
        print(f"error: {_work_lost_text(summary)}", file=sys.stderr)
        raise typer.Exit(code=WORK_LOST_EXIT)
    completed = summary.completed_after - summary.completed_before
    rate = f", {60 * completed / summary.seconds:.1f} per minute" if summary.seconds else ""
    console.print(
        f"{completed} trials completed in {summary.seconds:.1f} s{rate} "
        f"({summary.completed_after}/{n_trials} in the study"
        + (f", {summary.restarts} worker restarts" if summary.restarts else "")
        + ")"
    )
    _print_status(study, console, throughput=False)
    _refresh_dashboard(study, console)
    from mergeopt.storage import mask_url

    print(f"inspect: {_dashboard_command()} --host 127.0.0.1 '{mask_url(url)}'")


def _refresh_dashboard(study, console) -> None:  # noqa: ANN001
    """The dashboard's note and plots brought up to date after a command changed the study;
    a database outage leaves them as they were, with one line saying so."""
    from mergeopt.dashboard import refresh_dashboard
    from mergeopt.storage import is_connection_error

    try:
        console.print(refresh_dashboard(study))
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        console.print("dashboard not updated: the database is unreachable")


def _work_lost_text(summary: RunSummary) -> str:
    """One line: what was lost, with the study's complete trials out of those asked for."""
    counts = f"{summary.completed_after}/{summary.n_trials} trials complete"
    if summary.crashed:
        return (
            f"work lost: worker on {', '.join(summary.crashed)} died and was not restarted "
            f"(see above); {counts}; run the same command again to continue"
        )
    return f"work lost: the workers stopped with {counts}; run the same command again to continue"


def _dashboard_command() -> str:
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


def _print_status(study, console, *, throughput: bool = True) -> None:  # noqa: ANN001
    from rich.table import Table

    from mergeopt.report import cost_text, states_text, status_report

    report = status_report(study)
    show_rate = throughput and report["trials_per_minute"]
    console.print(
        f"study [bold]{report['study']}[/]: {states_text(report)}"
        + (f"; {report['trials_per_minute']} trials/min while running" if show_rate else "")
        + (
            f"; merge {report['mean_merge_seconds']} s, eval "
            f"{report['mean_eval_seconds']} s per trial"
            if report["mean_eval_seconds"] is not None
            else ""
        )
    )
    cost = cost_text(report["evaluation_cost"])
    if cost:
        console.print(f"evaluation cost: {cost}")
    if not report["pareto"]:
        return
    title = "Pareto trials" if len(report["objectives"]) > 1 else "Best trial"
    table = Table(title=title)
    table.add_column("trial", justify="right")
    heldout = any(row["heldout"] for row in report["pareto"])
    for objective in report["objectives"]:
        arrow = "↑" if objective["direction"] == "maximize" else "↓"
        table.add_column(f"{objective['name']} {arrow}", justify="right")
        if heldout:
            table.add_column(f"{objective['name']} held-out", justify="right")
    table.add_column("recipe (mean over blocks)")
    for row in report["pareto"]:
        label = f"{row['trial']} ({row['expert']})" if row["expert"] else str(row["trial"])
        cells = []
        for name, value in row["values"].items():
            cells.append(f"{value:.4g}")
            if heldout:
                cells.append(f"{row['heldout'][name]:.4g}" if row["heldout"] else "-")
        table.add_row(label, *cells, row["recipe"])
    console.print(table)
    if heldout and not all(row["heldout"] for row in report["pareto"]):
        console.print(
            f"held-out values of every Pareto trial: mergeopt study evaluate {report['study']} "
            "--heldout --pareto"
        )
    if all(row["expert"] for row in report["pareto"]):
        console.print("no merge beats the experts yet: every trial above is an expert alone")


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
    _print_status(study, _console())


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
            callback=_one_device,
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
    console = _console()
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
    _print_status(study, console, throughput=False)
    _refresh_dashboard(study, console)
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
        str,
        typer.Option(
            "--on",
            help="search or heldout: --best and --preference choose by the values of that split "
            "(heldout: stored by `mergeopt study evaluate NAME --heldout`).",
        ),
    ] = "search",
    fmt: Annotated[str, typer.Option("--format", help="hf, mergekit or both.")] = "both",
    device: Annotated[
        str,
        typer.Option(help="Device that redoes the merge (cpu, cuda).", callback=_one_device),
    ] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    storage: StorageOption = None,
) -> None:
    from mergeopt.export import FORMATS, export_trials, parse_preference, select_trials
    from mergeopt.storage import load_study, resolve_storage_url

    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    url = resolve_storage_url(storage)
    study = load_study(name, url)
    trials = select_trials(
        study,
        trial=trial,
        best=best,
        pareto=pareto,
        preference=parse_preference(preference) if preference is not None else None,
        on=on,
    )
    written = export_trials(
        study,
        trials,
        out,
        fmt=cast("ExportFormat", fmt),  # checked against FORMATS above
        device=device,
        force=force,
        index=pareto,
        storage_url=url,
    )
    console = _console()
    for path in written:
        console.print(f"exported {path}")


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
    console = _console()
    for path in paths:
        console.print(f"wrote {path}")
    if artifact_dir is None and sqlite_path(url) is None:
        console.print("plots not attached to the study: pass --artifact-dir for a server database")
        return
    folder = artifact_dir_for(url, artifact_dir)
    attach_plots(study, paths, artifact_dir=folder)
    print(f"open: {dashboard_command(url, artifact_dir=folder)}")


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
    _console().print(table)


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
    _console().print(f"deleted study {name} from {mask_url(url)}")


@app.command("merge")
def merge(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE.yml", help="A mergekit-format merge config.")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the merged Hugging Face model.")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", callback=_one_device)] = "cpu",
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the random masks of dare_*/della* (an exported trial's YAML names it)."
        ),
    ] = 0,
) -> None:
    """Run a mergekit YAML with mergeopt's engine and write a Hugging Face model folder."""
    from mergeopt.merge.recipe import run_recipe

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder (name a new or empty folder)")
    run_recipe(recipe, out_dir, device=device, seed=seed)
    _console().print(f"merged model written to {out_dir}")


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


if __name__ == "__main__":
    main()
