"""The transformers scorer's batched log-likelihoods (multiple choice, perplexity) are the numbers
of one sequence scored alone by a plain forward pass, whatever the batch, its padding and the
order of the requests: same sums within float rounding, same token counts, same choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeopt.objectives.scorers.base import scored_sequences
from mergeopt.objectives.scorers.hf import HFScorer
from tests.tiny_models import build_tiny_model

# Shared contexts with continuations of different lengths, contexts of very different lengths
# (one batch pads some rows by most of their width), and one-token texts that score nothing.
PAIRS = [
    ("Q: 12+7=\nA:", " 19"),
    ("Q: 12+7=\nA:", " 91"),
    ("Q: 12+7=\nA:", " 1900"),
    ("R: abc\nA:", " cba"),
    ("x", "yz"),
    ("hello world, this is a much longer context than the others are", " ok"),
    ("a", "b"),
]
TEXTS = ["abcdef", "xy", "z", "a longer text to score as a whole, token after token"]


def alone(scorer: HFScorer, ids: list[int], first: int) -> tuple[float, int]:
    """One sequence's sum of log p(token | prefix) from ``first`` on, by a plain unpadded forward
    pass over the whole sequence (the scorer's numbers before batching)."""
    if first >= len(ids):
        return 0.0, 0
    with torch.inference_mode():
        logits = scorer.model(input_ids=torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits.float(), -1)
    total = sum(float(log_probs[i - 1, ids[i]]) for i in range(first, len(ids)))
    return total, len(ids) - first


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_in_any_batch_equal_each_pair_scored_alone(
    tiny_model: Path, batch_size: int
) -> None:
    scorer = HFScorer(model_dir=tiny_model, batch_size=batch_size)
    sequences, first_scored = scored_sequences(scorer.tokenizer, PAIRS, chat_template=False)
    expected = [
        alone(scorer, ids, first)[0] for ids, first in zip(sequences, first_scored, strict=True)
    ]
    assert scorer.loglikelihood(PAIRS) == pytest.approx(expected, abs=1e-4)
    assert scorer.loglikelihood(PAIRS[::-1]) == pytest.approx(expected[::-1], abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_rolling_loglikelihoods_in_any_batch_equal_each_text_scored_alone(
    tiny_model: Path, batch_size: int
) -> None:
    scorer = HFScorer(model_dir=tiny_model, batch_size=batch_size)
    expected = [alone(scorer, scorer.tokenizer(t)["input_ids"], 1) for t in TEXTS]
    rolling = scorer.rolling_loglikelihood(TEXTS)
    assert [count for _, count in rolling] == [count for _, count in expected]
    assert [count for _, count in rolling][2] == 0  # one token: nothing to predict
    assert [total for total, _ in rolling] == pytest.approx(
        [total for total, _ in expected], abs=1e-4
    )


def test_zoo_multiple_choice_and_perplexity_batched_equal_one_at_a_time(zoo_dir: Path) -> None:
    """On the zoo's base and its own tasks: every choice's log-likelihood and every text's, in
    batches of 16, equal the same sequence scored alone; the chosen answers are the same."""
    scorer = HFScorer(model_dir=zoo_dir / "base", batch_size=16)
    questions = [json.loads(line) for line in (zoo_dir / "tasks" / "arith_mc.jsonl").open()][:12]
    pairs = [(q["question"], choice) for q in questions for choice in q["choices"]]
    sequences, first_scored = scored_sequences(scorer.tokenizer, pairs, chat_template=False)
    expected = [
        alone(scorer, ids, first)[0] for ids, first in zip(sequences, first_scored, strict=True)
    ]
    batched = scorer.loglikelihood(pairs)
    assert batched == pytest.approx(expected, abs=1e-4)

    def choices(scores: list[float]) -> list[int]:
        per_question = [scores[i : i + 4] for i in range(0, len(scores), 4)]
        return [max(range(4), key=lambda c, s=s: s[c]) for s in per_question]  # type: ignore[misc]

    assert choices(batched) == choices(expected)
    texts = [json.loads(line)["text"] for line in (zoo_dir / "tasks" / "texts.jsonl").open()][:24]
    expected_rolling = [alone(scorer, scorer.tokenizer(t)["input_ids"], 1) for t in texts]
    rolling = scorer.rolling_loglikelihood(texts)
    assert [count for _, count in rolling] == [count for _, count in expected_rolling]
    assert [total for total, _ in rolling] == pytest.approx(
        [total for total, _ in expected_rolling], abs=1e-3
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batched_loglikelihoods_equal_each_pair_alone_and_repeat_bit_for_bit(
    tiny_model: Path,
) -> None:
    scorer = HFScorer(model_dir=tiny_model, device="cuda", batch_size=4)
    sequences, first_scored = scored_sequences(scorer.tokenizer, PAIRS, chat_template=False)
    expected = []
    for ids, first in zip(sequences, first_scored, strict=True):
        with torch.inference_mode():
            logits = scorer.model(input_ids=torch.tensor([ids], device="cuda")).logits[0]
        log_probs = torch.log_softmax(logits.float(), -1)
        expected.append(sum(float(log_probs[i - 1, ids[i]]) for i in range(first, len(ids))))
    first_run = scorer.loglikelihood(PAIRS)
    assert first_run == pytest.approx(expected, abs=1e-4)
    assert scorer.loglikelihood(PAIRS) == first_run
