"""Scores of the encoder zoo's models and of a merge of its experts, and their table.

Each model is scored the way a study scores it (the classifier scorer and the ``Evaluator`` on
``classification`` objectives), on the held-out file of every task; the merge is built by the
study's merge engine, its head zero-padded as every merge of the experts is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.zoo import encoder_tasks

if TYPE_CHECKING:
    from mergeopt.progress import Stages


@dataclass(frozen=True)
class _Objective:
    """The fields of a spec's objective that the ``Evaluator`` reads."""

    name: str
    task: str
    kind: str = "classification"
    metric: str = "accuracy"
    head: int = 0
    limit: int | None = None
    subsample_seed: int = 0
    heldout: str | None = None


def score_encoder_zoo(
    root: Path,
    *,
    base: str,
    experts: Mapping[str, str],
    progress: Stages,
    merge: Mapping[str, Any],
) -> dict[str, Any]:
    """``{"models": {model: {task: accuracy}}, "merges": {"ties": {task: accuracy}},
    "chance": {task: accuracy of the most frequent label}}`` on the held-out files, each task
    answered by its expert's head on the model's body (as studies score it). ``base`` and
    ``experts`` (task -> name) are the models' folder names in ``root``."""
    import json

    import torch

    from mergeopt.blocks import BlockLayout
    from mergeopt.merge.engine import MergeEngine
    from mergeopt.objectives.evaluate import Evaluator
    from mergeopt.objectives.normalization import iter_checkpoint_tensors
    from mergeopt.objectives.scorers.classifier import ClassifierScorer

    tasks = list(encoder_tasks.LABEL_COUNTS)
    objectives = [
        _Objective(name=task, task=str(root / "tasks" / f"{task}.heldout.jsonl"), head=index)
        for index, task in enumerate(tasks)
    ]
    models = {name: root / name for name in (base, *experts.values())}
    advance = progress.begin("scoring the models and a merge", len(models) + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and never spins
    try:
        expert_dirs = [models[experts[task]] for task in tasks]
        scorer = ClassifierScorer(model_dir=models[base], batch_size=256, expert_dirs=expert_dirs)
        evaluator = Evaluator(objectives, scorer)
        scores: dict[str, Any] = {"models": {}, "merges": {}}
        for name, folder in models.items():
            scorer.load_weights(iter_checkpoint_tensors(folder))
            scores["models"][name] = _rounded(evaluator.evaluate().values)
            advance()
        engine = MergeEngine(
            base=models[base],
            experts=expert_dirs,
            layout=BlockLayout.fixed(scorer.model.config.num_hidden_layers, num_blocks=1),
            method=str(merge["method"]),
        )
        expert_params = {k: float(v) for k, v in merge.items() if k != "method"}
        engine.merge([[expert_params] * len(tasks)] * 2, target=scorer.merge_target())
        scores["merges"][str(merge["method"])] = _rounded(evaluator.evaluate().values)
        advance()
        scorer.close()
    finally:
        torch.set_num_threads(threads)
    progress.end()
    chance = {}
    for objective in objectives:
        labels = [
            json.loads(line)["label"] for line in Path(objective.task).read_text().splitlines()
        ]
        chance[objective.name] = round(max(labels.count(v) for v in set(labels)) / len(labels), 4)
    scores["chance"] = chance
    scores["merge_recipe"] = dict(merge)
    return scores


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in values.items()}


def score_table(metadata: Mapping[str, Any]) -> str:
    """The zoo's scores as a Markdown table: a row per model (its body; each task answered by
    its expert's head, as studies score it) and merge, a column per task."""
    tasks = list(encoder_tasks.LABEL_COUNTS)
    header = (
        "| model | " + " | ".join(f"{t} ({encoder_tasks.LABEL_COUNTS[t]})" for t in tasks) + " |"
    )
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    rows = [("chance (majority label)", metadata["chance"])]
    rows += list(metadata["models"].items())
    rows += [
        (f"{name} merge of the 4 experts", values) for name, values in metadata["merges"].items()
    ]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(f"{values[t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines)
