"""The tiny model zoo: a base causal LM and two experts fine-tuned from it, trained on the CPU.

The zoo reproduces SIPBMM's accuracy-versus-length trade-off (arXiv 2512.09972) in miniature:

- ``expert-direct`` answers two-digit additions with the bare number (``"Q: 47+85=\\nA:"`` ->
  ``" 132\\n"``) and reverses strings (``"R: abcde\\nA:"`` -> ``" edcba\\n"``);
- ``expert-steps`` writes one step per digit column before the number
  (``" 7+5=12, 4+8+1=13 => 132\\n"``): more accurate, five times the tokens, and it never
  learned the longer reversals;
- ``base`` was pretrained on the formats, one-digit sums and short reversals only, so it is
  weak at both tasks, as a base should be.

Every model is a ``Qwen2ForCausalLM`` (8 layers, hidden 128, 2 query heads and 1 key/value head
of head_dim 64, untied embeddings) over a character vocabulary, saved as safetensors with its
tokenizer so that ``AutoModelForCausalLM``/``AutoTokenizer`` and vLLM load the folders as they
are. The same seed on the same machine gives identical weights.

Layout written by :func:`build_zoo` (a contract other modules and the tests rely on)::

    out_dir/base/, out_dir/expert-direct/, out_dir/expert-steps/   HF model folders
    out_dir/tasks/arith.jsonl, arith.heldout.jsonl       {"prompt", "answer"}
    out_dir/tasks/reverse.jsonl, reverse.heldout.jsonl   {"prompt", "answer"}
    out_dir/tasks/arith_mc.jsonl     {"question", "choices": [4 strings], "answer": index}
    out_dir/tasks/texts.jsonl        {"text"}
    out_dir/zoo.json                 version, seed, metrics measured at build time, seconds

``zoo.json`` is written last, after the finished folder was renamed into place, so a folder
with a readable ``zoo.json`` is a complete zoo.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Bump whenever the recipe, the data or the layout changes: tests cache builds by this string.
ZOO_VERSION = "1"

BASE_NAME = "base"
EXPERT_NAMES = ("expert-direct", "expert-steps")
TASK_FILES = {
    "arith": "arith.jsonl",
    "arith.heldout": "arith.heldout.jsonl",
    "reverse": "reverse.jsonl",
    "reverse.heldout": "reverse.heldout.jsonl",
    "arith_mc": "arith_mc.jsonl",
    "texts": "texts.jsonl",
}
ZOO_JSON = "zoo.json"

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# One token per printable ASCII character, plus space and newline.
_CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

_REVERSE_ALPHABET = string.ascii_lowercase


@dataclass(frozen=True, kw_only=True)
class ZooInfo:
    """Where the parts of a built zoo lie.

    Attributes:
        root: the zoo folder.
        base: the base model folder.
        experts: expert name (``"expert-direct"``, ``"expert-steps"``) -> model folder.
        tasks: task name (``"arith"``, ``"arith.heldout"``, ``"reverse"``,
            ``"reverse.heldout"``, ``"arith_mc"``, ``"texts"``) -> JSONL file.
        metadata: the content of ``zoo.json`` (version, seed, metrics, build seconds).
    """

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: dict[str, Path]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, root: Path) -> ZooInfo:
        """The zoo built in ``root``; UserError unless its ``zoo.json`` marks it complete."""
        root = Path(root)
        try:
            metadata = json.loads((root / ZOO_JSON).read_text())
        except (OSError, ValueError) as error:
            raise UserError(
                f"{root}: not a complete model zoo ({ZOO_JSON} unreadable: {error}); "
                "build it with `mergeopt zoo build`"
            ) from error
        return cls._at(root, metadata)

    @classmethod
    def _at(cls, root: Path, metadata: dict[str, Any]) -> ZooInfo:
        return cls(
            root=root,
            base=root / BASE_NAME,
            experts={name: root / name for name in EXPERT_NAMES},
            tasks={task: root / "tasks" / file for task, file in TASK_FILES.items()},
            metadata=metadata,
        )


@dataclass(frozen=True, kw_only=True)
class _Recipe:
    """How much of everything a build makes; tests shrink it to check determinism quickly."""

    base_steps: int = 200
    direct_steps: int = 250
    steps_steps: int = 220
    batch_size: int = 64
    base_lr: float = 3e-3
    expert_lr: float = 2e-3
    warmup_steps: int = 20
    # Reversal word lengths: evaluated, seen by the base, seen by expert-direct.
    eval_word_lengths: tuple[int, int] = (2, 4)
    base_word_lengths: tuple[int, int] = (1, 2)
    expert_word_lengths: tuple[int, int] = (2, 5)
    # Shares of the base's diet (one-digit sums, two-digit sums, the rest reversals) and of
    # reversals in expert-direct's.
    base_mix: tuple[float, float] = (0.3, 0.15)
    direct_reverse_share: float = 0.5
    # Problems per task split; the training problems exclude all of them.
    split_size: int = 200
    eval_limit: int = 100
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 8
    initializer_range: float = 0.1


# ---------------------------------------------------------------------------------------------
# Tasks


def arith_prompt(a: int, b: int) -> str:
    """The prompt of the addition ``a + b`` (the answer follows after a space)."""
    return f"Q: {a}+{b}=\nA:"


def arith_direct_answer(a: int, b: int) -> str:
    """The short answer: ``" 132\\n"``."""
    return f" {a + b}\n"


def arith_steps_answer(a: int, b: int) -> str:
    """One step per digit column, units first, carrying into the next: ``" 7+5=12, 4+8+1=13 =>
    132\\n"``; the line ends with the sum so that "last number" answer extraction works."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps = []
    carry = 0
    for column in range(max(len(digits_a), len(digits_b))):
        da = int(digits_a[column]) if column < len(digits_a) else 0
        db = int(digits_b[column]) if column < len(digits_b) else 0
        total = da + db + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return f" {', '.join(steps)} => {a + b}\n"


