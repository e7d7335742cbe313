"""The transformers scorer: batched greedy generation agrees with transformers' own greedy
``generate`` and with one prompt at a time, stops where it should, counts tokens to the stop,
scores log-likelihoods as a plain forward pass does, and takes new weights in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeopt.objectives.scorers import SCORERS, create_scorer
from mergeopt.objectives.scorers.base import Generation, Scorer, TrialEvaluationError
from mergeopt.objectives.scorers.hf import HFScorer
from tests.tiny_models import build_tiny_model

PROMPTS = ["Q: 12+7=\nA:", "R: abc\nA:", "hello world, this is a longer prompt", "x"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def scorer(tiny_model: Path) -> HFScorer:
    return HFScorer(model_dir=tiny_model, batch_size=3)


def _reference_greedy(scorer: HFScorer, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one prompt (no padding), EOS disabled."""
    ids = scorer.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = scorer.model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        min_new_tokens=max_new_tokens,
    )
    return out[0, ids.shape[1] :].tolist()


def test_the_scorer_satisfies_the_protocol(scorer: HFScorer) -> None:
    assert isinstance(scorer, Scorer)


def test_batched_greedy_generation_equals_transformers_generate_per_prompt(
    scorer: HFScorer,
) -> None:
    scorer.eos_token_ids = set()  # compare full-length outputs; EOS is tested on its own
    try:
        outputs = scorer.generate(PROMPTS, max_new_tokens=12, stop=[])
    finally:
        scorer.eos_token_ids = {1}
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = _reference_greedy(scorer, prompt, 12)
        assert output == Generation(
            text=scorer.tokenizer.decode(expected, skip_special_tokens=True), num_tokens=12
        )


def test_batch_size_and_order_do_not_change_outputs(scorer: HFScorer, tiny_model: Path) -> None:
    together = scorer.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    alone = [scorer.generate([p], max_new_tokens=10, stop=["\n"])[0] for p in PROMPTS]
    assert together == alone
    reversed_outputs = scorer.generate(PROMPTS[::-1], max_new_tokens=10, stop=["\n"])
    assert reversed_outputs == together[::-1]


def test_generation_stops_before_the_stop_string_and_counts_tokens_through_it(
    scorer: HFScorer,
) -> None:
    tokens = _reference_greedy(scorer, PROMPTS[0], 16)
    full_text = scorer.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = full_text[5:7]
    cut = full_text.find(stop)
    # the token that completes the stop string ends the generation and is counted
    through_stop = next(
        k
        for k in range(1, 17)
        if stop in scorer.tokenizer.decode(tokens[:k], skip_special_tokens=True)
    )
    scorer.eos_token_ids = set()
    try:
        stopped = scorer.generate([PROMPTS[0]], max_new_tokens=16, stop=["@@never", stop])[0]
    finally:
        scorer.eos_token_ids = {1}
    assert stopped == Generation(text=full_text[:cut], num_tokens=through_stop)


def test_eos_ends_a_generation_and_is_counted_but_not_shown(scorer: HFScorer) -> None:
    scorer.eos_token_ids = set()
    try:
        tokens = _reference_greedy(scorer, PROMPTS[1], 8)
        scorer.eos_token_ids = {tokens[3]}
        output = scorer.generate([PROMPTS[1]], max_new_tokens=8, stop=[])[0]
    finally:
        scorer.eos_token_ids = {1}
    first = tokens.index(tokens[3])
    assert output == Generation(
        text=scorer.tokenizer.decode(tokens[:first], skip_special_tokens=True), num_tokens=first + 1
    )


