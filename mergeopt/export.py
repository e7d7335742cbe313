"""Export: chosen trials of a study -> runnable Hugging Face model folders and mergekit YAML.

Which trials: :func:`mergeopt.export_choice.select_trials`.

What is written (:func:`export_trials`), per trial:

- ``hf``: the merged model as ``save_pretrained`` writes it (sharded safetensors, config), plus
  the base's tokenizer and generation config — the merge is redone with the trial's recipe and
  seed by the same :class:`~mergeopt.merge.engine.MergeEngine` the workers use, into the base
  model loaded in the scorer's dtype, so the folder holds the weights the trial was scored with;
- ``mergekit``: ``mergekit_config.yml``, which ``mergekit-yaml`` turns into the same weights
  (per-block values as per-layer filter entries, see :mod:`mergeopt.export_mergekit`);
- both: ``mergeopt.json`` (study, trial number, objective values, metrics, recipe, seed, masked
  storage URL).

Several trials (``--pareto``) go into one sub-folder each (``trial-0007``) beside
``index.json`` and ``index.md``. Everything is first written into a hidden temporary folder in
the same parent and renamed into place at the end, so an interrupted export leaves at most a
``.NAME.tmp-*`` folder, never something that looks like a finished export.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.export_dataflow import (
    dataflow_mergekit_config,
    dataflow_metadata,
    write_dataflow_model,
)
from mergeopt.export_mergekit import (
    MERGEKIT_CONFIG,
    is_randomized,
    mergekit_config,
    mergekit_header,
    write_mergekit_config,
)
from mergeopt.report import heldout_values, objective_names
from mergeopt.staging import staged_folder
from mergeopt.study import trial_path, trial_recipe, trial_seed

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from mergeopt.blocks import BlockLayout
    from mergeopt.spec import StudySpec

ExportFormat = Literal["hf", "mergekit", "both"]
FORMATS: tuple[str, ...] = ("hf", "mergekit", "both")
METADATA = "mergeopt.json"
INDEX_JSON = "index.json"
INDEX_MD = "index.md"
MAX_SHARD_SIZE = "5GB"

# --------------------------------------------------------------------------- what is written


def trial_metadata(
    study: optuna.Study,
    trial: FrozenTrial,
    *,
    storage_url: str | None = None,
    fmt: str | None = None,
) -> dict[str, Any]:
    """The content of ``mergeopt.json``: where a trial came from and how it scored."""
    from mergeopt import __version__
    from mergeopt.storage import mask_url
    from mergeopt.study import stored_layout, stored_spec

    spec = stored_spec(study)
    names = objective_names(study)
    return {
        "study": study.study_name,
        "trial": trial.number,
        "storage": mask_url(storage_url) if storage_url else None,
        "objectives": {
            name: {"value": value, "direction": direction.name.lower()}
            for name, value, direction in zip(
                names, trial.values or [], study.directions, strict=False
            )
        },
        "metrics": attrs.METRICS.get(trial),
        "raw_values": attrs.RAW_VALUES.get(trial),
        "heldout_values": attrs.HELDOUT_VALUES.get(trial),
        "method": spec.merge.method,
        "method_parameters": dict(spec.merge.parameters),
        "merge_dtype": spec.merge.dtype,
        "weights_dtype": spec.scorer.dtype,
        "base": spec.models.base,
        "experts": list(spec.models.experts),
        "layout": stored_layout(study).to_dict(),
        "seed": trial_seed(study, trial),
        "params": dict(trial.params),
        **(
            dataflow_metadata(trial_path(study, trial), spec)
            if spec.merge.space == "dataflow"
            else {"recipe": trial_recipe(study, trial)}
        ),
        "format": fmt,
        "mergeopt_version": __version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class HFModelWriter:
    """The base model in the scorer's dtype, re-merged per trial and saved with ``save_pretrained``
    (a study scored by the ``classifier`` backend: a sequence classifier with the merged,
    zero-padded head; its tasks' own heads are not exported).

    One resident :class:`~mergeopt.merge.engine.MergeEngine` serves every exported trial, so a
    Pareto export loads base and experts once.
    """

    def __init__(self, *, spec: StudySpec, layout: BlockLayout, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from mergeopt.merge.engine import MergeEngine, MergeTarget, ModuleTarget
        from mergeopt.models import resolve_model

        # The CLI says what it exported; loading/writing bars would bury an error line.
        transformers_logging.disable_progress_bar()

        self.base = resolve_model(spec.models.base)
        remote = spec.models.trust_remote_code
        self.target: MergeTarget
        if spec.scorer.backend == "classifier":
            # A sequence classifier with the merged head, zero-padded to the largest expert's
            # (the resident scorer's model, whose head takes the merged head's label count).
            from mergeopt.objectives.scorers.classifier import ClassifierScorer

            classifier = ClassifierScorer(
                model_dir=self.base,
                device=device,
                dtype=spec.scorer.dtype,
                trust_remote_code=remote,
            )
            self.model, self.tokenizer = classifier.model, classifier.tokenizer
            self.target = classifier.merge_target()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.base, dtype=getattr(torch, spec.scorer.dtype), trust_remote_code=remote
            )
            self.model.to(device).eval()
            self.model.requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(self.base, trust_remote_code=remote)
            self.target = ModuleTarget(module=self.model)
        self.engine = MergeEngine(
            base=self.base,
            experts=[resolve_model(e) for e in spec.models.experts],
            layout=layout,
            method=spec.merge.method,
            method_params=dict(spec.merge.parameters),
            device=device,
            dtype=getattr(torch, spec.merge.dtype),
        )

    def write(self, block_params: list[list[dict[str, float]]], *, seed: int, folder: Path) -> None:
        """Merge ``block_params`` (with ``seed``) into the model and save it into ``folder``."""
        self.engine.merge(block_params, target=self.target, seed=seed)
        self.model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
        self.tokenizer.save_pretrained(folder)
        generation_config = self.base / "generation_config.json"
        if generation_config.is_file():
            shutil.copyfile(generation_config, folder / "generation_config.json")


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_folder(out_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that becomes ``out_dir`` when the block succeeds.

    The temporary folder is hidden (``mergeopt.staging``: ``.NAME.tmp-<random>``) and removed
    on any exception; an existing ``out_dir`` is replaced only with ``force`` and only after
    the new one is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; choose another --out or pass --force")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; --force replaces folders only")
    created = _first_missing_ancestor(out_dir.parent)  # removed again if the export fails
    entered = False
    try:
        with staged_folder(out_dir, replace=force) as staging:
            entered = True
            yield staging
    except BaseException as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if not entered and isinstance(exc, OSError):
            raise UserError(
                f"export to {out_dir}: cannot create {out_dir.parent}: {_reason(exc)}"
            ) from None
        if not isinstance(exc, UserError) and _is_write_failure(exc):
            raise UserError(f"export to {out_dir}: {_reason(exc)}") from None
        raise


def _first_missing_ancestor(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None if it does)."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _is_write_failure(exc: BaseException) -> bool:
    """An OS-level write failure (disk full, file too large, read-only or lost folder), also
    when safetensors' Rust writer reports it as a ``SafetensorError``."""
    if isinstance(exc, OSError):
        return True
    return (
        exc.__class__.__name__ == "SafetensorError" and _SAFETENSORS_IO.search(str(exc)) is not None
    )


# safetensors reports "Error while serializing: I/O error: No space left on device (os error 28)"
_SAFETENSORS_IO = re.compile(r"(?:I/O error|IoError)\W+(?:.*?message: \")?([^\"(]+)")


def _reason(exc: BaseException) -> str:
    """``no space left on device`` from an OSError or safetensors' I/O error."""
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else None
    if message is None:
        match = _SAFETENSORS_IO.search(str(exc))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = match.group(1).strip() if match else first or exc.__class__.__name__
    return message[:1].lower() + message[1:]


def trial_folder_name(trial: FrozenTrial) -> str:
    return f"trial-{trial.number:04d}"


def export_format(spec: StudySpec, fmt: ExportFormat) -> tuple[ExportFormat, str | None]:
    """The format an export of ``spec``'s study writes for ``fmt``, and a note when it writes
    less than asked. A ``classifier`` study merges a masked-LM base with experts whose heads
    are zero-padded to the widest: no mergekit config reproduces that (mergekit-yaml wants
    ``--allow-crimes``, and the base has no pooler or head), so ``mergekit`` is refused and
    ``both`` writes the hf folder only."""
    if spec.scorer.backend != "classifier":
        return fmt, None
    if fmt == "mergekit":
        raise UserError(
            "--format mergekit: a classifier study's merge (zero-padded heads on a masked-LM "
            "base) has no mergekit config; export --format hf"
        )
    if fmt == "both":
        return "hf", "note: a classifier study has no mergekit config: writing the hf folder only"
    return fmt, None


def export_trials(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    out_dir: Path,
    *,
    fmt: ExportFormat = "hf",
    device: str = "cpu",
    force: bool = False,
    index: bool | None = None,
    storage_url: str | None = None,
) -> list[Path]:
    """Write the chosen trials into ``out_dir`` atomically; returns each trial's folder.

    Args:
        trials: from :func:`mergeopt.export_choice.select_trials`.
        out_dir: the model folder of a single trial, or (``index``) the folder holding one
            ``trial-NNNN`` sub-folder per trial plus ``index.json`` and ``index.md``.
        fmt: ``hf`` (model folder), ``mergekit`` (``mergekit_config.yml``) or ``both``.
        device: where the merge runs for ``hf`` (``cpu``, ``cuda:0``, ...).
        force: replace an existing ``out_dir`` (only once the new export is complete).
        index: sub-folders and index files; default: when more than one trial is exported.
        storage_url: recorded, with its password masked, in ``mergeopt.json``.
    """
    from mergeopt.models import resolve_model
    from mergeopt.study import stored_layout, stored_spec

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not trials:
        raise UserError(f"nothing to export from study {study.study_name!r}")
    out_dir = Path(out_dir)
    use_index = len(trials) > 1 if index is None else index
    spec = stored_spec(study)
    fmt, _ = export_format(spec, fmt)  # the CLI prints the note
    dataflow = spec.merge.space == "dataflow"
    sources = [spec.models.base, *spec.models.experts]
    configs = (
        {
            t.number: (
                dataflow_mergekit_config(
                    trial_path(study, t), sources=sources, dtype=spec.scorer.dtype
                )
                if dataflow
                else mergekit_config(study, t)
            )
            for t in trials
        }
        if fmt != "hf"
        else {}
    )  # computed first: a recipe mergekit cannot express fails before anything is written
    folders = [out_dir / trial_folder_name(t) if use_index else out_dir for t in trials]
    randomized = is_randomized(spec.merge.method)
    with atomic_folder(out_dir, force=force) as staging:
        writer = (
            HFModelWriter(spec=spec, layout=stored_layout(study), device=device)
            if fmt != "mergekit" and not dataflow
            else None
        )
        for trial in trials:
            folder = staging / trial_folder_name(trial) if use_index else staging
            folder.mkdir(exist_ok=True)
            if dataflow and fmt != "mergekit":
                write_dataflow_model(
                    trial_path(study, trial),
                    sources=[resolve_model(s) for s in sources],
                    dtype=spec.scorer.dtype,
                    folder=folder,
                )
            if writer is not None:
                writer.write(
                    trial_recipe(study, trial), seed=trial_seed(study, trial), folder=folder
                )
            if trial.number in configs:
                write_mergekit_config(
                    configs[trial.number],
                    folder / MERGEKIT_CONFIG,
                    header=mergekit_header(study, trial, randomized=randomized),
                )
            metadata = trial_metadata(study, trial, storage_url=storage_url, fmt=fmt)
            (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", "utf-8")
        if use_index:
            _write_index(study, trials, staging, fmt=fmt, storage_url=storage_url)
    return folders


def _write_index(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    folder: Path,
    *,
    fmt: str,
    storage_url: str | None,
) -> None:
    from mergeopt.report import recipe_summary
    from mergeopt.storage import mask_url
    from mergeopt.study import stored_genome

    names = objective_names(study)
    directions = [d.name.lower() for d in study.directions]
    genome = stored_genome(study)
    rows: list[dict[str, Any]] = [
        {
            "trial": t.number,
            "folder": trial_folder_name(t),
            "values": dict(zip(names, t.values or [], strict=False)),
            "heldout": (
                None
                if (held := heldout_values(t, names)) is None
                else dict(zip(names, held, strict=True))
            ),
            "recipe": recipe_summary(t.params, genome),
        }
        for t in trials
    ]
    with_heldout = any(row["heldout"] for row in rows)
    index = {
        "study": study.study_name,
        "storage": mask_url(storage_url) if storage_url else None,
        "format": fmt,
        "objectives": [{"name": n, "direction": d} for n, d in zip(names, directions, strict=True)],
        "trials": rows,
    }
    (folder / INDEX_JSON).write_text(json.dumps(index, indent=2) + "\n", "utf-8")
    arrows = ["↑" if d == "maximize" else "↓" for d in directions]
    header = ["trial", "folder"]
    for n, a in zip(names, arrows, strict=True):
        header += [f"{n} {a}", f"{n} held-out"] if with_heldout else [f"{n} {a}"]
    lines = [
        f"# Pareto trials of study `{study.study_name}`",
        "",
        *(
            [
                "Each objective on the split the study searched on and, beside it, on the "
                "held-out split (`mergeopt study evaluate --heldout`; - where not evaluated).",
                "",
            ]
            if with_heldout
            else []
        ),
        "| " + " | ".join([*header, "recipe (mean over blocks)"]) + " |",
        "|" + "---|" * (len(header) + 1),
    ]
    for row in rows:
        values = []
        for n in names:
            values.append(f"{row['values'][n]:.4g}")
            if with_heldout:
                values.append(f"{row['heldout'][n]:.4g}" if row["heldout"] else "-")
        lines.append(
            f"| {row['trial']} | [{row['folder']}]({row['folder']}/) | "
            + " | ".join(values)
            + f" | {row['recipe']} |"
        )
    (folder / INDEX_MD).write_text("\n".join(lines) + "\n", "utf-8")
