"""Export: chosen trials of a study -> runnable Hugging Face model folders and mergekit YAML.

Which trials (:func:`select_trials`): one trial by number, the best trial on one objective,
every Pareto-optimal trial, or the Pareto trial nearest a preference vector
(:data:`PREFERENCE_RULE`).

What is written (:func:`export_trials`), per trial:

- ``hf``: the merged model as ``save_pretrained`` writes it (sharded safetensors, config), plus
  the base's tokenizer and generation config — the merge is redone with the trial's recipe and
  seed by the same :class:`~mergeopt.merge.engine.MergeEngine` the workers use, into the base
  model loaded in the scorer's dtype, so the folder holds the weights the trial was scored with;
- ``mergekit``: ``mergekit_config.yml``, which ``mergekit-yaml`` turns into the same weights
  (per-block values as per-layer filter entries, see :func:`mergeopt.genome.to_mergekit_config`);
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.report import heldout_values, objective_names
from mergeopt.staging import staged_folder
from mergeopt.study import complete_trial

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from mergeopt.blocks import BlockLayout
    from mergeopt.spec import StudySpec

ExportFormat = Literal["hf", "mergekit", "both"]
FORMATS: tuple[str, ...] = ("hf", "mergekit", "both")
MERGEKIT_CONFIG = "mergekit_config.yml"
METADATA = "mergeopt.json"
INDEX_JSON = "index.json"
INDEX_MD = "index.md"
MAX_SHARD_SIZE = "5GB"

PREFERENCE_RULE = (
    "Among the Pareto-optimal trials, each objective is rescaled to a regret in [0, 1] "
    "(0 = the best value on the front, 1 = the worst, direction-aware); the weights are "
    "divided by their sum, and the trial with the smallest max_k(w_k * regret_k) (weighted "
    "Chebyshev distance to the ideal point) is chosen; ties go to the smaller weighted sum of "
    "regrets, then to the lower trial number. A larger weight pulls the choice towards that "
    "objective's best value. With --on heldout, the trials are the Pareto trials that are "
    "also Pareto-optimal on their held-out values, and regrets are taken on held-out values."
)
SPLITS: tuple[str, ...] = ("search", "heldout")


# --------------------------------------------------------------------------- choosing trials


def select_trials(
    study: optuna.Study,
    *,
    trial: int | None = None,
    best: str | None = None,
    pareto: bool = False,
    preference: Sequence[float] | None = None,
    on: str = "search",
) -> list[FrozenTrial]:
    """The COMPLETE trials to export, chosen by exactly one of the keyword arguments.

    Args:
        trial: that trial number.
        best: the best trial on the objective of that name (lowest number among equals);
            ``""`` names the only objective of a single-objective study.
        pareto: every Pareto-optimal trial, in trial-number order.
        preference: one non-negative weight per objective; see :data:`PREFERENCE_RULE`.
        on: ``"search"`` (the values the study optimized) or ``"heldout"``: ``best`` and
            ``preference`` choose by the held-out values ``study evaluate --heldout`` stored.

    Raises:
        UserError: no or several choices, no COMPLETE trials, an unknown trial or objective,
            a missing objective name on a multi-objective study, a preference of wrong length.
    """
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    chosen = [trial is not None, best is not None, pareto, preference is not None]
    if sum(chosen) != 1:
        raise UserError("choose exactly one of --trial N, --best OBJECTIVE, --pareto, --preference")
    if on not in SPLITS:
        raise UserError(f"--on: expected one of {', '.join(SPLITS)}, got {on!r}")
    if on == "heldout" and (trial is not None or pareto):
        raise UserError("--on heldout chooses by --best or --preference")
    name = study.study_name
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if trial is not None:
        return [complete_trial(study, trial, done_to_it="be exported")]
    if not complete:
        raise UserError(f"study {name!r} has no COMPLETE trials to export")
    names = objective_names(study)
    if best is not None:
        if best == "" and len(names) > 1:
            raise UserError(
                f"study {name!r} has {len(names)} objectives ({', '.join(names)}): "
                "--best needs an objective name"
            )
        index = 0 if best == "" else _objective_index(names, best, name)
        maximize = study.directions[index] == StudyDirection.MAXIMIZE
        value_of = _values_on(on, names)
        if on == "heldout":
            complete = [t for t in complete if heldout_values(t, names) is not None]
            if not complete:
                raise UserError(
                    f"no trial of study {name!r} has held-out values; first run: "
                    f"mergeopt study evaluate {name} --heldout --pareto"
                )
        ordered = sorted(
            complete, key=lambda t: ((-1 if maximize else 1) * value_of(t)[index], t.number)
        )
        return [ordered[0]]
    front = sorted(study.best_trials, key=lambda t: t.number)
    if pareto:
        return front
    assert preference is not None
    if on == "heldout":
        missing = [t.number for t in front if heldout_values(t, names) is None]
        if missing:
            raise UserError(
                f"Pareto trial{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} of study {name!r} "
                f"{'have' if len(missing) > 1 else 'has'} no held-out values; first run: "
                f"mergeopt study evaluate {name} --heldout --pareto"
            )
        front = non_dominated(front, study.directions, _values_on(on, names))
    return [
        preference_trial(
            front, study.directions, preference, names=names, value_of=_values_on(on, names)
        )
    ]


def _values_on(on: str, names: Sequence[str]) -> Callable[[FrozenTrial], Sequence[float]]:
    """A trial's objective values: those the study searched on, or its held-out values."""
    if on == "heldout":
        return lambda t: heldout_values(t, names) or []
    return lambda t: list(t.values)


