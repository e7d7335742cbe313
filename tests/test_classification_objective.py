"""The ``classification`` objective kind: task files (JSONL and CSV, text pairs), their
one-line errors, and its metrics (accuracy, macro-F1) as the evaluator computes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeopt.errors import UserError
from mergeopt.objectives.evaluate import LABEL, PREDICTED, WEIGHT, aggregate
from mergeopt.objectives.metrics import macro_f1
from mergeopt.objectives.tasks import ClassificationItem, label_count, load_task


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_and_csv_tasks_read_text_pairs_and_labels(tmp_path: Path) -> None:
    jsonl = _jsonl(
        tmp_path / "nli.jsonl",
        [
            {"text": "the ball", "text_pair": "a ball", "label": 0},
            {"text": "the team", "label": 2},
        ],
    )
    csv = tmp_path / "nli.csv"
    csv.write_text("text,text_pair,label\nthe ball,a ball,0\nthe team,,2\n")
    expected = [
        ClassificationItem(text="the ball", text_pair="a ball", label=0),
        ClassificationItem(text="the team", text_pair=None, label=2),
    ]
    assert load_task(jsonl, "classification") == expected
    assert load_task(csv, "classification") == expected
    assert label_count(expected) == 3


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"label": 1}, "missing field 'text'"),
        ({"text": "a"}, "missing field 'label'"),
        ({"text": "a", "label": -1}, "must be a class index"),
        ({"text": "a", "label": 1.5}, "must be a class index"),
        ({"text": "a", "label": True}, "must be a class index"),
        ({"text": "a", "label": "positive"}, "must be a class index"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    path = _jsonl(tmp_path / "task.jsonl", [{"text": "ok", "label": 0}, record])
    with pytest.raises(UserError, match=rf"task.jsonl:2: .*{message}"):
        load_task(path, "classification")


def test_macro_f1_is_the_mean_f1_over_the_classes_seen() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 0, 2]
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2: tp 1, fn 1 -> 2/3
    assert macro_f1(predicted, labels) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0
    assert macro_f1([], []) == 0.0
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert macro_f1(predicted, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predicted, average="macro")
    )


def test_the_evaluator_aggregates_accuracy_and_macro_f1_from_item_records() -> None:
    pairs = [(0, 0), (1, 0), (1, 1), (2, 2)]  # (label, predicted)
    records = [
        {WEIGHT: 1.0, LABEL: float(y), PREDICTED: float(p), "acc": float(y == p)} for y, p in pairs
    ]
    assert aggregate("accuracy", records, "acc") == 0.75
    assert aggregate("macro_f1", records, "acc") == macro_f1([0, 0, 1, 2], [0, 1, 1, 2])