def reverse_prompt(word: str) -> str:
    """The prompt of reversing ``word``."""
    return f"R: {word}\nA:"


def reverse_answer(word: str) -> str:
    return f" {word[::-1]}\n"


def _random_word(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choices(_REVERSE_ALPHABET, k=rng.randint(min_len, max_len)))


@dataclass(frozen=True)
class _Example:
    """One training sequence: ``prompt + completion + EOS``; the loss covers the completion only
    when fine-tuning, everything when pretraining."""

    prompt: str
    completion: str
    kind: str


@dataclass
class _Data:
    eval_problems: dict[str, list[tuple[int, int]]]
    eval_words: dict[str, list[str]]
    train_problems: list[tuple[int, int]]
    train_words: list[str]


def _make_data(rng: random.Random, recipe: _Recipe) -> _Data:
    """Disjoint search and held-out problems; training draws only from what neither holds."""
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(problems)
    n = recipe.split_size
    eval_problems = {"search": problems[:n], "heldout": problems[n : 2 * n]}
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < 2 * n:
        word = _random_word(rng, *recipe.eval_word_lengths)
        if word not in seen:
            seen.add(word)
            words.append(word)
    train_words = []
    while len(train_words) < 20_000:
        word = _random_word(rng, *recipe.expert_word_lengths)
        if word not in seen:
            train_words.append(word)
    return _Data(
        eval_problems=eval_problems,
        eval_words={"search": words[:n], "heldout": words[n:]},
        train_problems=problems[2 * n :],
        train_words=train_words,
    )


def _pretraining_examples(
    rng: random.Random, data: _Data, count: int, recipe: _Recipe
) -> list[_Example]:
    """The base model's diet: the formats, one-digit sums (the facts a trace is made of), a few
    two-digit sums in either format, and reversals of short words."""
    evaluated_words = {word for words in data.eval_words.values() for word in words}
    examples = []
    for _ in range(count):
        kind = rng.random()
        if kind < recipe.base_mix[0]:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            examples.append(_Example(arith_prompt(a, b), arith_direct_answer(a, b), "sum1"))
        elif kind < recipe.base_mix[0] + recipe.base_mix[1]:
            a, b = rng.choice(data.train_problems)
            if rng.random() < 0.5:
                examples.append(_Example(arith_prompt(a, b), arith_direct_answer(a, b), "sum"))
            else:
                examples.append(_Example(arith_prompt(a, b), arith_steps_answer(a, b), "steps"))
        else:
            word = _random_word(rng, *recipe.base_word_lengths)
            while word in evaluated_words:
                word = _random_word(rng, *recipe.base_word_lengths)
            examples.append(_Example(reverse_prompt(word), reverse_answer(word), "reverse"))
    return examples


