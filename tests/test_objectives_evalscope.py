"""evalscope objectives: a local general_mcq set built from our multiple-choice records is run
offline by evalscope against the resident model (every question goes through our scorer), and a
missing evalscope is a one-line user error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mergeopt.errors import UserError
from mergeopt.objectives.evalscope import write_general_mcq
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions, validate_objectives
from mergeopt.objectives.scorers.hf import HFScorer
from tests.test_scorer_hf import build_tiny_model

HAS_EVALSCOPE = importlib.util.find_spec("evalscope") is not None
RECORDS = [
    {"question": f"Q: {a}+{a}=\nA:", "choices": [str(2 * a), str(2 * a + 1), "7", "0"], "answer": 0}
    for a in range(10, 16)
]


def _objective(folder: Path, **fields: Any) -> SimpleNamespace:
    defaults = dict(
        name="mcq",
        task=str(folder),
        kind="evalscope",
        metric="accuracy",
        direction="maximize",
        limit=None,
        subsample_seed=0,
        heldout=None,
        normalize=False,
        evalscope={"dataset": "general_mcq", "subset_list": ["arith"]},
    )
    return SimpleNamespace(**{**defaults, **fields})


class CountingScorer:
    """The real scorer, counting the prompts it is asked."""

    def __init__(self, scorer: HFScorer) -> None:
        self.scorer, self.prompts = scorer, []

    def generate(self, prompts: list[str], **options: Any) -> Any:
        self.prompts.extend(prompts)
        return self.scorer.generate(prompts, **options)


@pytest.mark.skipif(HAS_EVALSCOPE, reason="evalscope is installed")
def test_a_missing_evalscope_is_a_one_line_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs the evalscope package: pip install"):
        validate_objectives([_objective(tmp_path)])


def test_general_mcq_records_are_written_in_evalscope_layout(tmp_path: Path) -> None:
    path = write_general_mcq(RECORDS[:1], tmp_path, subset="arith")
    assert path.name == "arith_val.jsonl"
    assert json.loads(path.read_text()) == {
        "id": 0,
        "question": "Q: 10+10=\nA:",
        "A": "20",
        "B": "21",
        "C": "7",
        "D": "0",
        "answer": "A",
    }


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EVALSCOPE, reason="evalscope (optional extra) is not installed")
def test_general_mcq_runs_offline_against_the_resident_scorer(tmp_path: Path) -> None:
    write_general_mcq(RECORDS, tmp_path / "mcq", subset="arith")
    scorer = CountingScorer(HFScorer(model_dir=build_tiny_model(tmp_path / "model")))
    objective = _objective(tmp_path / "mcq", limit=5)
    validate_objectives([objective])
    with pytest.raises(UserError, match="no metric 'bleu'"):
        Evaluator([_objective(tmp_path / "mcq", metric="bleu", limit=1)], scorer).evaluate()
    scorer.prompts.clear()
    result = Evaluator(
        [objective],
        scorer,  # type: ignore[arg-type]
        scorer_options=GenerationOptions(max_new_tokens=4),
    ).evaluate()
    assert 0.0 <= result.values["mcq"] <= 1.0
    assert result.metrics["mcq"]["n"] == 5.0
    assert len(scorer.prompts) == 5
    assert all(any(r["question"] in p for r in RECORDS) for p in scorer.prompts)