def non_dominated(
    trials: Sequence[FrozenTrial],
    directions: Sequence[Any],
    value_of: Callable[[FrozenTrial], Sequence[float]],
) -> list[FrozenTrial]:
    """The trials no other of ``trials`` dominates on ``value_of`` (at least as good on every
    objective, better on one), in their order."""
    from optuna.study import StudyDirection

    signs = [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions]
    costs = [[s * float(v) for s, v in zip(signs, value_of(t), strict=True)] for t in trials]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return [
        t for t, c in zip(trials, costs, strict=True) if not any(dominates(o, c) for o in costs)
    ]


def _objective_index(names: Sequence[str], wanted: str, study_name: str) -> int:
    if wanted not in names:
        raise UserError(
            f"study {study_name!r} has no objective {wanted!r} (objectives: {', '.join(names)})"
        )
    return list(names).index(wanted)


def preference_trial(
    front: Sequence[FrozenTrial],
    directions: Sequence[Any],
    preference: Sequence[float],
    *,
    names: Sequence[str] | None = None,
    value_of: Callable[[FrozenTrial], Sequence[float]] | None = None,
) -> FrozenTrial:
    """The trial of ``front`` with the least weighted Chebyshev regret (:data:`PREFERENCE_RULE`).

    A weighted Chebyshev scalarization reaches every Pareto-optimal point, also on non-convex
    fronts (Miettinen, *Nonlinear Multiobjective Optimization*, 1999, ch. 3.4); the preference
    vector plays the role it has in preference-aware model merging ("You Only Merge Once",
    Chen & Kwok, 2024, arXiv 2408.12105).

    Args:
        front: Pareto-optimal COMPLETE trials (``values`` of length M).
        directions: M ``optuna.study.StudyDirection`` values.
        preference: M non-negative weights, not all zero.
        value_of: the values to compare (default: ``trial.values``; held-out values for
            ``--on heldout``).
    """
    from optuna.study import StudyDirection

    count = len(directions)
    labels = ", ".join(names) if names else f"{count} objectives"
    if len(preference) != count:
        raise UserError(
            f"--preference has {len(preference)} weights; the study has {count} objectives "
            f"({labels})"
        )
    if any(not w >= 0 for w in preference) or sum(preference) <= 0:
        raise UserError("--preference weights must be non-negative numbers, not all zero")
    if not front:
        raise UserError("there are no Pareto-optimal trials to choose from")
    total = float(sum(preference))
    weights = [float(w) / total for w in preference]
    regrets: list[list[float]] = [[0.0] * count for _ in front]
    for k, direction in enumerate(directions):
        values = [float((value_of(t) if value_of else t.values)[k]) for t in front]
        low, high = min(values), max(values)
        span = high - low
        for i, value in enumerate(values):
            if span <= 0:
                continue
            best_side = high if direction == StudyDirection.MAXIMIZE else low
            regrets[i][k] = abs(best_side - value) / span

    def score(i: int) -> tuple[float, float, int]:
        weighted = [w * r for w, r in zip(weights, regrets[i], strict=True)]
        return (max(weighted), sum(weighted), front[i].number)

    return front[min(range(len(front)), key=score)]


def parse_preference(text: str) -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``; a one-line UserError for anything else."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(
            f"--preference {text!r}: expected comma-separated numbers, e.g. 0.7,0.3"
        ) from None


# --------------------------------------------------------------------------- what is written


def trial_recipe(study: optuna.Study, trial: FrozenTrial) -> list[list[dict[str, float]]]:
    """The per-block, per-expert merge parameters of a trial (stored, else from its params)."""
    from mergeopt.study import stored_genome

    recipe = attrs.RECIPE.get(trial)
    if recipe is not None:
        return [[{k: float(v) for k, v in e.items()} for e in block] for block in recipe]
    return stored_genome(study).block_params(trial.params)


