"""The tiny model zoo: its layout, loadable models, the trade-off it was built for, and merges
of its experts that move both objectives."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from mergeopt.errors import UserError
from mergeopt.zoo import (
    BASE_NAME,
    EXPERT_NAMES,
    TASK_FILES,
    ZOO_VERSION,
    ZooInfo,
    _build_zoo,
    _generate_and_score,
    _make_tokenizer,
    _read_jsonl,
    _Recipe,
    arith_steps_answer,
    build_zoo,
)

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)

# A build small enough to run twice in a test: it checks the machinery, not the skills.
TINY_RECIPE = dataclasses.replace(
    _Recipe(), base_steps=6, direct_steps=4, steps_steps=4, split_size=12, eval_limit=4
)


def test_steps_trace_carries_digit_by_digit_and_ends_with_the_sum() -> None:
    assert arith_steps_answer(47, 85) == " 7+5=12, 4+8+1=13 => 132\n"
    assert arith_steps_answer(23, 14) == " 3+4=7, 2+1=3 => 37\n"


def test_tokenizer_gives_one_token_per_character_and_decodes_back() -> None:
    tokenizer = _make_tokenizer()
    text = "Q: 47+85=\nA: 7+5=12, 4+8+1=13 => 132\nR: abc\nA: cba\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"


def test_build_refuses_a_folder_that_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        build_zoo(tmp_path, progress=False)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_an_unfinished_zoo_is_refused_by_from_dir(tmp_path: Path) -> None:
    (tmp_path / BASE_NAME).mkdir()
    with pytest.raises(UserError, match="zoo.json"):
        ZooInfo.from_dir(tmp_path)


def _tensor_digests(model_dir: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {
        name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
        for name, tensor in load_file(model_dir / "model.safetensors").items()
    }


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path: Path) -> None:
    first = _build_zoo(tmp_path / "a", seed=3, progress=False, recipe=TINY_RECIPE)
    second = _build_zoo(tmp_path / "b", seed=3, progress=False, recipe=TINY_RECIPE)
    other = _build_zoo(tmp_path / "c", seed=4, progress=False, recipe=TINY_RECIPE)
    for name in (BASE_NAME, *EXPERT_NAMES):
        assert _tensor_digests(first.root / name) == _tensor_digests(second.root / name), name
        assert _tensor_digests(first.root / name) != _tensor_digests(other.root / name), name
    for task in TASK_FILES.values():
        assert (first.root / "tasks" / task).read_bytes() == (
            second.root / "tasks" / task
        ).read_bytes()
    assert not list(tmp_path.glob(".*building*")), "the staging folder must be gone"


@pytest.mark.slow
def test_rebuilding_replaces_a_previous_zoo(tmp_path: Path) -> None:
    _build_zoo(tmp_path / "zoo", seed=0, progress=False, recipe=TINY_RECIPE)
    (tmp_path / "zoo" / "zoo.json").unlink()  # as if killed before finishing
    info = _build_zoo(tmp_path / "zoo", seed=0, progress=False, recipe=TINY_RECIPE)
    assert ZooInfo.from_dir(info.root).metadata["seed"] == 0


@pytest.mark.slow
def test_zoo_has_the_promised_layout(zoo_dir: Path) -> None:
    info = ZooInfo.from_dir(zoo_dir)
    assert info.metadata["zoo_version"] == ZOO_VERSION
    for folder in (info.base, *info.experts.values()):
        for file in MODEL_FILES:
            assert (folder / file).is_file(), folder / file
        assert not list(folder.glob("*.bin")), "safetensors only"
    for path in info.tasks.values():
        assert path.is_file()

    arith = _read_jsonl(info.tasks["arith"])
    heldout = _read_jsonl(info.tasks["arith.heldout"])
    assert {r["prompt"] for r in arith}.isdisjoint(r["prompt"] for r in heldout)
    for record in arith + heldout:
        a, b = record["prompt"].removeprefix("Q: ").split("=")[0].split("+")
        assert record["answer"] == str(int(a) + int(b))
    reverse = _read_jsonl(info.tasks["reverse"])
    reverse_heldout = _read_jsonl(info.tasks["reverse.heldout"])
    assert {r["prompt"] for r in reverse}.isdisjoint(r["prompt"] for r in reverse_heldout)
    for record in reverse:
        assert record["prompt"] == f"R: {record['answer'][::-1]}\nA:"
    for record in _read_jsonl(info.tasks["arith_mc"]):
        assert len(record["choices"]) == len(set(record["choices"])) == 4
        a, b = record["question"].removeprefix("Q: ").split("=")[0].split("+")
        assert record["choices"][record["answer"]] == str(int(a) + int(b))
    assert all(r["text"] for r in _read_jsonl(info.tasks["texts"]))


@pytest.mark.slow
def test_models_load_with_auto_classes_and_stop_at_eos(zoo_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in (BASE_NAME, *EXPERT_NAMES):
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / name)
        tokenizer = AutoTokenizer.from_pretrained(zoo_dir / name)
        config = model.config
        assert config.model_type == "qwen2" and config.head_dim == 64
        assert config.num_hidden_layers >= 8 and not config.tie_word_embeddings
        assert config.num_key_value_heads < config.num_attention_heads  # GQA
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        prompt = "Q: 47+85=\nA:"
        assert len(tokenizer.encode(prompt, add_special_tokens=False)) == len(prompt)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False)
        assert out[0, -1].item() == tokenizer.eos_token_id, name


@pytest.mark.slow
def test_experts_trade_accuracy_against_length_and_task_against_task(
    zoo_dir: Path,
) -> None:
    metrics = json.loads((zoo_dir / "zoo.json").read_text())["models"]
    base, direct, steps = (metrics[n] for n in (BASE_NAME, *EXPERT_NAMES))
    # The SIPBMM trade-off: the trace is more accurate and longer.
    assert steps["arith"]["accuracy"] > direct["arith"]["accuracy"] + 0.5
    assert steps["arith"]["mean_tokens"] > 3 * direct["arith"]["mean_tokens"]
    # Task against task: only expert-direct learned the longer reversals.
    assert direct["reverse"]["accuracy"] > steps["reverse"]["accuracy"] + 0.5
    # The base is weak at both.
    assert base["arith"]["accuracy"] < 0.1
    assert base["reverse"]["accuracy"] < direct["reverse"]["accuracy"] - 0.4


@pytest.mark.slow
def test_a_task_arithmetic_merge_of_the_experts_moves_both_objectives(
    zoo_dir: Path,
) -> None:
    """merged = base + 0.5 (direct - base) + 0.5 (steps - base), in plain torch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(name: str):  # noqa: ANN202
        return AutoModelForCausalLM.from_pretrained(zoo_dir / name, dtype="float32")

    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / BASE_NAME)
    records = _read_jsonl(zoo_dir / "tasks" / TASK_FILES["arith.heldout"])[:100]
    base = load(BASE_NAME).state_dict()
    experts = {name: load(name) for name in EXPERT_NAMES}
    scores = {name: _generate_and_score(m, tokenizer, records) for name, m in experts.items()}

    merged = load(BASE_NAME)
    deltas = [model.state_dict() for model in experts.values()]
    merged.load_state_dict(
        {key: base[key] + sum(0.5 * (d[key] - base[key]) for d in deltas) for key in base}
    )
    merged_score = _generate_and_score(merged, tokenizer, records)
    for name, score in scores.items():
        assert merged_score["accuracy"] != score["accuracy"], name
        assert merged_score["mean_tokens"] != score["mean_tokens"], name
