"""Objective values of the model currently in a scorer: tasks in, one number per objective out.

Objectives are read duck-typed (``mergeopt.spec.ObjectiveSpec`` or anything with the same
attributes), so this module does not depend on the spec. Task files are loaded and checked when
an ``Evaluator`` is built (and by ``validate_objectives`` at ``study create``), never mid-study.
Objectives on the same task file, kind and subsample share one pass of the model: accuracy and
mean tokens of one task come from the same generations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergeopt.errors import UserError
from mergeopt.objectives import metrics
from mergeopt.objectives.scorers.base import Scorer, TrialEvaluationError
from mergeopt.objectives.tasks import (
    GenerationItem,
    MultipleChoiceItem,
    TaskSplit,
    TextItem,
    heldout_split,
    search_split,
)

KIND_METRICS = {
    "generation": ("accuracy", "mean_tokens"),
    "multiple_choice": ("accuracy",),
    "perplexity": ("perplexity",),
}


@dataclass(frozen=True)
class GenerationOptions:
    """How generations run (the generation part of the spec's ``scorer`` section)."""

    max_new_tokens: int = 48
    stop: tuple[str, ...] = ("\n",)


@dataclass(frozen=True)
class EvalResult:
    """``values``: raw objective value by objective name; ``metrics``: by task label, every
    metric computed on it (plus ``n`` items and ``seconds``); ``seconds``: the whole evaluation;
    ``items``: items scored over all tasks; ``tokens``: tokens generated (generation tasks only;
    log-likelihood tasks and evalscope generate none that are counted)."""

    values: dict[str, float]
    metrics: dict[str, dict[str, float]]
    seconds: float
    items: int = 0
    tokens: int = 0


@dataclass
class _Group:
    """Objectives answered by one pass of the model over one split of one task."""

    label: str
    split: TaskSplit
    objectives: list[Any] = field(default_factory=list)


def _option(objective: Any, name: str, default: Any = None) -> Any:
    return getattr(objective, name, default)


def _check_objective(objective: Any) -> None:
    name, kind, metric = objective.name, _option(objective, "kind", "generation"), objective.metric
    if kind == "evalscope":
        from mergeopt.objectives.evalscope import check_evalscope_objective

        check_evalscope_objective(objective)
        return
    if kind not in KIND_METRICS:
        raise UserError(f"objective {name}: unknown kind {kind!r}")
    if metric not in KIND_METRICS[kind]:
        raise UserError(
            f"objective {name}: metric of a {kind} task must be one of "
            f"{', '.join(KIND_METRICS[kind])}, got {metric!r}"
        )
    extract = _option(objective, "extract", "last_number")
    if kind == "generation" and extract not in metrics.EXTRACTIONS:
        raise UserError(f"objective {name}: unknown extract {extract!r}")
    if kind == "generation" and extract == "regex" and not _option(objective, "pattern"):
        raise UserError(f"objective {name}: extract: regex needs a pattern")


def _split_of(objective: Any, split: str) -> TaskSplit | None:
    kind = _option(objective, "kind", "generation")
    limit, seed = _option(objective, "limit"), _option(objective, "subsample_seed", 0)
    if split == "search":
        return search_split(objective.task, kind, limit=limit, seed=seed)
    return heldout_split(
        objective.task, kind, heldout=_option(objective, "heldout"), limit=limit, seed=seed
    )


def validate_objectives(objectives: Sequence[Any]) -> None:
    """Check every objective and read every task file (search and held-out); no model needed.

    Raises ``UserError`` naming the objective, or the file and line of a bad record.
    """
    for objective in objectives:
        _check_objective(objective)
        if _option(objective, "kind", "generation") == "evalscope":
            continue
        _split_of(objective, "search")
        if _option(objective, "heldout") is not None:
            _split_of(objective, "heldout")


def has_heldout(objective: Any) -> bool:
    """Whether the objective has held-out items (a ``heldout`` file, or items ``limit`` left)."""
    if _option(objective, "kind", "generation") == "evalscope":
        return False
    return _split_of(objective, "heldout") is not None


class Evaluator:
    """Scores the model in ``scorer`` on every objective's split of its task.

    Args:
        objectives: objective specs (name, task, kind, metric, extract, pattern, limit,
            subsample_seed, heldout, evalscope).
        scorer: the resident scorer (its current weights are what gets scored).
        scorer_options: ``max_new_tokens`` and ``stop`` (the spec's ``ScorerSpec`` works).
        split: ``"search"`` (what the study optimizes) or ``"heldout"`` (reported only).

    Example::

        evaluator = Evaluator(spec.objectives, scorer, scorer_options=spec.scorer)
        result = evaluator.evaluate()       # after each merge
        result.values["accuracy"], result.metrics["arith"]["mean_tokens"]
    """

    def __init__(
        self,
        objectives: Sequence[Any],
        scorer: Scorer,
        *,
        scorer_options: Any = None,
        split: Literal["search", "heldout"] = "search",
    ) -> None:
        if split not in ("search", "heldout"):
            raise ValueError(f"split must be 'search' or 'heldout', got {split!r}")
        options = scorer_options if scorer_options is not None else GenerationOptions()
        self.max_new_tokens: int = int(options.max_new_tokens)
        self.stop: list[str] = list(options.stop)
        self.scorer = scorer
        self.split = split
        self.objectives = list(objectives)
        self._groups: list[_Group] = []
        self._evalscope: list[Any] = []
        by_key: dict[tuple[Any, ...], _Group] = {}
        labels: set[str] = set()
        for objective in self.objectives:
            _check_objective(objective)
            kind = _option(objective, "kind", "generation")
            if kind == "evalscope":
                self._evalscope.append(objective)
                continue
            task_split = _split_of(objective, split)
            if task_split is None:
                raise UserError(
                    f"objective {objective.name}: no held-out items (give heldout: "
                    "a file, or a limit smaller than the task)"
                )
            key = (kind, str(task_split.path), task_split.description)
            if key not in by_key:
                label = Path(task_split.path).stem
                if label in labels:
                    label = f"{label}.{kind}"
                while label in labels:
                    label += "_"
                labels.add(label)
                by_key[key] = _Group(label=label, split=task_split)
                self._groups.append(by_key[key])
            by_key[key].objectives.append(objective)

    def evaluate(self) -> EvalResult:
        """Score the scorer's current weights; ``TrialEvaluationError`` if that fails."""
        started = time.perf_counter()
        values: dict[str, float] = {}
        all_metrics: dict[str, dict[str, float]] = {}
        items = tokens = 0
        for group in self._groups:
            group_started = time.perf_counter()
            try:
                group_values, group_metrics = self._evaluate_group(group)
            except (TrialEvaluationError, UserError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - any scorer failure fails the trial only
                raise TrialEvaluationError(
                    f"scoring {group.label} failed: {exc.__class__.__name__}: {exc}"
                ) from exc
            group_metrics["n"] = float(len(group.split.items))
            group_metrics["seconds"] = time.perf_counter() - group_started
            items += len(group.split.items)
            tokens += int(group_metrics.pop("tokens_generated", 0))
            values.update(group_values)
            all_metrics[group.label] = group_metrics
        for objective in self._evalscope:
            from mergeopt.objectives.evalscope import run_evalscope_objective

            group_started = time.perf_counter()
            value, evalscope_metrics = run_evalscope_objective(
                objective, self.scorer, max_new_tokens=self.max_new_tokens, stop=self.stop
            )
            evalscope_metrics["seconds"] = time.perf_counter() - group_started
            items += int(evalscope_metrics.get("n", 0))
            values[objective.name] = value
            all_metrics[objective.name] = evalscope_metrics
        for name, value in values.items():
            if not math.isfinite(value):
                raise TrialEvaluationError(f"objective {name} is {value} (not finite)")
        return EvalResult(
            values=values,
            metrics=all_metrics,
            seconds=time.perf_counter() - started,
            items=items,
            tokens=tokens,
        )

    def _evaluate_group(self, group: _Group) -> tuple[dict[str, float], dict[str, float]]:
        items = group.split.items
        values: dict[str, float] = {}
        computed: dict[str, float] = {}
        if group.split.kind == "generation":
            prompts = [item.prompt for item in items if isinstance(item, GenerationItem)]
            answers = [item.answer for item in items if isinstance(item, GenerationItem)]
            generations = self.scorer.generate(
                prompts, max_new_tokens=self.max_new_tokens, stop=self.stop
            )
            texts = [g.text for g in generations]
            computed["mean_tokens"] = metrics.mean_tokens([g.num_tokens for g in generations])
            computed["tokens_generated"] = float(sum(g.num_tokens for g in generations))
            for objective in group.objectives:
                if objective.metric == "mean_tokens":
                    values[objective.name] = computed["mean_tokens"]
                    continue
                extract = _option(objective, "extract", "last_number")
                pattern = _option(objective, "pattern")
                key = "accuracy" if extract == "last_number" else f"accuracy_{extract}"
                value = metrics.generation_accuracy(
                    texts, answers, extract=extract, pattern=pattern
                )
                if key in computed and computed[key] != value:
                    key = f"accuracy:{objective.name}"
                computed[key] = value
                values[objective.name] = value
        elif group.split.kind == "multiple_choice":
            questions = [item for item in items if isinstance(item, MultipleChoiceItem)]
            pairs = [(q.question, _continuation(choice)) for q in questions for choice in q.choices]
            scores = self.scorer.loglikelihood(pairs)
            per_item: list[list[float]] = []
            position = 0
            for question in questions:
                per_item.append(scores[position : position + len(question.choices)])
                position += len(question.choices)
            computed["accuracy"] = metrics.choice_accuracy(per_item, [q.answer for q in questions])
            for objective in group.objectives:
                values[objective.name] = computed["accuracy"]
        else:
            texts = [item.text for item in items if isinstance(item, TextItem)]
            scored = self.scorer.rolling_loglikelihood(texts)
            computed["perplexity"] = metrics.perplexity(
                [s for s, _ in scored], [n for _, n in scored]
            )
            for objective in group.objectives:
                values[objective.name] = computed["perplexity"]
        return values, computed


def _continuation(choice: str) -> str:
    """A choice as it follows the question: one leading space unless it has whitespace already
    (lm-evaluation-harness's ``target_delimiter``)."""
    return choice if choice[:1].isspace() else " " + choice
