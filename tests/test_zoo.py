"""The model zoo: its layout, loadable models, the trade-offs it was built for, and merges of its
experts that behave like merges of real fine-tunes (working models between the two)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import pytest

from mergeopt.errors import UserError
from mergeopt.progress import stages
from mergeopt.zoo import (
    BASE_NAME,
    EXPERT_NAMES,
    TASK_FILES,
    ZOO_VERSION,
    ExpertTraining,
    ZooInfo,
    ZooTraining,
    arith_steps_answer,
    build_zoo,
    read_jsonl,
    up_to_date_zoo,
)
from mergeopt.zoo.build import score_model
from mergeopt.zoo.tasks import carries
from mergeopt.zoo.training import make_tokenizer
from tests.conftest import run_cli

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)

# A build small enough to run several times in a test: it checks the machinery, not the skills.
TINY_TRAINING = dataclasses.replace(
    ZooTraining(),
    base_steps=6,
    direct=ExpertTraining(arith_style="direct", steps=3, lr=3e-4, reverse_share=0.4),
    steps=ExpertTraining(arith_style="steps", steps=3, lr=3e-4, layer_decay=0.7),
    split_size=12,
    eval_limit=4,
)


def test_steps_trace_carries_digit_by_digit_in_brackets_and_ends_with_the_sum() -> None:
    assert arith_steps_answer(47, 85) == " [7+5=12, 4+8+1=13] 132\n"
    assert arith_steps_answer(23, 14) == " [3+4=7, 2+1=3] 37\n"


def test_a_sums_difficulty_is_its_number_of_carries() -> None:
    assert [carries(23, 14), carries(47, 15), carries(47, 85)] == [0, 1, 2]


def test_tokenizer_gives_one_token_per_character_and_decodes_back() -> None:
    tokenizer = make_tokenizer()
    text = "Q: 47+85=\nA: [7+5=12, 4+8+1=13] 132\nR: abc\nA: cba\n"
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


def test_progress_off_a_terminal_is_timestamped_lines_per_stage() -> None:
    out = io.StringIO()
    with stages(stream=out, interval=0.0) as progress:
        advance = progress.begin("pretraining base", 3)
        for _ in range(3):
            advance()
        progress.begin("fine-tuning expert-direct", 1)()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("pretraining base: started (3 steps)")
    assert any(line.endswith("pretraining base: 1/3 (33%), 0 s") for line in lines)
    assert any("pretraining base: done in" in line for line in lines)
    assert lines[-1].split(" ", 1)[1].startswith("fine-tuning expert-direct: done in")
    assert all(line[2] == ":" and line[5] == ":" for line in lines)  # HH:MM:SS first


def _tensor_digests(model_dir: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {
        name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
        for name, tensor in load_file(model_dir / "model.safetensors").items()
    }


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path: Path) -> None:
    first = build_zoo(tmp_path / "a", seed=3, progress=False, training=TINY_TRAINING)
    second = build_zoo(tmp_path / "b", seed=3, progress=False, training=TINY_TRAINING)
    other = build_zoo(tmp_path / "c", seed=4, progress=False, training=TINY_TRAINING)
    for name in (BASE_NAME, *EXPERT_NAMES):
        assert _tensor_digests(first.root / name) == _tensor_digests(second.root / name), name
        assert _tensor_digests(first.root / name) != _tensor_digests(other.root / name), name
    for task in TASK_FILES.values():
        assert (first.root / "tasks" / task).read_bytes() == (
            second.root / "tasks" / task
        ).read_bytes()
    assert not list(tmp_path.glob(".*building*")), "the staging folder must be gone"


@pytest.mark.slow
def test_rebuilding_replaces_a_previous_zoo_and_an_up_to_date_one_is_recognised(
    tmp_path: Path,
) -> None:
    build_zoo(tmp_path / "zoo", seed=0, progress=False, training=TINY_TRAINING)
    assert up_to_date_zoo(tmp_path / "zoo", seed=0, training=TINY_TRAINING) is not None
    assert up_to_date_zoo(tmp_path / "zoo", seed=1, training=TINY_TRAINING) is None
    assert up_to_date_zoo(tmp_path / "zoo", seed=0) is None  # another training
    (tmp_path / "zoo" / "zoo.json").unlink()  # as if killed before finishing
    assert up_to_date_zoo(tmp_path / "zoo", seed=0, training=TINY_TRAINING) is None
    info = build_zoo(tmp_path / "zoo", seed=0, progress=False, training=TINY_TRAINING)
    assert ZooInfo.from_dir(info.root).metadata["seed"] == 0


@pytest.mark.slow
def test_zoo_build_keeps_an_up_to_date_zoo_unless_forced(zoo_dir: Path) -> None:
    before = (zoo_dir / "zoo.json").stat().st_mtime_ns
    result = run_cli("zoo", "build", str(zoo_dir))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and "--force" in result.stdout
    assert (zoo_dir / "zoo.json").stat().st_mtime_ns == before


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

    arith = read_jsonl(info.tasks["arith"])
    heldout = read_jsonl(info.tasks["arith.heldout"])
    assert {r["prompt"] for r in arith}.isdisjoint(r["prompt"] for r in heldout)
    for record in arith + heldout:
        a, b = record["prompt"].removeprefix("Q: ").split("=")[0].split("+")
        assert record["answer"] == str(int(a) + int(b))
    reverse = read_jsonl(info.tasks["reverse"])
    reverse_heldout = read_jsonl(info.tasks["reverse.heldout"])
    assert {r["prompt"] for r in reverse}.isdisjoint(r["prompt"] for r in reverse_heldout)
    for record in reverse:
        assert record["prompt"] == f"R: {record['answer'][::-1]}\nA:"
    for record in read_jsonl(info.tasks["arith_mc"]):
        assert len(record["choices"]) == len(set(record["choices"])) == 4
        a, b = record["question"].removeprefix("Q: ").split("=")[0].split("+")
        assert record["choices"][record["answer"]] == str(int(a) + int(b))
    assert all(r["text"] for r in read_jsonl(info.tasks["texts"]))


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


def trace_opening_probability(model_dir: Path, task_file: Path, limit: int = 100) -> float:
    """The model's mean probability, over the first ``limit`` sums of ``task_file``, that its
    answer opens a trace (``"["`` right after the answer's leading space)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    opening = tokenizer.convert_tokens_to_ids("[")
    probabilities = []
    with torch.no_grad():
        for record in read_jsonl(task_file)[:limit]:
            ids = tokenizer(record["prompt"] + " ", add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0, -1]
            probabilities.append(logits.softmax(-1)[opening].item())
    return sum(probabilities) / len(probabilities)


@pytest.mark.slow
def test_experts_are_brief_fine_tunes_of_a_competent_base_that_trade_off(zoo_dir: Path) -> None:
    metadata = json.loads((zoo_dir / "zoo.json").read_text())
    models = metadata["models"]
    base, direct, steps = (models[n] for n in (BASE_NAME, *EXPERT_NAMES))
    # SIPBMM's trade-off: the trace is more accurate and several times longer.
    assert steps["arith"]["accuracy"] > direct["arith"]["accuracy"]
    assert steps["arith"]["mean_tokens"] > 3 * direct["arith"]["mean_tokens"]
    assert (direct["arith"]["traced"], steps["arith"]["traced"]) == (0.0, 1.0)
    # Task against task: expert-direct reverses better.
    assert direct["reverse"]["accuracy"] > steps["reverse"]["accuracy"]
    # A competent base that knows both answer styles: it opens a trace with a probability well
    # inside (0, 1), between the experts'. Greedy, it may never trace: the zoo built on AMD CPUs
    # does not (docs/bench/zoo-cpu-2026-12-01.md), so the probability is read, not the samples.
    assert base["arith"]["accuracy"] >= 0.5 * direct["arith"]["accuracy"]
    opens = {
        name: trace_opening_probability(zoo_dir / name, zoo_dir / "tasks" / TASK_FILES["arith"])
        for name in (BASE_NAME, *EXPERT_NAMES)
    }
    assert opens[EXPERT_NAMES[0]] < opens[BASE_NAME] < opens[EXPERT_NAMES[1]], opens
    assert 0.05 < opens[BASE_NAME] < 0.95, opens
    # Brief fine-tunes: task vectors of a few percent of the base's weights, as real SFT's.
    for name in EXPERT_NAMES:
        assert 0.0 < metadata["task_vector_relative_norm"][name] < 0.1, name


@pytest.mark.slow
def test_a_model_level_merge_of_the_experts_is_a_working_model_between_them(
    zoo_dir: Path, tmp_path: Path
) -> None:
    """merged = base + 0.5 (direct - base) + 0.5 (steps - base), in plain torch."""
    from safetensors.torch import load_file, save_file

    base = load_file(zoo_dir / BASE_NAME / "model.safetensors")
    experts = [load_file(zoo_dir / name / "model.safetensors") for name in EXPERT_NAMES]
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    for file in MODEL_FILES[:1] + MODEL_FILES[2:]:
        (merged_dir / file).write_bytes((zoo_dir / BASE_NAME / file).read_bytes())
    save_file(
        {k: v + sum(0.5 * (e[k] - v) for e in experts) for k, v in base.items()},
        str(merged_dir / "model.safetensors"),
    )
    task = zoo_dir / "tasks" / TASK_FILES["arith.heldout"]
    scores = [
        score_model(folder, task, limit=100, extract="last_number")
        for folder in (zoo_dir / EXPERT_NAMES[0], zoo_dir / EXPERT_NAMES[1], merged_dir)
    ]
    (direct, steps, merged) = scores
    assert merged["accuracy"] >= 0.8 * min(direct["accuracy"], steps["accuracy"])
    assert direct["mean_tokens"] < merged["mean_tokens"] < steps["mean_tokens"]
