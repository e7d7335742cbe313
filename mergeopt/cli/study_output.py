"""What study commands print after they change or read a study: the status table and the
dashboard's refreshed plots."""

from __future__ import annotations


def print_status(study, console, *, throughput: bool = True) -> None:  # noqa: ANN001
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
    if report["pareto"]:
        _print_pareto(report, console)
    if report["baselines"]:
        _print_baselines(report, console)


def _print_pareto(report, console) -> None:  # noqa: ANN001
    from rich.table import Table

    title = "Pareto trials" if len(report["objectives"]) > 1 else "Best trial"
    table = Table(title=title)
    table.add_column("trial", justify="right")
    heldout = _objective_columns(table, report, report["pareto"])
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


def _objective_columns(table, report, rows) -> bool:  # noqa: ANN001
    """A column per objective (with its direction), and a held-out column beside each when
    any of ``rows`` has held-out values; returns whether it added those."""
    heldout = any(row["heldout"] for row in rows)
    for objective in report["objectives"]:
        arrow = "↑" if objective["direction"] == "maximize" else "↓"
        table.add_column(f"{objective['name']} {arrow}", justify="right")
        if heldout:
            table.add_column(f"{objective['name']} held-out", justify="right")
    return heldout


def _print_baselines(report, console) -> None:  # noqa: ANN001
    """The preference baselines beside the front: fine-tuned from the base, not merges."""
    from rich.table import Table

    table = Table(title="Preference baselines (fine-tuned from the base: mergeopt baseline)")
    table.add_column("baseline (method, preference)")
    heldout = _objective_columns(table, report, report["baselines"])
    table.add_column("fine-tuning s", justify="right")
    for row in report["baselines"]:
        cells = []
        for objective in report["objectives"]:
            name = objective["name"]
            value = (row["values"] or {}).get(name)
            cells.append(f"{value:.4g}" if value is not None else "-")
            if heldout:
                held = (row["heldout"] or {}).get(name)
                cells.append(f"{held:.4g}" if held is not None else "-")
        seconds = row["train_seconds"]
        table.add_row(row["label"], *cells, f"{seconds:.1f}" if seconds is not None else "-")
    console.print(table)


def refresh_dashboard(study, console) -> None:  # noqa: ANN001
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