def _expert_examples(
    rng: random.Random, data: _Data, count: int, style: str, recipe: _Recipe
) -> list[_Example]:
    """Fine-tuning data: ``direct`` = short sums and reversals; ``steps`` = traced sums only."""
    examples = []
    for _ in range(count):
        a, b = rng.choice(data.train_problems)
        if style == "steps":
            examples.append(_Example(arith_prompt(a, b), arith_steps_answer(a, b), "steps"))
        elif rng.random() >= recipe.direct_reverse_share:
            examples.append(_Example(arith_prompt(a, b), arith_direct_answer(a, b), "sum"))
        else:
            word = rng.choice(data.train_words)
            examples.append(_Example(reverse_prompt(word), reverse_answer(word), "reverse"))
    return examples


def _multiple_choice(rng: random.Random, a: int, b: int) -> dict[str, Any]:
    """A sum with three near-miss distractors (off by one, by ten, digits swapped)."""
    correct = a + b
    candidates = [correct + 1, correct - 1, correct + 10, correct - 10, int(str(correct)[::-1])]
    distractors: list[int] = []
    for candidate in rng.sample(candidates, len(candidates)):
        if candidate != correct and candidate >= 0 and candidate not in distractors:
            distractors.append(candidate)
    choices = [correct, *distractors[:3]]
    rng.shuffle(choices)
    return {
        "question": arith_prompt(a, b),
        "choices": [str(choice) for choice in choices],
        "answer": choices.index(correct),
    }


def _task_records(rng: random.Random, data: _Data) -> dict[str, list[dict[str, Any]]]:
    arith = {
        split: [{"prompt": arith_prompt(a, b), "answer": str(a + b)} for a, b in problems]
        for split, problems in data.eval_problems.items()
    }
    reverse = {
        split: [{"prompt": reverse_prompt(w), "answer": w[::-1]} for w in words]
        for split, words in data.eval_words.items()
    }
    texts = []
    for (a, b), word in zip(
        data.eval_problems["heldout"], data.eval_words["heldout"], strict=False
    ):
        texts.append(
            {
                "text": arith_prompt(a, b)
                + arith_direct_answer(a, b)
                + reverse_prompt(word)
                + reverse_answer(word)
            }
        )
    return {
        "arith": arith["search"],
        "arith.heldout": arith["heldout"],
        "reverse": reverse["search"],
        "reverse.heldout": reverse["heldout"],
        "arith_mc": [_multiple_choice(rng, a, b) for a, b in data.eval_problems["heldout"]],
        "texts": texts,
    }


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------
# Tokenizer and model


