"""The mergekit YAML of a trial: the configuration ``mergekit-yaml`` turns into the trial's
weights (per-block values as per-layer filter entries), with a header naming the merge seed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.study import trial_recipe, trial_seed

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

MERGEKIT_CONFIG = "mergekit_config.yml"


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


def is_randomized(method: str) -> bool:
    from mergeopt.merge.methods import get_method

    try:
        return get_method(method).randomized
    except ValueError:
        return False


def mergekit_header(study: optuna.Study, trial: FrozenTrial, *, randomized: bool) -> str:
    lines = [f"# study {study.study_name}, trial {trial.number} (mergeopt export)"]
    if randomized:
        seed = trial_seed(study, trial)
        lines += [
            f"# merge seed {seed}: mergekit-yaml draws the random masks from its global RNG, so",
            "# it reproduces these weights only in distribution; the exact weights:",
            f"#   mergeopt merge mergekit_config.yml OUT --seed {seed}",
        ]
    return "\n".join(lines) + "\n"