def trial_seed(trial: FrozenTrial) -> int:
    """The merge seed a trial was run with (0 for trials stored without one)."""
    return int(attrs.SEED.get(trial) or 0)


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
        "seed": trial_seed(trial),
        "params": dict(trial.params),
        "recipe": trial_recipe(study, trial),
        "format": fmt,
        "mergeopt_version": __version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def mergekit_config(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The mergekit configuration (dict) that reproduces a trial's merged weights."""
    from mergeopt.genome import to_mergekit_config
    from mergeopt.study import stored_layout, stored_spec

    spec = stored_spec(study)
    if spec.merge.method == "slerp":
        raise UserError("mergekit export of slerp recipes is not supported; use --format hf")
    return to_mergekit_config(
        trial_recipe(study, trial),
        layer_blocks=stored_layout(study).layer_blocks,
        base_model=spec.models.base,
        experts=list(spec.models.experts),
        method=spec.merge.method,
        method_params=dict(spec.merge.parameters),
        dtype=spec.merge.dtype,
    )


def write_mergekit_config(config: Mapping[str, Any], path: Path, *, header: str = "") -> None:
    import yaml

    text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    path.write_text((header + text) if header else text, encoding="utf-8")


class HFModelWriter:
    """The base model in the scorer's dtype, re-merged per trial and saved with ``save_pretrained``.

    One resident :class:`~mergeopt.merge.engine.MergeEngine` serves every exported trial, so a
    Pareto export loads base and experts once.
    """

    def __init__(self, *, spec: StudySpec, layout: BlockLayout, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from mergeopt.merge.engine import MergeEngine, ModuleTarget
        from mergeopt.models import resolve_model

        # The CLI says what it exported; loading/writing bars would bury an error line.
        transformers_logging.disable_progress_bar()

        self.base = resolve_model(spec.models.base)
        remote = spec.models.trust_remote_code
        self.model = AutoModelForCausalLM.from_pretrained(
            self.base, dtype=getattr(torch, spec.scorer.dtype), trust_remote_code=remote
        )
        self.model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to badly
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base, trust_remote_code=remote)
        self.engine = MergeEngine(
            base=self.base,
            experts=[resolve_model(e) for e in spec.models.experts],
            layout=layout,
            method=spec.merge.method,
            method_params=dict(spec.merge.parameters),
            device=device,
            dtype=getattr(torch, spec.merge.dtype),
        )
        self.target = ModuleTarget(module=self.model)

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
        trials: from :func:`select_trials`.
        out_dir: the model folder of a single trial, or (``index``) the folder holding one
            ``trial-NNNN`` sub-folder per trial plus ``index.json`` and ``index.md``.
        fmt: ``hf`` (model folder), ``mergekit`` (``mergekit_config.yml``) or ``both``.
        device: where the merge runs for ``hf`` (``cpu``, ``cuda:0``, ...).
        force: replace an existing ``out_dir`` (only once the new export is complete).
        index: sub-folders and index files; default: when more than one trial is exported.
        storage_url: recorded, with its password masked, in ``mergeopt.json``.
    """
    from mergeopt.study import stored_layout, stored_spec

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not trials:
        raise UserError(f"nothing to export from study {study.study_name!r}")
    out_dir = Path(out_dir)
    use_index = len(trials) > 1 if index is None else index
    spec = stored_spec(study)
    configs = (
        {t.number: mergekit_config(study, t) for t in trials} if fmt != "hf" else {}
    )  # computed first: a recipe mergekit cannot express fails before anything is written
    folders = [out_dir / trial_folder_name(t) if use_index else out_dir for t in trials]
    randomized = _is_randomized(spec.merge.method)
    with atomic_folder(out_dir, force=force) as staging:
        writer = (
            HFModelWriter(spec=spec, layout=stored_layout(study), device=device)
            if (fmt != "mergekit")
            else None
        )
        for trial in trials:
            folder = staging / trial_folder_name(trial) if use_index else staging
            folder.mkdir(exist_ok=True)
            if writer is not None:
                writer.write(trial_recipe(study, trial), seed=trial_seed(trial), folder=folder)
            if trial.number in configs:
                write_mergekit_config(
                    configs[trial.number],
                    folder / MERGEKIT_CONFIG,
                    header=_mergekit_header(study, trial, randomized=randomized),
                )
            metadata = trial_metadata(study, trial, storage_url=storage_url, fmt=fmt)
            (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", "utf-8")
        if use_index:
            _write_index(study, trials, staging, fmt=fmt, storage_url=storage_url)
    return folders


def _is_randomized(method: str) -> bool:
    from mergeopt.merge.methods import get_method

    try:
        return get_method(method).randomized
    except ValueError:
        return False


def _mergekit_header(study: optuna.Study, trial: FrozenTrial, *, randomized: bool) -> str:
    lines = [f"# study {study.study_name}, trial {trial.number} (mergeopt export)"]
    if randomized:
        seed = trial_seed(trial)
        lines += [
            f"# merge seed {seed}: mergekit-yaml draws the random masks from its global RNG, so",
            "# it reproduces these weights only in distribution; the exact weights:",
            f"#   mergeopt merge mergekit_config.yml OUT --seed {seed}",
        ]
    return "\n".join(lines) + "\n"


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
