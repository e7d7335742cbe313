"""The evaluator turns the resident model's answers into objective values: objectives on one task
share one pass of the model, every kind of task runs, held-out splits are separate, and a broken
merge fails the trial (not the worker)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mergeopt.errors import UserError
from mergeopt.objectives import metrics
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions
from mergeopt.objectives.scorers.base import TrialEvaluationError
from mergeopt.objectives.scorers.hf import HFScorer
from mergeopt.objectives.tasks import subsample_indices
from tests.task_files import objective, write_jsonl
from tests.tiny_models import build_tiny_model


class CountingScorer:
    """A real scorer that counts the calls made to it."""

    def __init__(self, scorer: HFScorer) -> None:
        self.scorer = scorer
        self.calls: list[tuple[str, int]] = []

    def generate(self, prompts: list[str], **options: Any) -> Any:
        self.calls.append(("generate", len(prompts)))
        return self.scorer.generate(prompts, **options)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        self.calls.append(("loglikelihood", len(pairs)))
        return self.scorer.loglikelihood(pairs)

    def rolling_loglikelihood(self, texts: list[str]) -> list[tuple[float, int]]:
        self.calls.append(("rolling_loglikelihood", len(texts)))
        return self.scorer.rolling_loglikelihood(texts)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFScorer, Path]:
    folder = tmp_path_factory.mktemp("evaluate")
    model = build_tiny_model(folder / "model")
    tasks = folder / "tasks"
    tasks.mkdir()
    write_jsonl(
        tasks / "arith.jsonl",
        [{"prompt": f"Q: {a}+{a + 3}=\nA:", "answer": 2 * a + 3} for a in range(10)],
    )
    write_jsonl(
        tasks / "mc.jsonl",
        [
            {"question": f"{a}+1=", "choices": [str(a), str(a + 1), "x"], "answer": 1}
            for a in range(6)
        ],
    )
    write_jsonl(
        tasks / "texts.jsonl", [{"text": f"the number {a} follows {a - 1}."} for a in range(5)]
    )
    return HFScorer(model_dir=model, batch_size=4), tasks


def test_accuracy_and_mean_tokens_of_one_task_share_one_generation_pass(setup: Any) -> None:
    scorer, tasks = setup
    counting = CountingScorer(scorer)
    objectives = [
        objective(tasks / "arith.jsonl", "accuracy", limit=6),
        objective(
            tasks / "arith.jsonl", "tokens", metric="mean_tokens", direction="minimize", limit=6
        ),
        objective(tasks / "arith.jsonl", "exact", extract="exact", limit=6),
    ]
    options = GenerationOptions(max_new_tokens=8, stop=("\n",))
    result = Evaluator(objectives, counting, scorer_options=options).evaluate()  # type: ignore[arg-type]
    assert counting.calls == [("generate", 6)]
    assert set(result.values) == {"accuracy", "tokens", "exact"}
    assert 1.0 <= result.values["tokens"] <= 8.0
    assert result.metrics["arith"]["n"] == 6.0
    assert result.metrics["arith"]["mean_tokens"] == result.values["tokens"]
    assert result.seconds > 0
    # the values are the metrics of the generations the scorer gives
    prompts = [f"Q: {a}+{a + 3}=\nA:" for a in range(10)]
    kept = [prompts[i] for i in subsample_indices(10, limit=6, seed=0)]
    generations = scorer.generate(kept, max_new_tokens=8, stop=["\n"])
    assert result.values["tokens"] == metrics.mean_tokens([g.num_tokens for g in generations])


def test_multiple_choice_and_perplexity_objectives(setup: Any) -> None:
    scorer, tasks = setup
    counting = CountingScorer(scorer)
    objectives = [
        objective(tasks / "mc.jsonl", "mc", kind="multiple_choice"),
        objective(
            tasks / "texts.jsonl",
            "ppl",
            kind="perplexity",
            metric="perplexity",
            direction="minimize",
        ),
    ]
    result = Evaluator(objectives, counting).evaluate()  # type: ignore[arg-type]
    assert counting.calls == [("loglikelihood", 18), ("rolling_loglikelihood", 5)]
    assert 0.0 <= result.values["mc"] <= 1.0
    texts = [f"the number {a} follows {a - 1}." for a in range(5)]
    scored = scorer.rolling_loglikelihood(texts)
    expected = math.exp(-sum(s for s, _ in scored) / sum(n for _, n in scored))
    assert result.values["ppl"] == pytest.approx(expected) and result.values["ppl"] > 1.0
    assert set(result.metrics) == {"mc", "texts"}


def test_heldout_split_scores_the_items_the_search_left_out(setup: Any, tmp_path: Path) -> None:
    scorer, tasks = setup
    counting = CountingScorer(scorer)
    heldout_file = tmp_path / "held.jsonl"
    heldout_file.write_text(json.dumps({"prompt": "Q: 1+1=\nA:", "answer": 2}) + "\n")
    objectives = [
        objective(tasks / "arith.jsonl", "by_limit", limit=6),
        objective(tasks / "arith.jsonl", "by_file", heldout=str(heldout_file)),
    ]
    Evaluator(objectives, counting, split="heldout").evaluate()  # type: ignore[arg-type]
    assert sorted(counting.calls) == [("generate", 1), ("generate", 4)]
    with pytest.raises(UserError, match="objective nothing_left: no held-out items"):
        Evaluator([objective(tasks / "arith.jsonl", "nothing_left")], scorer, split="heldout")


def test_a_merge_that_gives_nan_fails_the_trial_and_the_scorer_stays_usable(setup: Any) -> None:
    scorer, tasks = setup
    name = "model.layers.0.mlp.down_proj.weight"
    original = scorer.model.state_dict()[name].clone()
    evaluator = Evaluator([objective(tasks / "arith.jsonl", "accuracy", limit=3)], scorer)
    scorer.load_weights([(name, torch.full_like(original, math.nan))])
    try:
        with pytest.raises(TrialEvaluationError, match="non-finite logits"):
            evaluator.evaluate()
        assert scorer.healthy()
    finally:
        scorer.load_weights([(name, original)])
    assert math.isfinite(evaluator.evaluate().values["accuracy"])
