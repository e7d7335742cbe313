"""A Mixture-of-Experts model from chosen trials: each trial's merged model is one expert of a
``mergekit-moe`` build (``study export NAME --moe``).

The router: with ``gate_mode: hidden`` (mergekit's default) or ``cheap_embed`` each expert's
router row is initialized from positive prompts, here the first :data:`PROMPTS_PER_EXPERT`
prompts (raw, as the task file gives them) of the search task of the trial's *strongest
objective* — the objective on which the trial stands best among the chosen trials (its value's
distance from the best of them, as a fraction of their range; ties go to the earlier
objective). ``random`` needs no prompts.

The MoE's attention, embeddings, norms and head are the study's base model's (mergekit-moe's
``base_model``; the common ancestor of the merges, and the model the ``hidden`` router reads
the prompts with); each routed expert's MLP is one trial's merge. Output architectures are
mergekit-moe's: Llama and Mistral experts make a Mixtral, Qwen2 experts a Qwen2-MoE (which needs
one shared expert: the base model again, prompted with every expert's prompts — mergekit 0.1.5
only loads a shared expert that is the base or a routed expert), Qwen3 experts a Qwen3-MoE;
anything else, and data-flow studies (trials of different depths), are refused in one line
before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.report import objective_names

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from mergeopt.spec import StudySpec

GATE_MODES = ("hidden", "cheap_embed", "random")
MOE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MOE_CONFIG = "mergekit_moe_config.yml"
PROMPTS_PER_EXPERT = 16
"""Prompts of its strongest objective's task that initialize each expert's router row."""


@dataclass(frozen=True)
class MoeExpert:
    """One trial as an expert: its strongest objective and the prompts that route to it."""

    trial: int
    objective: str
    prompts: tuple[str, ...]


def strongest_objectives(
    names: Sequence[str], maximize: Sequence[bool], values: Sequence[Sequence[float]]
) -> list[int]:
    """For each row of ``values`` (one per trial), the objective it stands best on among the
    rows: ``(best - value) / range`` per objective (0 for the best row), smallest wins, ties
    to the earlier objective."""
    strongest = []
    for row in values:
        gaps = []
        for j in range(len(names)):
            column = [r[j] for r in values]
            best = max(column) if maximize[j] else min(column)
            spread = (max(column) - min(column)) or 1.0
            gaps.append(abs(best - row[j]) / spread)
        strongest.append(min(range(len(names)), key=lambda j: (gaps[j], j)))
    return strongest


def moe_experts(
    study: optuna.Study, trials: Sequence[FrozenTrial], *, gate_mode: str
) -> list[MoeExpert]:
    """Each trial's strongest objective and its task's first prompts; refuses
    (one line) routers that could not tell two experts apart."""
    from optuna.study import StudyDirection

    from mergeopt.objectives.tasks import GenerationItem, MultipleChoiceItem, search_split
    from mergeopt.study import stored_spec

    spec = stored_spec(study)
    names = objective_names(study)
    maximize = [d == StudyDirection.MAXIMIZE for d in study.directions]
    strongest = strongest_objectives(names, maximize, [t.values for t in trials])
    experts = []
    for trial, index in zip(trials, strongest, strict=True):
        objective = spec.objectives[index]
        texts: tuple[str, ...] = ()
        if gate_mode != "random":
            if objective.kind == "evalscope":
                raise UserError(
                    f"--moe: trial {trial.number} is strongest on {objective.name}, an evalscope "
                    "benchmark, which gives no prompts; use --gate-mode random"
                )
            split = search_split(
                objective.task, objective.kind, limit=objective.limit, seed=objective.subsample_seed
            )
            items = split.items[:PROMPTS_PER_EXPERT]
            texts = tuple(
                item.prompt
                if isinstance(item, GenerationItem)
                else item.question
                if isinstance(item, MultipleChoiceItem)
                else item.text
                for item in items
            )
        experts.append(MoeExpert(trial=trial.number, objective=objective.name, prompts=texts))
    if gate_mode != "random":
        for i, first in enumerate(experts):
            for second in experts[i + 1 :]:
                if first.prompts == second.prompts:
                    raise UserError(
                        f"--moe: trials {first.trial} and {second.trial} are strongest on "
                        f"objectives of one task ({first.objective}, {second.objective}), so "
                        "their routers would be identical; choose trials strong on different "
                        "tasks or use --gate-mode random"
                    )
    return experts


def check_moe(spec: StudySpec, trials: Sequence[FrozenTrial], gate_mode: str) -> str:
    """The experts' architecture (``model_type``), or a one-line ``UserError``."""
    from mergeopt.checkpoints import Checkpoint
    from mergeopt.models import resolve_model

    if gate_mode not in GATE_MODES:
        raise UserError(f"--gate-mode: expected one of {', '.join(GATE_MODES)}, got {gate_mode!r}")
    if spec.merge.space == "dataflow":
        raise UserError(
            "--moe: data-flow trials have different depths; a MoE needs experts of one shape"
        )
    if len(trials) < 2:
        raise UserError(f"--moe needs at least 2 trials, got {len(trials)}")
    model_type = str(Checkpoint(path=resolve_model(spec.models.base)).config.get("model_type"))
    if model_type not in MOE_ARCHITECTURES:
        raise UserError(
            f"--moe: mergekit-moe builds MoEs from {', '.join(MOE_ARCHITECTURES)} models; "
            f"this study's are {model_type!r}"
        )
    return model_type