def test_loglikelihood_equals_a_plain_forward_pass(scorer: HFScorer) -> None:
    pairs = [("Q: 12+7=\nA:", " 19"), ("R: abc\nA:", " cba"), ("x", "yz")]
    scores = scorer.loglikelihood(pairs)
    for (context, continuation), score in zip(pairs, scores, strict=True):
        context_ids = scorer.tokenizer(context)["input_ids"]
        ids = scorer.tokenizer(context + continuation, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(scorer.model(ids).logits[0].float(), -1)
        expected = sum(
            float(log_probs[i - 1, ids[0, i]]) for i in range(len(context_ids), ids.shape[1])
        )
        assert score == pytest.approx(expected, abs=1e-4)
    rolling = scorer.rolling_loglikelihood(["abcdef", "xy"])
    assert [count for _, count in rolling] == [5, 1]
    assert rolling[1][0] == pytest.approx(scorer.loglikelihood([("x", "y")])[0], abs=1e-5)


def test_weights_written_by_name_change_outputs_and_restoring_them_restores_outputs(
    tiny_model: Path,
) -> None:
    scorer = create_scorer("hf", tiny_model, batch_size=4)
    before = scorer.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    base = {name: t.detach().clone() for name, t in scorer.model.state_dict().items()}
    scorer.load_weights((name, -1.5 * t) for name, t in base.items() if "mlp" in name)
    changed = scorer.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    scorer.load_weights(base.items())
    assert changed != before
    assert scorer.generate(PROMPTS, max_new_tokens=10, stop=["\n"]) == before
    with pytest.raises(KeyError, match="no tensor named"):
        scorer.load_weights([("model.nonexistent.weight", torch.zeros(1))])
    assert scorer.healthy()
    scorer.close()


def test_out_of_memory_fails_the_trial_with_the_reason(scorer: HFScorer) -> None:
    def exhausts_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(TrialEvaluationError, match="out of memory on cpu: CUDA out of memory"):
        scorer._guarded(exhausts_memory)
    assert scorer.healthy()


def test_the_spec_accepts_exactly_the_registered_backends() -> None:
    from pydantic import ValidationError

    from mergeopt.spec import ScorerSpec

    for backend in SCORERS:
        assert ScorerSpec(backend=backend).backend == backend
    with pytest.raises(ValidationError, match="Input should be 'hf', 'vllm' or 'classifier'"):
        ScorerSpec(backend="tgi")


def test_an_unknown_backend_or_a_missing_chat_template_is_a_user_error(tiny_model: Path) -> None:
    from mergeopt.errors import UserError

    with pytest.raises(UserError, match="unknown backend 'tgi'"):
        create_scorer("tgi", tiny_model)
    with pytest.raises(UserError, match="chat_template is on but the tokenizer"):
        HFScorer(model_dir=tiny_model, chat_template=True).generate(
            ["x"], max_new_tokens=1, stop=[]
        )


@pytest.mark.parametrize(
    ("scorer", "objective", "dead"),
    [
        ({"backend": "vllm", "decode": "static"}, {}, "scorer.decode"),
        ({"backend": "vllm", "batch_size": 8}, {}, "scorer.batch_size"),
        ({"backend": "hf", "gpu_memory_utilization": 0.5}, {}, "scorer.gpu_memory_utilization"),
        ({"backend": "hf", "enforce_eager": True}, {}, "scorer.enforce_eager"),
        (
            {"backend": "classifier", "max_new_tokens": 8},
            {"kind": "classification", "head": 0},
            "scorer.max_new_tokens",
        ),
    ],
)
def test_a_scorer_option_its_backend_does_not_read_is_refused_in_one_line(
    scorer: dict, objective: dict, dead: str
) -> None:
    from mergeopt.errors import UserError
    from mergeopt.spec import parse_spec

    data = {
        "models": {"base": "/a", "experts": ["/b"]},
        "merge": {"method": "ties", "search": {"weight": [0, 1]}},
        "objectives": [{"name": "accuracy", "task": "/t.jsonl", **objective}],
        "scorer": scorer,
    }
    with pytest.raises(UserError, match=f"{dead}: backend {scorer['backend']} does not use it"):
        parse_spec(data, source="s.yaml", folder=Path("/"))
