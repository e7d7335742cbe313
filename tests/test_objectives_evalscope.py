"""evalscope objectives: a local general_mcq set built from the zoo's multiple-choice task is run
by evalscope against the resident model with no network (every question goes through our
scorer), and a missing evalscope is a one-line user error.

CI installs evalscope (``scripts/setup.sh`` installs the ``evalscope`` extra), so every test here
runs there; the missing-package tests hide the installed package instead of needing a second
environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest

from mergeopt.errors import UserError
from mergeopt.objectives.evalscope import write_general_mcq
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions, validate_objectives
from mergeopt.objectives.scorers.hf import HFScorer
from mergeopt.zoo import ZooInfo
from tests.conftest import run_cli, tiny_spec, write_spec

HAS_EVALSCOPE = importlib.util.find_spec("evalscope") is not None
MISSING_MESSAGE = (
    "kind evalscope needs the evalscope package: pip install -e '.[evalscope]' in mergeopt's clone"
)


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


def _zoo_mcq_records(zoo_dir: Path) -> list[dict[str, Any]]:
    path = ZooInfo.from_dir(zoo_dir).tasks["arith_mc"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class CountingScorer:
    """The real scorer, counting the prompts it is asked."""

    def __init__(self, scorer: HFScorer) -> None:
        self.scorer, self.prompts = scorer, []

    def generate(self, prompts: list[str], **options: Any) -> Any:
        self.prompts.extend(prompts)
        return self.scorer.generate(prompts, **options)


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every host name lookup or internet connection tried during the test; each one fails,
    as it would on a machine without network."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def refuse_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    def refuse_connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("no network in this test")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    return attempts


def test_a_missing_evalscope_is_a_one_line_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "evalscope", None)  # `import evalscope` now fails
    with pytest.raises(UserError, match=r"^objective mcq: " + MISSING_MESSAGE.replace("[", r"\[")):
        validate_objectives([_objective(tmp_path)])


@pytest.mark.slow
def test_study_create_without_evalscope_says_how_to_install_it(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    hide = tmp_path / "no-evalscope"  # shadows the installed package, as if it were absent
    hide.mkdir()
    (hide / "evalscope.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'evalscope'\", name='evalscope')\n"
    )
    write_general_mcq(_zoo_mcq_records(zoo_dir), tmp_path / "mcq", subset="arith")
    spec = tiny_spec(zoo_dir)
    spec["objectives"].append(
        {
            "name": "mcq",
            "kind": "evalscope",
            "task": str(tmp_path / "mcq"),
            "metric": "accuracy",
            "evalscope": {"dataset": "general_mcq", "subset_list": ["arith"]},
        }
    )
    result = run_cli(
        "study",
        "create",
        str(write_spec(tmp_path / "s.yaml", spec)),
        "--storage",
        sqlite_url,
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))
        },
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: objective mcq: {MISSING_MESSAGE}"]
    assert optuna.get_all_study_summaries(sqlite_url) == []  # nothing was created


def test_general_mcq_records_are_written_in_evalscope_layout(tmp_path: Path) -> None:
    record = {"question": "Q: 10+10=\nA:", "choices": ["21", "20", "7", "0"], "answer": 1}
    path = write_general_mcq([record], tmp_path, subset="arith")
    assert path.name == "arith_val.jsonl"
    assert json.loads(path.read_text()) == {
        "id": 0,
        "question": "Q: 10+10=\nA:",
        "A": "21",
        "B": "20",
        "C": "7",
        "D": "0",
        "answer": "B",
    }


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EVALSCOPE, reason="evalscope (optional extra) is not installed")
def test_general_mcq_from_the_zoo_runs_offline_against_the_resident_scorer(
    tmp_path: Path, zoo_dir: Path, network_attempts: list[Any]
) -> None:
    records = _zoo_mcq_records(zoo_dir)
    write_general_mcq(records, tmp_path / "mcq", subset="arith")
    scorer = CountingScorer(HFScorer(model_dir=zoo_dir / "expert-direct"))
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
    assert len(scorer.prompts) == 5  # one request per question, all answered by our scorer
    assert all(any(r["question"] in p for r in records) for p in scorer.prompts)
    assert network_attempts == []  # nothing was downloaded, not even tried
