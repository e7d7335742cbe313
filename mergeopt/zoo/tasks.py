"""The zoo's tasks as text: prompts, the two answer styles, and the search/held-out splits.

Two skills, each with a cheap and an expensive way to answer:

- addition of two 2-digit numbers, ``"Q: 47+85=\\nA:"``, answered directly (``" 132\\n"``) or
  after a trace in brackets, one step per digit column, units first (``" [7+5=12, 4+8+1=13]
  132\\n"``: SIPBMM's thinking block in miniature, five times the tokens, and much easier for a
  small model to get right);
- reversal of a lowercase word, ``"R: abcde\\nA:"`` -> ``" edcba\\n"``.

A problem's difficulty is the number of carries it needs (0, 1 or 2): the base model's corpus
writes a trace more often the more carries a sum needs, as people do.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARITH_OPERANDS = range(10, 100)
_REVERSE_ALPHABET = string.ascii_lowercase


def arith_prompt(a: int, b: int) -> str:
    """The prompt of the addition ``a + b`` (the answer follows after a space)."""
    return f"Q: {a}+{b}=\nA:"


def arith_direct_answer(a: int, b: int) -> str:
    """The short answer: ``" 132\\n"``."""
    return f" {a + b}\n"


def arith_steps_answer(a: int, b: int) -> str:
    """One step per digit column in brackets, units first, carrying into the next, then the sum:
    ``" [7+5=12, 4+8+1=13] 132\\n"``; the line ends with the sum so that "last number" answer
    extraction reads it."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps = []
    carry = 0
    for column in range(max(len(digits_a), len(digits_b))):
        da = int(digits_a[column]) if column < len(digits_a) else 0
        db = int(digits_b[column]) if column < len(digits_b) else 0
        total = da + db + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return f" [{', '.join(steps)}] {a + b}\n"


def carries(a: int, b: int) -> int:
    """How many digit columns of ``a + b`` carry into the next (a sum's difficulty)."""
    count = carry = 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a, b = a // 10, b // 10
    return count


def reverse_prompt(word: str) -> str:
    """The prompt of reversing ``word``."""
    return f"R: {word}\nA:"


def plain_reverse_prompt(word: str) -> str:
    """Reversal as the base's corpus mostly writes it, outside the task format."""
    return f"{word} reversed is"


def reverse_answer(word: str) -> str:
    return f" {word[::-1]}\n"


def random_word(rng: random.Random, lengths: tuple[int, int]) -> str:
    return "".join(rng.choices(_REVERSE_ALPHABET, k=rng.randint(*lengths)))


@dataclass(frozen=True)
class Example:
    """One training sequence, ``prompt + completion + EOS``; the loss covers the completion."""

    prompt: str
    completion: str
    kind: str


@dataclass
class Splits:
    """Evaluation items (search and held-out, disjoint) and what training may draw from."""

    problems: dict[str, list[tuple[int, int]]]
    words: dict[str, list[str]]
    train_problems: list[tuple[int, int]]
    evaluated_words: frozenset[str]

    def train_word(self, rng: random.Random, lengths: tuple[int, int]) -> str:
        """A random word of ``lengths`` that no evaluation split holds."""
        while True:
            word = random_word(rng, lengths)
            if word not in self.evaluated_words:
                return word


def make_splits(
    rng: random.Random, *, split_size: int, eval_word_lengths: tuple[int, int]
) -> Splits:
    """Disjoint search and held-out problems and words; training draws from what neither holds."""
    problems = [(a, b) for a in ARITH_OPERANDS for b in ARITH_OPERANDS]
    rng.shuffle(problems)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < 2 * split_size:
        word = random_word(rng, eval_word_lengths)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return Splits(
        problems={
            "search": problems[:split_size],
            "heldout": problems[split_size : 2 * split_size],
        },
        words={"search": words[:split_size], "heldout": words[split_size:]},
        train_problems=problems[2 * split_size :],
        evaluated_words=frozenset(words),
    )


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


def task_records(rng: random.Random, splits: Splits) -> dict[str, list[dict[str, Any]]]:
    """The task files' records, by task name (see ``mergeopt.zoo.TASK_FILES``)."""
    arith = {
        split: [{"prompt": arith_prompt(a, b), "answer": str(a + b)} for a, b in problems]
        for split, problems in splits.problems.items()
    }
    reverse = {
        split: [{"prompt": reverse_prompt(w), "answer": w[::-1]} for w in words]
        for split, words in splits.words.items()
    }
    texts = [
        {
            "text": arith_prompt(a, b)
            + arith_direct_answer(a, b)
            + reverse_prompt(word)
            + reverse_answer(word)
        }
        for (a, b), word in zip(splits.problems["heldout"], splits.words["heldout"], strict=False)
    ]
    return {
        "arith": arith["search"],
        "arith.heldout": arith["heldout"],
        "reverse": reverse["search"],
        "reverse.heldout": reverse["heldout"],
        "arith_mc": [_multiple_choice(rng, a, b) for a, b in splits.problems["heldout"]],
        "texts": texts,
    }


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]
