"""optuna-dashboard support: the study's plots as study artifacts, and the command to run.

optuna-dashboard reads objective names (``study.set_metric_names``) and every trial's
user_attrs (recipe, metrics, timings) from the database itself. Files are not in the database:
Optuna keeps artifacts in an artifact store and only their metadata (``artifacts:<id>`` study
system attrs) in the study. mergeopt uses a :class:`optuna.artifacts.FileSystemArtifactStore`
in a folder beside the SQLite file (``studies.db`` -> ``studies.artifacts/``); for a server
database the folder must be named. ``optuna-dashboard --artifact-dir`` then serves the plots
in the study's *Artifacts* tab.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mergeopt.errors import UserError
from mergeopt.optuna_compat import set_study_system_attr, study_artifact_attrs, study_system_attrs

if TYPE_CHECKING:
    import optuna

ARTIFACTS_SUFFIX = ".artifacts"


def sqlite_path(storage_url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None for other backends."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage_url)
    except (ArgumentError, ValueError):
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def artifact_dir_for(storage_url: str, artifact_dir: Path | None = None) -> Path:
    """``artifact_dir`` if given, else ``<db stem>.artifacts`` beside a SQLite file.

    Raises:
        UserError: a server database (PostgreSQL, MySQL) and no ``artifact_dir``.
    """
    if artifact_dir is not None:
        return Path(artifact_dir)
    database = sqlite_path(storage_url)
    if database is None:
        from mergeopt.storage import mask_url

        raise UserError(
            f"storage {mask_url(storage_url)} is not a SQLite file: name a shared folder "
            "for the plots with --artifact-dir"
        )
    return database.parent / f"{database.stem}{ARTIFACTS_SUFFIX}"


def register_artifacts(
    study: optuna.Study, paths: Sequence[Path], *, artifact_dir: Path
) -> list[str]:
    """Upload files as artifacts of the study; returns their artifact ids.

    A file whose name the study already holds as an artifact replaces it (the old file is
    removed from the store and its metadata set to ``null``, as optuna-dashboard's own delete
    does), so running ``mergeopt study plot`` again does not pile up copies.
    """
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    artifact_dir = Path(artifact_dir)
    try:
        artifact_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create artifact folder {artifact_dir}: {exc.strerror}") from None
    store = FileSystemArtifactStore(str(artifact_dir))
    names = {Path(p).name for p in paths}
    for key, value in study_artifact_attrs(study).items():
        meta = json.loads(value) if isinstance(value, str) else value
        if isinstance(meta, dict) and meta.get("filename") in names:
            with contextlib.suppress(ArtifactNotFound):  # already gone from the store
                store.remove(meta["artifact_id"])
            set_study_system_attr(study, key, json.dumps(None))
    return [
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
        for path in paths
    ]


def attach_plots(study: optuna.Study, paths: Sequence[Path], *, artifact_dir: Path) -> None:
    """Make ``paths`` the study's plots in optuna-dashboard, refresh its note, and remember
    ``artifact_dir`` so that the end of every ``study run`` refreshes both."""
    from mergeopt import attrs

    register_artifacts(study, paths, artifact_dir=artifact_dir)
    set_study_system_attr(study, attrs.ARTIFACT_DIR, str(Path(artifact_dir).resolve()))
    write_study_note(study)


def refresh_dashboard(study: optuna.Study) -> str:
    """Bring what optuna-dashboard shows up to date after a run; returns one line to print.

    The note (Pareto recipes, trial count) is rewritten every time. The plots are drawn
    again and replace the old ones if ``study plot`` attached plots before; where that fails
    (the artifact folder is not reachable from this machine), the line says the plots are
    stale and how to refresh them.
    """
    import tempfile

    from mergeopt import attrs
    from mergeopt.plots import plot_study

    write_study_note(study)
    folder = study_system_attrs(study).get(attrs.ARTIFACT_DIR)
    if folder is None:
        return f"dashboard note updated; plots: mergeopt study plot {study.study_name} --out DIR"
    refresh = f"mergeopt study plot {study.study_name} --out DIR --artifact-dir {folder}"
    if not Path(folder).is_dir():
        return f"dashboard plots are stale ({folder} not found here); refresh: {refresh}"
    try:
        with tempfile.TemporaryDirectory(prefix="mergeopt-plots-") as scratch:
            paths = plot_study(study, Path(scratch))
            register_artifacts(study, paths, artifact_dir=Path(folder))
    except (OSError, UserError) as exc:
        return f"dashboard plots are stale ({exc}); refresh: {refresh}"
    return f"dashboard note and plots updated in {folder}"


def dashboard_command(
    storage_url: str, *, artifact_dir: Path | None = None, port: int = 8080
) -> str:
    """The shell command that opens the dashboard on this machine only (127.0.0.1)."""
    from mergeopt.storage import mask_url

    parts = ["optuna-dashboard", "--host", "127.0.0.1", "--port", str(port)]
    if artifact_dir is not None:
        parts += ["--artifact-dir", str(artifact_dir)]
    parts.append(mask_url(storage_url))
    return shlex.join(parts)


def study_note_markdown(study: optuna.Study, *, max_trials: int = 12) -> str:
    """A Markdown note for the dashboard: what the study searches, its evaluation cost, and its
    Pareto trials' values (held-out beside search where evaluated) and recipes as block x expert
    tables (at most ``max_trials``, best first objective first)."""
    from mergeopt import attrs
    from mergeopt.blocks import BlockLayout
    from mergeopt.plots import block_labels, pareto_trials_for_heatmap
    from mergeopt.report import cost_text, evaluation_cost, heldout_values, objective_names

    spec = attrs.SPEC.get(study) or {}
    merge = spec.get("merge") or {}
    models = spec.get("models") or {}
    experts = [Path(str(e)).name for e in models.get("experts") or []]
    names = objective_names(study)
    from optuna.trial import TrialState

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    lines = [f"## mergeopt study `{study.study_name}`", ""]
    lines += [f"Updated {time.strftime('%Y-%m-%d %H:%M')} with {complete} complete trials.", ""]
    cost = cost_text(evaluation_cost(study.get_trials(deepcopy=False)))
    if cost:
        lines += [f"Evaluation cost: {cost}.", ""]
    if merge:
        lines.append(
            f"**{merge.get('method')}** merge of {', '.join(experts) or 'the experts'} into "
            f"{Path(str(models.get('base', 'the base'))).name}; searched per block and expert: "
            f"{', '.join(merge.get('search') or {})}."
        )
    layout = attrs.LAYOUT.get(study)
    if layout is not None:
        blocks = BlockLayout.from_dict(layout)
        labels = block_labels(study, blocks.num_blocks)
        lines.append(f"Blocks: {', '.join(labels)} (outer = embeddings, final norm, LM head).")
    lines += ["", "| objective | direction | task | metric |", "|---|---|---|---|"]
    objectives = {o.get("name"): o for o in spec.get("objectives") or []}
    for name, direction in zip(names, study.directions, strict=False):
        objective = objectives.get(name, {})
        task = Path(str(objective.get("task", ""))).name
        lines.append(
            f"| {name} | {direction.name.lower()} | {task} | {objective.get('metric', '')} |"
        )
    lines += ["", "Plots (`mergeopt study plot`): see *Study Artifacts* below.", ""]
    lines += _baselines_markdown(study, names)
    trials = pareto_trials_for_heatmap(study)[:max_trials]
    for trial in trials:
        values = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, trial.values, strict=False))
        held = heldout_values(trial, names)
        if held is not None:
            values += "; held-out: " + ", ".join(
                f"{n} = {v:.4g}" for n, v in zip(names, held, strict=True)
            )
        lines += [f"### Trial {trial.number}: {values}", ""]
        recipe = attrs.RECIPE.read(trial)
        searched = [p for p in merge.get("search") or {} if p in recipe[0][0]]
        params = searched or sorted(recipe[0][0])  # fixed parameters are the same everywhere
        header = [f"{expert} {param}" for expert in experts or ["e0"] for param in params]
        if len(header) != len(recipe[0]) * len(params):
            header = [f"e{e} {p}" for e in range(len(recipe[0])) for p in params]
        lines += ["| block | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for label, block in zip(block_labels(study, len(recipe)), recipe, strict=True):
            cells = [f"{expert[p]:.3f}" for expert in block for p in params]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _baselines_markdown(study: optuna.Study, names: Sequence[str]) -> list[str]:
    """The preference baselines (``mergeopt baseline``) as a table, beside the merge front."""
    from mergeopt.report import baseline_rows

    rows = baseline_rows(study, names)
    if not rows:
        return []
    lines = [
        "### Preference baselines (fine-tuned from the base)",
        "",
        "| baseline | " + " | ".join(names) + " | held-out | fine-tuning s |",
        "|---" * (len(names) + 3) + "|",
    ]
    for row in rows:
        values = row["values"] or {}
        held = row["heldout"]
        held_text = ", ".join(f"{held[n]:.4g}" for n in names) if held else "-"
        seconds = row["train_seconds"]
        lines.append(
            f"| {row['label']} | "
            + " | ".join(f"{values[n]:.4g}" if n in values else "-" for n in names)
            + f" | {held_text} | {seconds if seconds is not None else '-'} |"
        )
    return [*lines, ""]


def write_study_note(study: optuna.Study) -> None:
    """Replace the study's optuna-dashboard note with :func:`study_note_markdown`."""
    from optuna_dashboard import save_note

    save_note(study, study_note_markdown(study))
