"""One worker's merge-and-score runner: the resident merge engine, scorer and evaluator that
turn a trial's parameters into objective values."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from mergeopt import attrs
from mergeopt.study import stored_genome, stored_layout, stored_spec

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger("mergeopt")


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
        self.engine = MergeEngine(
            base=self.base,
            experts=self.experts,
            layout=self.layout,
            method=spec.merge.method,
            method_params=dict(spec.merge.parameters),
            device=device,
            dtype=getattr(torch, spec.merge.dtype),
        )
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
            trust_remote_code=self.spec.models.trust_remote_code,
        )
        self.evaluator = Evaluator(
            self.spec.objectives, self.scorer, scorer_options=options, split=self.split
        )

    def _anchors(self, study: optuna.Study) -> Any:
        """Base/expert scores for normalized objectives: measured by the first worker, then read."""
        from mergeopt.objectives.normalization import Anchors, measure_anchors, needs_anchors

        if not needs_anchors(self.spec.objectives):
            return None
        key = attrs.ANCHORS if self.split == "search" else attrs.HELDOUT_ANCHORS
        stored = key.get(study)
        if stored is not None:
            return Anchors.from_json(stored)
        anchors = measure_anchors(
            self.evaluator,
            self.scorer,
            base_dir=self.base,
            expert_dirs=self.experts,
            engine=self.engine,
        )
        # Workers that measured at the same time store identical values (greedy decoding).
        key.set(study, anchors.to_json())
        return anchors

    def evaluate(
        self, params: Mapping[str, float], *, seed: int
    ) -> tuple[list[float], dict[str, Any]]:
        """Merge the trial's recipe into the resident model and score it.

        Returns the objective values (in spec order) and the trial user_attrs to store.
        Raises ``TrialEvaluationError`` when scoring fails; a scorer left unusable is rebuilt.
        """
        from mergeopt.objectives.normalization import normalize_values
        from mergeopt.objectives.scorers.base import TrialEvaluationError

        block_params = self.genome.block_params(params)
        try:
            started = time.perf_counter()
            target = self.scorer.merge_target()
            stats = self.engine.merge(block_params, target=target, seed=seed)
            self.scorer.after_weights_loaded()
            merge_seconds = time.perf_counter() - started
            result = self.evaluator.evaluate()
        except TrialEvaluationError:
            if not self.scorer.healthy():
                logger.warning("the scorer is unusable after this failure; rebuilding it")
                self.engine.forget(self.scorer.merge_target())
                self.scorer.close()
                self._build_scorer()
            raise
        raw = result.values
        values = normalize_values(raw, self.anchors, self.spec.objectives) if self.anchors else raw
        user_attrs: dict[str, Any] = {
            attrs.RECIPE: block_params,
            attrs.METRICS: result.metrics,
            attrs.MERGE_SECONDS: round(merge_seconds, 4),
            attrs.EVAL_SECONDS: round(result.seconds, 4),
            attrs.ITEMS_SCORED: result.items,
            attrs.TOKENS_GENERATED: result.tokens,
            attrs.BLOCKS_MERGED: stats.blocks_merged,
            attrs.RAW_VALUES: raw,
        }
        for name, value in values.items():
            if value != value:  # NaN: a broken merge must not enter the Pareto front
                raise TrialEvaluationError(f"objective {name} is NaN")
        return [values[objective.name] for objective in self.spec.objectives], user_attrs

    def close(self) -> None:
        self.scorer.close()
