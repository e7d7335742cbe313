"""One worker's merge-and-score runner: the resident merge engine, scorer and evaluator that
turn a trial's parameters into objective values."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mergeopt import attrs
from mergeopt.genome import DataflowGenome
from mergeopt.seeds import derive_seed
from mergeopt.study import stored_genome, stored_layout, stored_spec

if TYPE_CHECKING:
    import optuna

    from mergeopt.objectives.fidelity import Finished

logger = logging.getLogger("mergeopt")


FIDELITY_STREAM = 0xF1D  # the seed stream of the fidelity rungs' item order


class TrialStopped(Exception):
    """Fidelity rungs stopped the trial: tell it PRUNED, keeping ``user_attrs`` (its partial
    values, their intervals, the rung reached and its cost); ``values`` are the estimates."""

    def __init__(self, values: list[float], user_attrs: dict[str, Any]) -> None:
        super().__init__("stopped by fidelity rungs")
        self.values = values
        self.user_attrs = user_attrs


@dataclass
class _Scored:
    raw: dict[str, float]
    values: dict[str, float]
    metrics: dict[str, Any]
    seconds: float
    items: int
    tokens: int
    stopped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class TrialRunner:
    """A worker's resident merge engine, scorer and evaluator for one study.

    Built once per worker: it loads base and experts onto ``device`` and keeps them there;
    each trial merges in place into the scorer's weights and evaluates the objectives on
    ``split``: ``"search"`` (what the study optimizes) or ``"heldout"`` (``study evaluate``).
    """

    def __init__(
        self, study: optuna.Study, *, device: str, split: Literal["search", "heldout"] = "search"
    ) -> None:
        import torch

        from mergeopt.merge.engine import MergeEngine
        from mergeopt.models import resolve_model

        self.spec = stored_spec(study)
        self.genome = stored_genome(study)
        self.layout = stored_layout(study)
        self.device = device
        self.split = split
        spec = self.spec
        self.base = resolve_model(spec.models.base)
        self.experts = [resolve_model(e) for e in spec.models.experts]
        # The scorer first: the engine checks its own needs against the memory left free.
        self._build_scorer()
        self.engine: Any
        if isinstance(self.genome, DataflowGenome):
            self._build_dataflow_engine()
        else:
            self.engine = MergeEngine(
                base=self.base,
                experts=self.experts,
                layout=self.layout,
                method=spec.merge.method,
                method_params=dict(spec.merge.parameters),
                device=device,
                dtype=getattr(torch, spec.merge.dtype),
            )
        self.plan: Any = None
        self.front: Callable[[], Sequence[Finished]] | None = None
        """Set by the worker loop: reads the study's COMPLETE trials (one database read),
        which fidelity rungs compare a trial with and calibrate their estimates on."""
        self.anchors = self._anchors(study)

    def _build_scorer(self) -> None:
        from mergeopt.objectives.evaluate import Evaluator
        from mergeopt.objectives.scorers import create_scorer

        options = self.spec.scorer
        self.scorer = create_scorer(
            options.backend,
            self.base,
            device=self.device,
            dtype=options.dtype,
            batch_size=options.batch_size,
            chat_template=options.chat_template,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enforce_eager=options.enforce_eager,
            trust_remote_code=self.spec.models.trust_remote_code,
            # A data-flow trial re-points the layer list, which a captured decode step
            # would not follow: those studies decode dynamically (static is refused).
            decode="dynamic" if self.spec.merge.space == "dataflow" else options.decode,
            expert_dirs=tuple(self.experts),
        )
        self.evaluator = Evaluator(
            self.spec.objectives, self.scorer, scorer_options=options, split=self.split
        )

    def _build_dataflow_engine(self) -> None:
        """Data-flow space: the other source models' layers resident beside the scorer's model
        (model A), which each trial re-points (``merge/dataflow.py``)."""
        from mergeopt.merge.dataflow import DataflowEngine
        from mergeopt.objectives.scorers.hf import HFScorer

        assert isinstance(self.scorer, HFScorer)  # the spec allows no other backend
        self.engine = DataflowEngine(
            model=self.scorer.model,
            sources=self.experts,
            trust_remote_code=self.spec.models.trust_remote_code,
        )

    def _anchors(self, study: optuna.Study) -> Any:
        """Base/expert scores for normalized objectives, and the fidelity rungs' item plan:
        measured (one scoring of each source model serves both) by the first worker, then
        read. Sets ``self.plan`` (None without ``fidelity:`` or off the search split)."""
        from mergeopt.objectives.fidelity import FidelityPlan, disagreements, make_plan
        from mergeopt.objectives.normalization import (
            Anchors,
            anchors_of,
            measure_sources,
            needs_anchors,
        )

        fidelity = self.spec.fidelity if self.split == "search" else None
        key = attrs.ANCHORS if self.split == "search" else attrs.HELDOUT_ANCHORS
        stored = key.get(study) if needs_anchors(self.spec.objectives) else None
        anchors = Anchors.from_json(stored) if stored is not None else None
        stored_plan = attrs.FIDELITY_PLAN.get(study) if fidelity is not None else None
        self.plan = FidelityPlan.from_json(stored_plan) if stored_plan is not None else None
        want_anchors = needs_anchors(self.spec.objectives) and anchors is None
        want_plan = fidelity is not None and self.plan is None
        informative = (
            want_plan and fidelity is not None and fidelity.first_rung_items == "informative"
        )
        sources = []
        if want_anchors or informative:
            sources = measure_sources(
                self.evaluator,
                self.scorer,
                base_dir=self.base,
                expert_dirs=self.experts,
                engine=self.engine,
            )
        # Workers that measured at the same time store identical values (greedy decoding).
        if want_anchors:
            anchors = anchors_of(sources, base_dir=self.base, expert_dirs=self.experts)
            key.set(study, anchors.to_json())
        if want_plan and fidelity is not None:
            accuracies = [o.name for o in self.spec.objectives if o.metric == "accuracy"]
            self.plan = make_plan(
                self.evaluator.group_sizes(),
                first_fraction=fidelity.rungs[0],
                seed=derive_seed(self.spec.seed, FIDELITY_STREAM),
                informative=(
                    disagreements([r.records for r in sources], accuracies) if informative else None
                ),
            )
            attrs.FIDELITY_PLAN.set(study, self.plan.to_json())
        return anchors

    def evaluate(
        self, params: Mapping[str, float], *, seed: int
    ) -> tuple[list[float], dict[str, Any]]:
        """Merge the trial's recipe into the resident model and score it.

        Returns the objective values (in spec order) and the trial user_attrs to store.
        Raises ``TrialEvaluationError`` when scoring fails (a scorer left unusable is rebuilt),
        and ``TrialStopped`` when fidelity rungs stop the trial early (with ``front`` set: a
        callable that reads the values of the study's COMPLETE trials).
        """
        from mergeopt.objectives.scorers.base import TrialEvaluationError

        recipe: dict[str, Any]
        if isinstance(self.genome, DataflowGenome):
            path = self.genome.path(params)
            recipe = {attrs.DATAFLOW_PATH: [list(hop) for hop in path]}
        else:
            block_params = self.genome.block_params(params)
            recipe = {attrs.RECIPE: block_params}
        try:
            started = time.perf_counter()
            if isinstance(self.genome, DataflowGenome):
                self.engine.apply(path)
                blocks_merged = 0  # nothing merged: the layer list is re-pointed
            else:
                target = self.scorer.merge_target()
                blocks_merged = self.engine.merge(
                    block_params, target=target, seed=seed
                ).blocks_merged
            self.scorer.after_weights_loaded()
            merge_seconds = time.perf_counter() - started
            if self.plan is not None and self.front is not None:
                scored = self._score_by_rungs(self.plan, self.front)
            else:
                result = self.evaluator.evaluate()
                scored = _Scored(
                    result.values,
                    self._normalized(result.values),
                    result.metrics,
                    result.seconds,
                    result.items,
                    result.tokens,
                )
        except TrialEvaluationError:
            if not self.scorer.healthy():
                logger.warning("the scorer is unusable after this failure; rebuilding it")
                self.engine.forget(self.scorer.merge_target())
                self.scorer.close()
                if isinstance(self.genome, DataflowGenome):
                    self.engine = None  # free its resident layers before loading new ones
                self._build_scorer()
                if isinstance(self.genome, DataflowGenome):
                    self._build_dataflow_engine()
            raise
        user_attrs: dict[str, Any] = {
            **recipe,
            attrs.METRICS: scored.metrics,
            attrs.MERGE_SECONDS: round(merge_seconds, 4),
            attrs.EVAL_SECONDS: round(scored.seconds, 4),
            attrs.ITEMS_SCORED: scored.items,
            attrs.TOKENS_GENERATED: scored.tokens,
            attrs.BLOCKS_MERGED: blocks_merged,
            attrs.RAW_VALUES: scored.raw,
            **scored.extra,
        }
        for name, value in scored.values.items():
            if value != value:  # NaN: a broken merge must not enter the Pareto front
                raise TrialEvaluationError(f"objective {name} is NaN")
        values = [scored.values[objective.name] for objective in self.spec.objectives]
        if scored.stopped:
            user_attrs[attrs.STOPPED_VALUES] = values
            raise TrialStopped(values, user_attrs)
        return values, user_attrs

    def _normalized(self, raw: dict[str, float]) -> dict[str, float]:
        from mergeopt.objectives.normalization import normalize_values

        return normalize_values(raw, self.anchors, self.spec.objectives) if self.anchors else raw

    def _score_by_rungs(self, plan: Any, front: Callable[[], Sequence[Finished]]) -> _Scored:
        from mergeopt.objectives.fidelity import score_by_rungs

        fidelity = self.spec.fidelity
        assert fidelity is not None
        rungs = score_by_rungs(
            self.evaluator,
            plan,
            rungs=fidelity.rungs,
            confidence=fidelity.confidence,
            objectives=self.spec.objectives,
            normalize=self._normalized,
            front=front,
            estimator=fidelity.estimator,
        )
        record = {
            "rung": rungs.rung,
            "fraction": fidelity.rungs[rungs.rung],
            "stopped": rungs.stopped,
            "values": rungs.values,
            "intervals": {
                name: [_finite(rungs.low[name]), _finite(rungs.high[name])] for name in rungs.values
            },
            "rung_raw": rungs.rung_raw,
        }
        return _Scored(
            rungs.raw,
            rungs.values,
            rungs.metrics,
            rungs.seconds,
            rungs.items,
            rungs.tokens,
            stopped=rungs.stopped,
            extra={attrs.FIDELITY: record},
        )

    def close(self) -> None:
        self.scorer.close()