def moe_config(
    experts: Sequence[MoeExpert],
    folders: Sequence[Path],
    *,
    base: str,
    model_type: str,
    gate_mode: str,
    dtype: str,
    experts_per_token: int,
) -> dict[str, Any]:
    """mergekit-moe's configuration (a dict ready for ``yaml.safe_dump``)."""

    def entry(model: str | Path, prompts: Sequence[str]) -> dict[str, Any]:
        return {
            "source_model": str(model),
            **({"positive_prompts": list(prompts)} if prompts else {}),
        }

    config: dict[str, Any] = {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": dtype,
        "experts_per_token": experts_per_token,
        "experts": [entry(f, e.prompts) for e, f in zip(experts, folders, strict=True)],
    }
    if model_type == "qwen2":  # mergekit's Qwen2-MoE wants exactly one shared expert
        every = [p for e in experts for p in e.prompts]
        config["shared_experts"] = [entry(base, every)]
    return config


def export_moe(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    out_dir: Path,
    *,
    gate_mode: str = "hidden",
    experts_per_token: int = 1,
    device: str = "cpu",
    force: bool = False,
    storage_url: str | None = None,
) -> Path:
    """Build the MoE of ``trials`` into ``out_dir`` (atomically; module docstring)."""
    import yaml

    from mergeopt.export import METADATA, atomic_folder, export_trials
    from mergeopt.models import resolve_model
    from mergeopt.storage import mask_url
    from mergeopt.study import stored_spec

    spec = stored_spec(study)
    model_type = check_moe(spec, trials, gate_mode)
    if not 1 <= experts_per_token <= len(trials):
        raise UserError(
            f"--experts-per-token: expected 1 to {len(trials)}, got {experts_per_token}"
        )
    experts = moe_experts(study, trials, gate_mode=gate_mode)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, force=force) as staging:
        with tempfile.TemporaryDirectory(prefix=".moe-experts-", dir=staging.parent) as scratch:
            folders = export_trials(
                study, trials, Path(scratch) / "experts", fmt="hf", device=device, index=True
            )
            config = moe_config(
                experts,
                folders,
                base=str(resolve_model(spec.models.base)),
                model_type=model_type,
                gate_mode=gate_mode,
                dtype=spec.scorer.dtype,
                experts_per_token=experts_per_token,
            )
            config_path = Path(scratch) / MOE_CONFIG
            config_path.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
            _run_mergekit_moe(config_path, staging, device=device)
        generation_config = resolve_model(spec.models.base) / "generation_config.json"
        if generation_config.is_file():  # mergekit-moe writes none: keep the base's EOS ids
            shutil.copyfile(generation_config, staging / "generation_config.json")
        # mergekit keeps its config beside the model: name the trials, not the scratch folders
        by_trial = [
            {**e, "source_model": f"trial {x.trial}"}
            for e, x in zip(config["experts"], experts, strict=True)
        ]
        kept = {**config, "experts": by_trial}
        (staging / MOE_CONFIG).write_text(yaml.safe_dump(kept, sort_keys=False), "utf-8")
        metadata = {
            "study": study.study_name,
            "storage": mask_url(storage_url) if storage_url else None,
            "moe": {
                "gate_mode": gate_mode,
                "experts_per_token": experts_per_token,
                "architecture": model_type,
                "base_model": spec.models.base,
                "shared_expert": spec.models.base if model_type == "qwen2" else None,
            },
            "experts": [
                {
                    "trial": e.trial,
                    "strongest_objective": e.objective,
                    "values": dict(zip(objective_names(study), t.values, strict=False)),
                    "prompts": len(e.prompts),
                }
                for e, t in zip(experts, trials, strict=True)
            ],
        }
        (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", "utf-8")
    return out_dir


def _run_mergekit_moe(config: Path, out: Path, *, device: str) -> None:
    """``mergekit-moe CONFIG OUT`` (a dependency, run as its own process: it exits on errors)."""
    beside = Path(sys.executable).parent / "mergekit-moe"
    command = str(beside) if beside.exists() else shutil.which("mergekit-moe")
    if command is None:
        raise UserError("--moe needs mergekit's mergekit-moe (pip install mergekit)")
    result = subprocess.run(
        [command, str(config), str(out), "--device", device.split(":")[0], "--copy-tokenizer"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "Error" in line]
        last = (errors or lines or ["no output"])[-1].strip()
        raise UserError(f"--moe: mergekit-moe failed: {last}")