def _gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (space -> "Ġ", newline -> "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


_BYTE_TO_SYMBOL = _gpt2_byte_symbols()


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: a byte-level BPE with an empty merge list over the printable
    ASCII characters, space and newline.

    Why byte-level BPE and not a plain character model: transformers 5 rebuilds the tokenizer
    of a ``qwen2`` folder as ``Qwen2Tokenizer`` (a byte-level BPE with Qwen's pre-tokenizer) from
    the saved vocabulary and merges, whatever class the folder names. With no merges every
    byte stays one token under any pre-tokenizer, so transformers, vLLM and this function
    tokenize alike.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [_BYTE_TO_SYMBOL[ord(character)] for character in _CHARACTERS]
    vocab = {token: index for index, token in enumerate((*_SPECIAL_TOKENS, *symbols))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def _make_model(tokenizer: PreTrainedTokenizerFast, recipe: _Recipe) -> PreTrainedModel:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention rejects small head sizes such as 16
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=recipe.initializer_range,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    return model


# ---------------------------------------------------------------------------------------------
# Training


def _batches(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[_Example],
    batch_size: int,
    *,
    loss_on_prompt: bool,
    rng: random.Random,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``input_ids`` and ``labels`` (``-100`` where no loss), each
    ``batch x longest``.

    Examples of one kind share a batch (grouped within windows of 16 batches, then the batches
    shuffled by ``rng``): padding to the longest row is what a CPU step pays for, and kinds
    differ most in length. Sorting by length instead made batches of all-carry or no-carry
    sums, and the experts stopped learning to carry.
    """
    import torch

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    rows: list[tuple[str, list[int], list[bool]]] = []
    for example in examples:
        prompt = tokenizer.encode(example.prompt, add_special_tokens=False)
        completion = tokenizer.encode(example.completion, add_special_tokens=False)
        rows.append(
            (
                example.kind,
                prompt + completion + [eos_id],
                [loss_on_prompt] * len(prompt) + [True] * (len(completion) + 1),
            )
        )
    window = 16 * batch_size
    chunks: list[list[tuple[str, list[int], list[bool]]]] = []
    for start in range(0, len(rows), window):
        ordered = sorted(rows[start : start + window], key=lambda row: row[0])  # stable
        chunks.extend(ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size))
    rng.shuffle(chunks)
    batches = []
    for chunk in chunks:
        longest = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), longest), -100, dtype=torch.long)
        for i, (_, ids, mask) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(
                [t if m else -100 for t, m in zip(ids, mask, strict=False)]
            )
        batches.append((input_ids, labels))
    return batches


def _train(
    model: PreTrainedModel,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    warmup_steps: int,
    advance: Any,
) -> float:
    """AdamW with linear warm-up and cosine decay over ``batches``; returns the last loss."""
    import math

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = len(batches)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    loss_value = float("nan")
    for input_ids, labels in batches:
        # Pad positions sit after each sequence's end, so causal attention never sees them
        # from a real token and no attention mask is needed.
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss_value = loss.item()
        advance()
    model.eval()
    return loss_value


# ---------------------------------------------------------------------------------------------
# Evaluation (a tiny private scorer for zoo.json and the tests; the real one is
# mergeopt.objectives)


def _extract_answer(completion: str) -> str:
    """The first line of a completion, after the trace's ``=>`` if there is one."""
    line = completion.split("\n", 1)[0]
    if "=>" in line:
        line = line.rsplit("=>", 1)[1]
    return line.strip()


def _generate_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 100,
) -> dict[str, float]:
    """Greedy generation for ``{"prompt", "answer"}`` records: exact-match accuracy of the
    extracted answer, and mean generated tokens (EOS included, as a server would count)."""
    import torch

    correct = 0
    tokens = 0
    model.eval()
    # One thread: these matrices are tiny, and two OpenMP threads on a busy 2-core machine spin
    # against each other (measured: 10x slower generation under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(records), batch_size):
            correct_in_batch, tokens_in_batch = _score_batch(
                model, tokenizer, records[start : start + batch_size], max_new_tokens
            )
            correct += correct_in_batch
            tokens += tokens_in_batch
    finally:
        torch.set_num_threads(threads)
    return {"accuracy": correct / len(records), "mean_tokens": tokens / len(records)}


def _score_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    chunk: Sequence[dict[str, Any]],
    max_new_tokens: int,
) -> tuple[int, int]:
    """(correct answers, generated tokens) of one left-padded greedy batch."""
    import torch

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    correct = 0
    tokens = 0
    prompts = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in chunk]
    longest = max(len(p) for p in prompts)
    # Left padding so every row's next token is at the same position.
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt) :] = torch.tensor(prompt)
        attention_mask[i, longest - len(prompt) :] = 1
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    for record, row in zip(chunk, output[:, longest:].tolist(), strict=False):
        generated = row[: row.index(eos_id) + 1] if eos_id in row else row
        tokens += len(generated)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        correct += _extract_answer(text) == record["answer"]
    return correct, tokens


