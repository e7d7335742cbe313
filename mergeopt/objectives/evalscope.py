"""evalscope benchmarks as objectives, answered by the resident merged model, offline.

An objective of ``kind: evalscope`` runs one evalscope benchmark over a local dataset through a
``ModelAPI`` that calls our scorer, so the merged weights already in the scorer are what
evalscope scores; nothing is downloaded and no server is started. Spec example::

    objectives:
      - name: mcq
        kind: evalscope
        task: data/mcq            # evalscope's local_path: {subset}_val.jsonl / .csv files
        metric: accuracy          # a metric name of the benchmark's report
        limit: 50
        evalscope: {dataset: general_mcq, subset_list: [arith]}   # + any dataset_args

``evalscope`` (``pip install -e '.[evalscope]'`` in the clone) is optional; objectives of this
kind fail with a one-line ``UserError`` when it is missing. evalscope asks the model one sample
at a time, so these objectives are slower per item than the built-in task kinds.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.objectives.scorers.base import Scorer, TrialEvaluationError

DEFAULT_BENCHMARK = "general_mcq"


def _require_evalscope(objective: Any) -> None:
    try:
        import evalscope  # noqa: F401
    except ImportError:
        raise UserError(
            f"objective {objective.name}: kind evalscope needs the evalscope package: "
            "pip install -e '.[evalscope]' in mergeopt's clone"
        ) from None


def _options(objective: Any) -> tuple[str, dict[str, Any]]:
    """(benchmark name, its dataset_args without local_path) from ``objective.evalscope``."""
    options = dict(getattr(objective, "evalscope", None) or {})
    benchmark = str(options.pop("dataset", DEFAULT_BENCHMARK))
    if "local_path" in options:
        raise UserError(
            f"objective {objective.name}: evalscope.local_path: give the data "
            "folder as the objective's task"
        )
    return benchmark, options


def check_evalscope_objective(objective: Any) -> None:
    """Raise ``UserError`` when evalscope is missing or the local dataset does not exist."""
    _require_evalscope(objective)
    _options(objective)
    if not Path(objective.task).exists():
        raise UserError(
            f"objective {objective.name}: {objective.task}: evalscope dataset folder not found"
        )


def _make_model_api(scorer: Scorer, *, max_new_tokens: int, stop: Sequence[str]) -> Any:
    """An evalscope ``ModelAPI`` whose completions come from ``scorer`` (greedy)."""
    from evalscope.api.model import ModelAPI, ModelOutput

    class ScorerModelAPI(ModelAPI):
        """Answers evalscope's chat requests with the resident merged model."""

        def __init__(self) -> None:
            super().__init__(model_name="mergeopt-merged")
            self.failure: BaseException | None = None

        def generate(self, input: Any, tools: Any, tool_choice: Any, config: Any) -> Any:
            prompt = "\n\n".join(message.text for message in input)
            stops = [*stop, *(getattr(config, "stop_seqs", None) or [])]
            try:
                generation = scorer.generate([prompt], max_new_tokens=max_new_tokens, stop=stops)
            except BaseException as exc:  # evalscope would record it and go on: keep it
                self.failure = self.failure or exc
                raise
            return ModelOutput.from_content(model=self.model_name, content=generation[0].text)

    return ScorerModelAPI()


def _metric_value(report: Any, metric: str) -> tuple[float, dict[str, float]]:
    """The score of ``metric`` in an evalscope report (by name, legacy name or display name)
    and every metric's score."""
    scores: dict[str, float] = {}
    chosen: float | None = None
    for entry in report.metrics:
        names = {entry.identity.name, getattr(entry, "legacy_name", None)}
        semantics = getattr(entry, "semantics", None)
        if semantics is not None:
            names.add(getattr(semantics, "metric_name", None))
        names = {str(n).lower() for n in names if n}
        scores[entry.identity.name] = float(entry.score)
        if metric.lower() in names and chosen is None:
            chosen = float(entry.score)
    if chosen is None:
        raise UserError(
            f"evalscope report of {report.dataset_name} has no metric {metric!r}; "
            f"it has {', '.join(sorted(scores)) or 'none'}"
        )
    return chosen, scores


def run_evalscope_objective(
    objective: Any, scorer: Scorer, *, max_new_tokens: int, stop: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Run the objective's benchmark on the scorer's current weights.

    Returns the objective's metric and every metric of the report (plus ``n`` samples).
    Raises ``TrialEvaluationError`` when a request failed (the trial fails, not the worker).
    """
    _require_evalscope(objective)
    from evalscope import TaskConfig, run_task

    benchmark, dataset_args = _options(objective)
    api = _make_model_api(scorer, max_new_tokens=max_new_tokens, stop=stop)
    # A fresh work dir per evaluation: evalscope caches predictions by work dir, and a cached
    # answer would belong to a previous merge.
    work_dir = Path(tempfile.mkdtemp(prefix="mergeopt-evalscope-"))
    try:
        config = TaskConfig(
            model=api,
            datasets=[benchmark],
            dataset_args={benchmark: {**dataset_args, "local_path": str(objective.task)}},
            limit=getattr(objective, "limit", None),
            seed=getattr(objective, "subsample_seed", 0),
            work_dir=str(work_dir),
            eval_batch_size=1,
            no_timestamp=True,
        )
        try:
            reports = run_task(config)
        except UserError:
            raise
        except Exception as exc:
            raise TrialEvaluationError(
                f"evalscope {benchmark} failed: {exc.__class__.__name__}: {str(exc)[:200]}"
            ) from exc
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if api.failure is not None:
        if isinstance(api.failure, TrialEvaluationError):
            raise api.failure
        raise TrialEvaluationError(
            f"evalscope {benchmark}: the model failed: "
            f"{api.failure.__class__.__name__}: {api.failure}"
        )
    report = reports[benchmark]
    summary = getattr(report, "execution_summary", None)
    if summary is not None and getattr(summary, "errored", None):
        raise TrialEvaluationError(
            f"evalscope {benchmark}: {summary.errored} of {summary.requested} requests failed"
        )
    value, scores = _metric_value(report, objective.metric)
    scores["n"] = float(getattr(report, "num", 0) or 0)
    return value, scores


def write_general_mcq(records: Sequence[dict[str, Any]], folder: Path, *, subset: str) -> Path:
    """A local ``general_mcq`` dataset from our multiple-choice records
    (``{"question", "choices", "answer": index}``): ``folder/{subset}_val.jsonl`` with columns
    id, question, A, B, ..., answer (a letter)."""
    import json

    letters = "ABCDEFGHIJ"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subset}_val.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            row: dict[str, Any] = {"id": index, "question": record["question"]}
            row.update(zip(letters, record["choices"], strict=False))
            row["answer"] = letters[int(record["answer"])]
            handle.write(json.dumps(row) + "\n")
    return path
