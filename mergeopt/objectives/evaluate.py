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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergeopt.errors import UserError
from mergeopt.objectives import metrics
from mergeopt.objectives.scorers.base import Classifier, Scorer, TrialEvaluationError
from mergeopt.objectives.tasks import (
    ClassificationItem,
    GenerationItem,
    MultipleChoiceItem,
    TaskSplit,
    TextItem,
    heldout_split,
    label_count,
    load_task,
    search_split,
)

KIND_METRICS = {
    "generation": ("accuracy", "mean_tokens"),
    "multiple_choice": ("accuracy",),
    "perplexity": ("perplexity",),
    "classification": ("accuracy", "macro_f1"),
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
    log-likelihood tasks and evalscope generate none that are counted); ``records``: per
    task label and item, what ``Evaluator.score_items`` returns."""

    values: dict[str, float]
    metrics: dict[str, dict[str, float]]
    seconds: float
    items: int = 0
    tokens: int = 0
    records: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)


WEIGHT = "_w"
TOKENS = "_tokens"
LABEL = "_label"
PREDICTED = "_predicted"


@dataclass
class ItemScores:
    """Per-item records by task label and item index (see ``Evaluator.score_items``), with
    the items scored, the tokens generated and each group's seconds."""

    records: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    items: int = 0
    tokens: int = 0


