"""Task files are read and checked before any model loads: bad files fail with the file and
line; limits keep the same fixed-seed subset everywhere; extraction rules and metrics say what
they promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeopt.errors import UserError
from mergeopt.objectives import metrics
from mergeopt.objectives.evaluate import has_heldout, validate_objectives
from mergeopt.objectives.tasks import (
    GenerationItem,
    MultipleChoiceItem,
    heldout_split,
    load_task,
    search_split,
    subsample_indices,
)
from tests.task_files import objective, write_jsonl


def test_generation_records_load_with_numbers_as_text(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "1+1=", "answer": 2}, {"prompt": "a", "answer": "b"}]
    )
    assert load_task(path, "generation") == [GenerationItem("1+1=", "2"), GenerationItem("a", "b")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "t.jsonl: task file has no records"),
        ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', "t.jsonl:2: malformed JSON"),
        (
            '{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n',
            "t.jsonl:3: missing field 'answer'",
        ),
        ('["prompt", "answer"]\n', "t.jsonl:1: expected a JSON object per line"),
    ],
)
def test_bad_task_files_fail_with_the_file_and_line(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        validate_objectives([objective(path)])


def test_a_missing_task_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.jsonl: task file not found"):
        validate_objectives([objective(tmp_path / "nope.jsonl")])


def test_multiple_choice_from_jsonl_and_from_letter_columns_in_csv(tmp_path: Path) -> None:
    jsonl = write_jsonl(
        tmp_path / "mc.jsonl", [{"question": "2+2=", "choices": ["3", "4"], "answer": 1}]
    )
    assert load_task(jsonl, "multiple_choice") == [MultipleChoiceItem("2+2=", ("3", "4"), 1)]
    csv_file = tmp_path / "mc.csv"
    csv_file.write_text('question,A,B,C,answer\n2+2=,3,4,5,B\n"1,0",x,y,,0\n')
    assert load_task(csv_file, "multiple_choice") == [
        MultipleChoiceItem("2+2=", ("3", "4", "5"), 1),
        MultipleChoiceItem("1,0", ("x", "y"), 0),
    ]
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}]
    )
    with pytest.raises(UserError, match="bad.jsonl:1: field 'answer' must be the index"):
        load_task(bad, "multiple_choice")


def test_csv_generation_tasks_report_their_line(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text("prompt,answer\n1+1=,2\n2+2=,\n")
    with pytest.raises(UserError, match="g.csv:3: missing field 'answer'"):
        load_task(path, "generation")


def test_limit_keeps_the_same_seeded_subset_and_the_rest_is_held_out(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": str(i), "answer": i} for i in range(20)])
    first = search_split(path, "generation", limit=5, seed=3)
    again = search_split(path, "generation", limit=5, seed=3)
    other_seed = search_split(path, "generation", limit=5, seed=4)
    assert first.items == again.items and first.items != other_seed.items
    assert subsample_indices(20, limit=5, seed=3) == sorted(subsample_indices(20, limit=5, seed=3))
    rest = heldout_split(path, "generation", heldout=None, limit=5, seed=3)
    assert rest is not None and len(rest.items) == 15
    assert not set(rest.items) & set(first.items)
    assert heldout_split(path, "generation", heldout=None, limit=None, seed=3) is None
    assert has_heldout(objective(path, limit=5)) and not has_heldout(objective(path))
    held = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "h", "answer": 1}])
    assert has_heldout(objective(path, heldout=str(held)))


@pytest.mark.parametrize(
    ("completion", "extract", "pattern", "answer", "correct"),
    [
        (" 7+5=12, 4+8+1=13 => 132", "last_number", None, "132", True),
        (" the sum is 1,234.", "last_number", None, "1234", True),
        (" 42.0", "last_number", None, "42", True),
        (" -3", "last_number", None, "3", False),
        (" no number", "last_number", None, "0", False),
        ("  edcba ", "exact", None, "edcba", True),
        (" edcb", "exact", None, "edcba", False),
        ("answer: (B) because", "regex", r"\(([A-D])\)", "B", True),
        ("answer: B", "regex", r"\(([A-D])\)", "B", False),
    ],
)
def test_answer_extraction(
    completion: str, extract: str, pattern: str | None, answer: str, correct: bool
) -> None:
    accuracy = metrics.generation_accuracy([completion], [answer], extract=extract, pattern=pattern)
    assert accuracy == (1.0 if correct else 0.0)


def test_metrics_of_choices_tokens_and_perplexity() -> None:
    assert metrics.choice_accuracy([[-1.0, -0.5], [-0.1, -2.0]], [1, 1]) == 0.5
    assert metrics.mean_tokens([3, 5, 10]) == 6.0
    assert metrics.perplexity([-2.0, -4.0], [2, 4]) == pytest.approx(2.718281828, rel=1e-6)