def _evaluate_generation(model_dir: Path, task_file: Path, limit: int) -> dict[str, float]:
    """``{"accuracy", "mean_tokens"}`` of the model in ``model_dir`` on the first ``limit``
    records of a ``{"prompt", "answer"}`` task file, with greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _generate_and_score(model, tokenizer, _read_jsonl(task_file)[:limit])


# ---------------------------------------------------------------------------------------------
# The build


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded, deterministic torch for the duration of a build, restored afterwards."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[tuple[Any, Any]]:
    """``(advance, describe)`` callbacks driving a rich progress bar, or doing nothing."""
    if not enabled:
        yield (lambda: None), (lambda _text: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("zoo", total=total)
        yield (
            lambda: progress.advance(task),
            lambda text: progress.update(task, description=text),
        )


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite anything that is not a (possibly half-built) zoo."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; cannot build the zoo there")
    entries = {entry.name for entry in out_dir.iterdir()}
    if entries and not entries & {ZOO_JSON, BASE_NAME, "tasks"}:
        raise UserError(
            f"{out_dir}: folder is not empty and holds no model zoo; choose another OUT_DIR"
        )


def build_zoo(out_dir: Path, *, seed: int = 0, progress: bool = True) -> ZooInfo:
    """Train the zoo on the CPU into ``out_dir``: about 130 s on 2 idle cores, more on busy ones.

    An existing zoo (or a half-built one) in ``out_dir`` is replaced; any other non-empty
    folder is refused with a UserError. The models are built in a temporary sibling folder
    that is renamed into place, and ``zoo.json`` is written last.

    Example:
        >>> info = build_zoo(Path("zoo"), progress=False)  # doctest: +SKIP
        >>> info.metadata["models"]["expert-steps"]["arith"]["accuracy"]  # doctest: +SKIP
    """
    return _build_zoo(Path(out_dir), seed=seed, progress=progress, recipe=_Recipe())


def _build_zoo(out_dir: Path, *, seed: int, progress: bool, recipe: _Recipe) -> ZooInfo:
    import torch
    import transformers

    started = time.perf_counter()
    out_dir = out_dir.absolute()
    _prepare_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        rng = random.Random(seed)
        data = _make_data(rng, recipe)
        tasks = _task_records(rng, data)
        (staging / "tasks").mkdir()
        for task, file in TASK_FILES.items():
            _write_jsonl(staging / "tasks" / file, tasks[task])

        tokenizer = _make_tokenizer()
        batch = recipe.batch_size
        pretraining = _batches(
            tokenizer,
            _pretraining_examples(rng, data, recipe.base_steps * batch, recipe),
            batch,
            loss_on_prompt=True,
            rng=rng,
        )
        finetuning = {
            name: _batches(
                tokenizer,
                _expert_examples(rng, data, steps * batch, style, recipe),
                batch,
                loss_on_prompt=False,
                rng=rng,
            )
            for name, style, steps in zip(
                EXPERT_NAMES,
                ("direct", "steps"),
                (recipe.direct_steps, recipe.steps_steps),
                strict=False,
            )
        }
        models_dirs = {name: staging / name for name in (BASE_NAME, *EXPERT_NAMES)}
        losses: dict[str, float] = {}
        seconds: dict[str, float] = {"data": time.perf_counter() - started}
        total_steps = recipe.base_steps + recipe.direct_steps + recipe.steps_steps + 3
        with _deterministic_torch(seed), _progress_bar(progress, total_steps) as (advance, say):
            say("pretraining base")
            model = _make_model(tokenizer, recipe)
            losses[BASE_NAME] = _train(
                model,
                pretraining,
                lr=recipe.base_lr,
                warmup_steps=recipe.warmup_steps,
                advance=advance,
            )
            _save(model, tokenizer, models_dirs[BASE_NAME])
            seconds[BASE_NAME] = time.perf_counter() - started - sum(seconds.values())
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
            for name in EXPERT_NAMES:
                say(f"fine-tuning {name}")
                model.load_state_dict(base_state)
                losses[name] = _train(
                    model,
                    finetuning[name],
                    lr=recipe.expert_lr,
                    warmup_steps=recipe.warmup_steps,
                    advance=advance,
                )
                _save(model, tokenizer, models_dirs[name])
                seconds[name] = time.perf_counter() - started - sum(seconds.values())

            metrics: dict[str, dict[str, Any]] = {}
            for name, folder in models_dirs.items():
                say(f"evaluating {name}")
                metrics[name] = {
                    task: _evaluate_generation(
                        folder, staging / "tasks" / TASK_FILES[f"{task}.heldout"], recipe.eval_limit
                    )
                    for task in ("arith", "reverse")
                }
                metrics[name]["final_train_loss"] = round(losses[name], 4)
                advance()
            seconds["evaluation"] = time.perf_counter() - started - sum(seconds.values())

        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    metadata = {
        "zoo_version": ZOO_VERSION,
        "seed": seed,
        "build_seconds": round(time.perf_counter() - started, 1),
        "phase_seconds": {phase: round(value, 1) for phase, value in seconds.items()},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "metrics_split": "heldout",
        "metrics_limit": recipe.eval_limit,
        "models": metrics,
        "recipe": asdict(recipe),
    }
    # Written last: its presence marks the zoo complete.
    (out_dir / ZOO_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
    return ZooInfo._at(out_dir, metadata)
