"""Normalization: anchors are the source models' own scores (measured by loading each model into
the resident scorer, which holds the base again afterwards), and a value maps to 0 at the weakest
anchor and 1 at the strongest, keeping its direction."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mergeopt.blocks import BlockLayout
from mergeopt.merge.engine import MergeEngine
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions
from mergeopt.objectives.normalization import (
    Anchors,
    measure_anchors,
    needs_anchors,
    normalize_value,
    normalize_values,
)
from mergeopt.objectives.scorers.hf import HFScorer
from tests.task_files import objective, write_jsonl
from tests.test_scorer_hf import PROMPTS
from tests.tiny_models import build_tiny_model


def test_values_map_to_zero_at_the_weakest_anchor_and_one_at_the_strongest() -> None:
    anchors = Anchors(base={"acc": 0.2, "tokens": 10.0}, experts=[{"acc": 0.6, "tokens": 50.0}])
    assert anchors.span("acc") == (0.2, 0.6)
    assert normalize_value(0.2, lo=0.2, hi=0.6) == 0.0
    assert normalize_value(0.6, lo=0.2, hi=0.6) == pytest.approx(1.0)
    assert normalize_value(0.8, lo=0.2, hi=0.6) == pytest.approx(1.5)
    assert normalize_value(0.3, lo=0.5, hi=0.5) == pytest.approx(-0.2)
    objectives = [
        SimpleNamespace(name="acc", normalize=True),
        SimpleNamespace(name="tokens", normalize=False),
    ]
    assert needs_anchors(objectives) and not needs_anchors(objectives[1:])
    assert normalize_values({"acc": 0.4, "tokens": 30.0}, anchors, objectives) == pytest.approx(
        {"acc": 0.5, "tokens": 30.0}
    )
    assert Anchors.from_json(json.loads(json.dumps(anchors.to_json()))) == anchors
    with pytest.raises(KeyError, match="no anchors for objective 'other'"):
        anchors.span("other")


@pytest.mark.slow
def test_anchors_are_each_models_own_scores_and_the_base_is_restored(tmp_path: Path) -> None:
    models = {n: build_tiny_model(tmp_path / n, seed=s) for n, s in (("base", 0), ("e1", 1))}
    task = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(6)]
    )
    objectives = [objective(task, "tokens", metric="mean_tokens", normalize=True)]
    options = GenerationOptions(max_new_tokens=12, stop=("\n",))
    scorer = HFScorer(model_dir=models["base"])
    engine = MergeEngine(
        base=models["base"],
        experts=[models["e1"]],
        layout=BlockLayout.fixed(2, num_blocks=1),
        method="task_arithmetic",
    )
    recipe = [[{"weight": 0.5}], [{"weight": 0.5}]]
    engine.merge(recipe, target=scorer.merge_target())
    merged_outputs = scorer.generate(PROMPTS, max_new_tokens=12, stop=["\n"])

    evaluator = Evaluator(objectives, scorer, scorer_options=options)
    anchors = measure_anchors(
        evaluator, scorer, base_dir=models["base"], expert_dirs=[models["e1"]], engine=engine
    )

    for name, values in (("base", anchors.base), ("e1", anchors.experts[0])):
        alone = HFScorer(model_dir=models[name])
        assert values == Evaluator(objectives, alone, scorer_options=options).evaluate().values
    assert anchors.models == [str(models["base"]), str(models["e1"])]
    # the engine was told the scorer holds the base again: the same recipe is fully re-merged
    assert engine.merge(recipe, target=scorer.merge_target()).blocks_merged == 2
    assert scorer.generate(PROMPTS, max_new_tokens=12, stop=["\n"]) == merged_outputs
