"""Local task files (JSONL or CSV) read and checked once, before any model is loaded.

Three kinds, one record per line (JSONL) or row (CSV):

- ``generation``: ``{"prompt": str, "answer": str | number}`` — the model completes the prompt.
- ``multiple_choice``: ``{"question": str, "choices": [str, ...], "answer": int}`` (index into
  choices). In CSV, ``choices`` is a JSON list, or the choices are columns ``A``, ``B``, ...
  with ``answer`` a letter or an index (evalscope's ``general_mcq`` layout).
- ``perplexity``: ``{"text": str}``.
- ``classification``: ``{"text": str, "text_pair": str (optional), "label": int}``, the label
  an index ``0 .. n-1`` (in CSV, digits); a task's ``n`` classes are those of its task file
  (its largest label + 1, :func:`label_count`), so a held-out file may not use a larger one.

``limit`` keeps a fixed-seed random subset (the same for every worker and trial), so a study
scores every candidate on the same items; the items left out are the default held-out split.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError, read_user_text

TASK_KINDS = ("generation", "multiple_choice", "perplexity", "classification")


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class MultipleChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class TextItem:
    text: str


@dataclass(frozen=True)
class ClassificationItem:
    text: str
    text_pair: str | None
    label: int


TaskItem = GenerationItem | MultipleChoiceItem | TextItem | ClassificationItem


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a .jsonl/.json-lines or .csv file; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: task file not found")
    text = read_user_text(path, "task file")
    records: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            if any((value or "").strip() for value in row.values()):
                records.append((reader.line_num, {k: v for k, v in row.items() if k}))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line")
            records.append((number, record))
    if not records:
        raise UserError(f"{path}: task file has no records")
    return records


def _text_field(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: missing field {field!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: field {field!r} must be a string or a number")
    return str(value)


def _multiple_choice(record: dict[str, Any], where: str) -> MultipleChoiceItem:
    question = _text_field(record, "question", where)
    choices: Any = record.get("choices")
    letters: list[str] = []
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise UserError(f"{where}: field 'choices' must be a JSON list of strings") from None
    if choices is None:
        for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
            value = record.get(letter)
            if value is None or str(value) == "":
                break
            letters.append(letter)
        choices = [str(record[letter]) for letter in letters]
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(
            f"{where}: missing field 'choices' (a list of at least 2 strings, or columns A, B, ...)"
        )
    answer: Any = record.get("answer")
    if isinstance(answer, str) and answer.strip().upper() in letters:
        answer = letters.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        answer = ord(answer.strip().upper()) - ord("A")
    if answer is None:
        raise UserError(f"{where}: missing field 'answer'")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(
            f"{where}: field 'answer' must be the index of one of the {len(choices)} choices"
        )
    return MultipleChoiceItem(
        question=question, choices=tuple(str(c) for c in choices), answer=answer
    )


def _classification(record: dict[str, Any], where: str) -> ClassificationItem:
    text = _text_field(record, "text", where)
    pair = record.get("text_pair")
    text_pair = None if pair is None or pair == "" else _text_field(record, "text_pair", where)
    label: Any = record.get("label")
    if label is None or label == "":
        raise UserError(f"{where}: missing field 'label'")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label.strip())
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise UserError(
            f"{where}: field 'label' must be a class index 0, 1, ..., got {record.get('label')!r}"
        )
    return ClassificationItem(text=text, text_pair=text_pair, label=label)


def label_count(items: Sequence[TaskItem]) -> int:
    """A classification task's classes: its largest label + 1."""
    return 1 + max(item.label for item in items if isinstance(item, ClassificationItem))


def load_task(path: str | Path, kind: str) -> list[TaskItem]:
    """All items of a task file, checked; ``UserError`` names the file and line of a problem."""
    if kind not in TASK_KINDS:
        raise UserError(
            f"{path}: unknown task kind {kind!r}; expected one of {', '.join(TASK_KINDS)}"
        )
    path = Path(path)
    items: list[TaskItem] = []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        if kind == "generation":
            items.append(
                GenerationItem(
                    prompt=_text_field(record, "prompt", where),
                    answer=_text_field(record, "answer", where),
                )
            )
        elif kind == "multiple_choice":
            items.append(_multiple_choice(record, where))
        elif kind == "classification":
            items.append(_classification(record, where))
        else:
            items.append(TextItem(text=_text_field(record, "text", where)))
    return items


def subsample_indices(count: int, *, limit: int | None, seed: int) -> list[int]:
    """Indices of the kept items, in file order: all of them, or ``limit`` drawn with
    ``random.Random(seed)`` (the same on every machine and Python version >= 3.2)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


@dataclass(frozen=True)
class TaskSplit:
    """The items one objective is scored on, and where they came from (for messages/metrics)."""

    path: Path
    kind: str
    items: tuple[TaskItem, ...]
    description: str


def search_split(path: str | Path, kind: str, *, limit: int | None, seed: int) -> TaskSplit:
    """The items a study searches on: the file, or its fixed-seed subsample of ``limit``."""
    items = load_task(path, kind)
    kept = subsample_indices(len(items), limit=limit, seed=seed)
    description = (
        f"{len(kept)} of {len(items)} (seed {seed})"
        if len(kept) < len(items)
        else (f"all {len(items)}")
    )
    return TaskSplit(
        path=Path(path), kind=kind, items=tuple(items[i] for i in kept), description=description
    )


def heldout_split(
    path: str | Path, kind: str, *, heldout: str | Path | None, limit: int | None, seed: int
) -> TaskSplit | None:
    """The items reported after the search, never searched on: the ``heldout`` file if given,
    else the items of the task file that ``limit`` left out; None if there are none."""
    if heldout is not None:
        items = load_task(heldout, kind)
        return TaskSplit(
            path=Path(heldout), kind=kind, items=tuple(items), description=f"all {len(items)}"
        )
    items = load_task(path, kind)
    kept = set(subsample_indices(len(items), limit=limit, seed=seed))
    rest = [item for i, item in enumerate(items) if i not in kept]
    if not rest:
        return None
    return TaskSplit(
        path=Path(path),
        kind=kind,
        items=tuple(rest),
        description=f"{len(rest)} of {len(items)} left out by limit (seed {seed})",
    )