@dataclass
class _Group:
    """Objectives answered by one pass of the model over one split of one task."""

    label: str
    split: TaskSplit
    objectives: list[Any] = field(default_factory=list)
    num_labels: int = 0
    """Classification: the task's classes (its task file's), the head rows a prediction reads."""
    head: int = 0
    """Classification: the expert whose classification head answers the task."""


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
            key = (kind, str(task_split.path), task_split.description, _option(objective, "head"))
            if key not in by_key:
                label = Path(task_split.path).stem
                if label in labels:
                    label = f"{label}.{kind}"
                while label in labels:
                    label += "_"
                labels.add(label)
                by_key[key] = _Group(label=label, split=task_split)
                if kind == "classification":
                    by_key[key].num_labels = _classes(objective.task, task_split)
                    by_key[key].head = objective.head
                self._groups.append(by_key[key])
            by_key[key].objectives.append(objective)

    def group_sizes(self) -> dict[str, int]:
        """Items per task group (by label): what a subset of :meth:`score_items` indexes."""
        return {group.label: len(group.split.items) for group in self._groups}

    def evaluate(self) -> EvalResult:
        """Score the scorer's current weights; ``TrialEvaluationError`` if that fails."""
        started = time.perf_counter()
        scored = self.score_items()
        values, all_metrics = self.summarize(scored.records)
        for label, seconds in scored.seconds.items():
            all_metrics[label]["seconds"] = seconds
        items, tokens = scored.items, scored.tokens
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
        check_finite(values)
        return EvalResult(
            values=values,
            metrics=all_metrics,
            seconds=time.perf_counter() - started,
            items=items,
            tokens=tokens,
            records=scored.records,
        )

    def score_items(self, subset: Mapping[str, Sequence[int]] | None = None) -> ItemScores:
        """Per-item records of the task groups' items (all, or ``subset[label]`` indices).

        A record maps each objective of the group to its per-item observation ``y`` (1/0
        correct for accuracy, tokens for mean tokens, log-likelihood for perplexity; a
        classification record also holds its true and predicted labels, for macro-F1) and
        ``WEIGHT`` to its weight ``w`` (1, or the text's tokens for perplexity): an objective's
        value over any set of items is ``sum(y) / sum(w)`` (``exp(-...)`` for perplexity).
        """
        scores = ItemScores()
        for group in self._groups:
            indices = (
                list(range(len(group.split.items))) if subset is None else list(subset[group.label])
            )
            if not indices:
                continue
            group_started = time.perf_counter()
            try:
                records, tokens = self._score_group(group, indices)
            except (TrialEvaluationError, UserError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - any scorer failure fails the trial only
                raise TrialEvaluationError(
                    f"scoring {group.label} failed: {exc.__class__.__name__}: {exc}"
                ) from exc
            scores.records[group.label] = dict(zip(indices, records, strict=True))
            scores.seconds[group.label] = time.perf_counter() - group_started
            scores.items += len(indices)
            scores.tokens += tokens
        return scores

    def summarize(
        self, records: Mapping[str, Mapping[int, Mapping[str, float]]]
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Objective values and per-group metrics over the items in ``records``."""
        values: dict[str, float] = {}
        all_metrics: dict[str, dict[str, float]] = {}
        for group in self._groups:
            group_records = [records[group.label][i] for i in sorted(records.get(group.label, {}))]
            if not group_records:
                continue
            computed: dict[str, float] = {}
            if group.split.kind == "generation":
                computed["mean_tokens"] = aggregate("mean_tokens", group_records, TOKENS)
            for objective in group.objectives:
                value = aggregate(objective.metric, group_records, objective.name)
                values[objective.name] = value
                if group.split.kind != "generation":
                    computed[objective.metric] = value
                elif objective.metric != "mean_tokens":
                    extract = _option(objective, "extract", "last_number")
                    key = "accuracy" if extract == "last_number" else f"accuracy_{extract}"
                    if key in computed and computed[key] != value:
                        key = f"accuracy:{objective.name}"
                    computed[key] = value
            computed["n"] = float(len(group_records))
            all_metrics[group.label] = computed
        return values, all_metrics

    def _score_group(
        self, group: _Group, indices: Sequence[int]
    ) -> tuple[list[dict[str, float]], int]:
        """One record per item (see :meth:`score_items`) and the tokens generated."""
        items = [group.split.items[i] for i in indices]
        records: list[dict[str, float]] = []
        if group.split.kind == "generation":
            prompts = [item.prompt for item in items if isinstance(item, GenerationItem)]
            answers = [item.answer for item in items if isinstance(item, GenerationItem)]
            generations = self.scorer.generate(
                prompts, max_new_tokens=self.max_new_tokens, stop=self.stop
            )
            for generation, answer in zip(generations, answers, strict=True):
                record = {WEIGHT: 1.0, TOKENS: float(generation.num_tokens)}
                for objective in group.objectives:
                    if objective.metric == "mean_tokens":
                        record[objective.name] = float(generation.num_tokens)
                        continue
                    predicted = metrics.extract_answer(
                        generation.text,
                        extract=_option(objective, "extract", "last_number"),
                        pattern=_option(objective, "pattern"),
                    )
                    record[objective.name] = float(metrics.answers_match(predicted, answer))
                records.append(record)
            return records, sum(g.num_tokens for g in generations)
        if group.split.kind == "multiple_choice":
            questions = [item for item in items if isinstance(item, MultipleChoiceItem)]
            pairs = [(q.question, _continuation(choice)) for q in questions for choice in q.choices]
            scores = self.scorer.loglikelihood(pairs)
            position = 0
            for question in questions:
                choice_scores = scores[position : position + len(question.choices)]
                position += len(question.choices)
                correct = metrics.choice_accuracy([choice_scores], [question.answer])
                records.append({WEIGHT: 1.0, **dict.fromkeys(_names(group), correct)})
            return records, 0
        if group.split.kind == "classification":
            return self._classify(group, items), 0
        texts = [item.text for item in items if isinstance(item, TextItem)]
        for log_likelihood, count in self.scorer.rolling_loglikelihood(texts):
            records.append({WEIGHT: float(count), **dict.fromkeys(_names(group), log_likelihood)})
        return records, 0

    def _classify(self, group: _Group, items: Sequence[Any]) -> list[dict[str, float]]:
        """Predictions from the first ``num_labels`` logits of the task's expert's head on the
        model's body; labels beyond that head's rows score 0, as zero padding would."""
        if not isinstance(self.scorer, Classifier):
            raise UserError(
                f"task {group.label}: classification objectives need scorer.backend: classifier"
            )
        examples = [item for item in items if isinstance(item, ClassificationItem)]
        logits = self.scorer.classify(
            [item.text for item in examples], [item.text_pair for item in examples], head=group.head
        )
        records: list[dict[str, float]] = []
        for item, row in zip(examples, logits, strict=True):
            scores = [*row, *[0.0] * (group.num_labels - len(row))][: group.num_labels]
            predicted = max(range(len(scores)), key=lambda i: scores[i])
            correct = float(predicted == item.label)
            records.append(
                {
                    WEIGHT: 1.0,
                    LABEL: float(item.label),
                    PREDICTED: float(predicted),
                    **dict.fromkeys(_names(group), correct),
                }
            )
        return records


def _classes(task: str | Path, split: TaskSplit) -> int:
    """A classification task's label count (its task file's); a held-out label beyond it is
    a one-line error."""
    count = label_count(load_task(task, "classification"))
    for item in split.items:
        if isinstance(item, ClassificationItem) and item.label >= count:
            raise UserError(
                f"{split.path}: label {item.label} is out of range: the task file {task} has "
                f"labels 0..{count - 1}"
            )
    return count


def _names(group: _Group) -> list[str]:
    return [objective.name for objective in group.objectives]


def aggregate(metric: str, records: Sequence[Mapping[str, float]], key: str) -> float:
    """An objective's value over ``records``: ``sum(y) / sum(w)``, perplexity
    ``exp(-sum(log-likelihood) / sum(tokens))``, macro-F1 from the records' predicted and true
    labels; 0 for no items (as the metrics do)."""
    if metric == "perplexity":
        return metrics.perplexity([r[key] for r in records], [int(r[WEIGHT]) for r in records])
    if metric == "macro_f1":
        return metrics.macro_f1(
            [int(r[PREDICTED]) for r in records], [int(r[LABEL]) for r in records]
        )
    weight = sum(r[WEIGHT] for r in records)
    return sum(r[key] for r in records) / weight if weight else 0.0


def check_finite(values: Mapping[str, float]) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrialEvaluationError(f"objective {name} is {value} (not finite)")


def _continuation(choice: str) -> str:
    """A choice as it follows the question: one leading space unless it has whitespace already
    (lm-evaluation-harness's ``target_delimiter``)."""
    return choice if choice[:1].isspace() else " " + choice
