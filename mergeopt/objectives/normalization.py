"""Objective normalization between the source models' scores (SIPBMM, arXiv 2512.09972).

SIPBMM normalizes each objective (accuracy, mean output tokens) between the scores of its two
source models, so that objectives on different scales weigh alike in the hypervolume. mergeopt
measures the **anchors** — every objective's raw value for the base model and for each expert —
once per study (the first worker; the others read them from the study's user_attrs under
``mergeopt.attrs.ANCHORS``), and maps a trial's raw value ``v`` of an objective with
``normalize: true`` to

    normalized(v) = (v − lo) / (hi − lo),   lo = min(anchors), hi = max(anchors)

where ``anchors`` = {base score} ∪ {each expert's score} for that objective: 0 is the weakest
source model's score and 1 the strongest's, and a merge may fall outside [0, 1]. With one expert
this is exactly SIPBMM's min-max between its two models. The map is increasing, so the
objective's direction does not change. When all anchors are equal (``hi − lo < 1e-12``) the value
is only shifted, ``v − lo``. Raw values stay in each trial's metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError

if TYPE_CHECKING:
    import torch

    from mergeopt.objectives.evaluate import EvalResult, Evaluator
    from mergeopt.objectives.scorers.base import Scorer

DEGENERATE_SPAN = 1e-12


@dataclass(frozen=True)
class Anchors:
    """Raw objective values of the source models, by objective name (JSON in the study)."""

    base: dict[str, float]
    experts: list[dict[str, float]]
    models: list[str] = field(default_factory=list)  # base, then experts (paths, for reading)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": dict(self.base),
            "experts": [dict(e) for e in self.experts],
            "models": list(self.models),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Anchors:
        return cls(
            base={k: float(v) for k, v in data["base"].items()},
            experts=[{k: float(v) for k, v in e.items()} for e in data["experts"]],
            models=list(data.get("models", [])),
        )

    def span(self, objective: str) -> tuple[float, float]:
        """(lo, hi) of the objective's anchors."""
        if objective not in self.base or any(objective not in e for e in self.experts):
            raise KeyError(f"no anchors for objective {objective!r}")
        scores = [self.base[objective], *(e[objective] for e in self.experts)]
        return min(scores), max(scores)


def normalize_value(raw: float, *, lo: float, hi: float) -> float:
    """(raw − lo) / (hi − lo); raw − lo when the anchors coincide."""
    if hi - lo < DEGENERATE_SPAN:
        return raw - lo
    return (raw - lo) / (hi - lo)


def normalize_values(
    values: Mapping[str, float], anchors: Anchors, objectives: Sequence[Any]
) -> dict[str, float]:
    """Objective values as the study sees them: normalized where ``objective.normalize`` is on,
    raw otherwise (objectives are read by ``name`` and ``normalize``)."""
    result = dict(values)
    for objective in objectives:
        if getattr(objective, "normalize", False) and objective.name in values:
            lo, hi = anchors.span(objective.name)
            result[objective.name] = normalize_value(values[objective.name], lo=lo, hi=hi)
    return result


def needs_anchors(objectives: Sequence[Any]) -> bool:
    """Whether any objective asks for normalization (then the study measures anchors)."""
    return any(getattr(objective, "normalize", False) for objective in objectives)


def iter_checkpoint_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every tensor in a model folder's safetensors files, file by file."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"model {model_dir}: no .safetensors files")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                yield name, handle.get_tensor(name)


def measure_anchors(
    evaluator: Evaluator,
    scorer: Scorer,
    *,
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    engine: Any = None,
) -> Anchors:
    """Score the base and each expert with ``evaluator`` (its split and objectives).

    Each expert's weights are loaded into the resident scorer from its folder, and the base's
    afterwards, so the scorer holds the base again on return. Pass the worker's merge engine as
    ``engine``: its record of what the scorer holds is dropped (``engine.forget``), so that the
    next merge writes every block. Raises ``TrialEvaluationError`` if a source model cannot be
    scored (the study cannot normalize then).
    """
    results = measure_sources(
        evaluator, scorer, base_dir=base_dir, expert_dirs=expert_dirs, engine=engine
    )
    return anchors_of(results, base_dir=base_dir, expert_dirs=expert_dirs)


def anchors_of(
    results: Sequence[EvalResult], *, base_dir: str | Path, expert_dirs: Sequence[str | Path]
) -> Anchors:
    """``Anchors`` from :func:`measure_sources`'s results (base first, then each expert)."""
    return Anchors(
        base=dict(results[0].values),
        experts=[dict(r.values) for r in results[1:]],
        models=[str(base_dir), *(str(e) for e in expert_dirs)],
    )


def measure_sources(
    evaluator: Evaluator,
    scorer: Scorer,
    *,
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    engine: Any = None,
) -> list[EvalResult]:
    """The base's and each expert's evaluation (base first), with their per-item records
    (fidelity rungs choose informative items from them); see :func:`measure_anchors`."""
    experts: list[EvalResult] = []
    try:
        for expert_dir in expert_dirs:
            scorer.load_weights(iter_checkpoint_tensors(expert_dir))
            experts.append(evaluator.evaluate())
    finally:
        scorer.load_weights(iter_checkpoint_tensors(base_dir))
        if engine is not None:
            engine.forget(scorer.merge_target())
    return [evaluator.evaluate(), *experts]
