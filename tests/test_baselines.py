"""Preference baselines (``mergeopt baseline chebyshev|epo``): the descents' math (Chebyshev's
max, EPO's balance and descent programs, EPO reaching the preference's exact Pareto point),
fine-tuning from the encoder zoo's base into a baseline folder, its values recorded in the
study and shown by ``study status``, ``study plot`` and the dashboard note, ``--evaluate-only``
re-scoring a saved folder to the same values, and bad inputs as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from mergeopt import attrs
from mergeopt.baselines import record_in_study
from mergeopt.errors import UserError
from mergeopt.preference_descent import chebyshev_step, epo_step, non_uniformity
from mergeopt.zoo.encoder import EncoderZoo
from tests._encoder_zoo_fixture import encoder_zoo  # noqa: F401 - the fixture
from tests.conftest import run_cli, tiny_spec, write_spec
from tests.test_bad_inputs import assert_one_line_error
from tests.test_encoder_zoo import encoder_spec

# --------------------------------------------------------------------------- the descents


def test_chebyshev_steps_on_the_task_of_largest_weighted_loss() -> None:
    step = chebyshev_step([1.0, 3.0, 2.0], [0.6, 0.1, 0.3])  # weighted: 0.6, 0.3, 0.6
    assert step.weights == [0.6, 0.0, 0.0]  # the first among equals
    assert chebyshev_step([1.0, 3.0], [0.5, 0.5]).weights == [0.0, 0.5]


def test_epo_balances_by_descending_only_the_task_above_the_preference_ray() -> None:
    # orthogonal gradients, equal preference, loss 1 twice loss 2: only task 1 may descend
    step = epo_step([2.0, 1.0], [0.5, 0.5], np.eye(2))
    assert step.move == "balance"
    assert step.weights[0] > 0 and step.weights[1] == pytest.approx(0.0, abs=1e-9)


def test_epo_on_the_ray_descends_without_raising_any_loss() -> None:
    gram = np.array([[1.0, -0.5], [-0.5, 1.0]])  # conflicting gradients
    step = epo_step([1.0, 1.0], [0.5, 0.5], gram)
    assert step.move == "descent"
    first_order_change = gram @ np.array(step.weights)  # each loss falls by this, to 1st order
    assert (first_order_change >= -1e-9).all() and first_order_change.sum() > 0


@pytest.mark.parametrize("preference", [[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
def test_epo_reaches_the_exact_pareto_point_of_its_preference(preference: list[float]) -> None:
    """Two quadratics with minima (1, 0) and (0, 1): EPO's gradient steps end where
    r1 * l1 == r2 * l2 on the Pareto set (the segment between the minima)."""
    centers = np.array([[1.0, 0.0], [0.0, 1.0]])
    x = np.array([2.0, 2.0])
    for _ in range(400):
        losses = ((x - centers) ** 2).sum(axis=1)
        gradients = 2 * (x - centers)
        weights = epo_step(list(losses), preference, gradients @ gradients.T).weights
        x = x - 0.02 * np.array(weights) @ gradients
    losses = ((x - centers) ** 2).sum(axis=1)
    assert non_uniformity(list(losses), preference) < 1e-3
    assert x.sum() == pytest.approx(1.0, abs=1e-2)  # on the segment: Pareto optimal


# --------------------------------------------------------------------------- the command

STEPS = ("--steps", "3", "--batch-size", "8")
"""A few steps: the tests pin the plumbing, not the baselines' quality (that is the
benchmark's, docs/bench/preference-2026-11-30.md)."""


def _spec_file(tmp_path: Path, zoo: EncoderZoo, name: str = "enc") -> Path:
    spec = encoder_spec(zoo, name)
    for objective in spec["objectives"]:
        objective["limit"] = 32
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_baselines_are_trained_recorded_shown_and_re_scored(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    spec_file = _spec_file(tmp_path, encoder_zoo)
    assert run_cli("study", "create", str(spec_file), "--storage", url).returncode == 0
    ran = run_cli("study", "run", "enc", "-n", "2", "--storage", url, "--no-progress")
    assert ran.returncode == 0, ran.stderr
    for method in ("chebyshev", "epo"):
        trained = run_cli(
            "baseline", method, str(spec_file), "--preference", "4,2,2,2",
            "--out", str(tmp_path / method), "--storage", url, *STEPS,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert "recorded in study enc" in trained.stdout

    folder = tmp_path / "epo"
    record = json.loads((folder / "baseline.json").read_text())
    assert record["method"] == "epo" and record["preference"] == [0.4, 0.2, 0.2, 0.2]
    assert sum(record["moves"].values()) == 3
    assert set(record["values"]) == set(record["heldout"]) == set(record["objectives"])
    from transformers import AutoModelForSequenceClassification

    heads = [
        AutoModelForSequenceClassification.from_pretrained(folder / f"head-{k}") for k in range(4)
    ]
    assert [h.config.num_labels for h in heads] == [4, 2, 3, 2]  # each expert's head size
    bodies = [dict(h.bert.named_parameters()) for h in heads]
    assert all(b[n].equal(bodies[0][n]) for b in bodies for n in bodies[0])  # one shared body

    study = optuna.load_study(study_name="enc", storage=url)
    stored = attrs.BASELINES.read(study)
    assert set(stored) == {"chebyshev 0.4,0.2,0.2,0.2", "epo 0.4,0.2,0.2,0.2"}
    assert stored["epo 0.4,0.2,0.2,0.2"]["values"] == [
        record["values"][n] for n in record["objectives"]
    ]

    status = run_cli("study", "status", "enc", "--storage", url, env={"COLUMNS": "300"})
    assert status.returncode == 0, status.stderr
    assert "Preference baselines" in status.stdout and "epo 0.4,0.2,0.2,0.2" in status.stdout
    from mergeopt.dashboard import study_note_markdown
    from mergeopt.plots import baseline_points

    assert set(baseline_points(study)) == set(stored)  # drawn beside the front
    assert "chebyshev 0.4,0.2,0.2,0.2" in study_note_markdown(study)
    from mergeopt.plots import plot_study

    assert plot_study(study, tmp_path / "plots", html=False)  # the front with the baselines

    # --evaluate-only: no training, the same values again
    (folder / "baseline.json").write_text(json.dumps({**record, "values": {}, "heldout": None}))
    again = run_cli(
        "baseline", "epo", str(spec_file), "--evaluate-only", str(folder), "--storage", url
    )
    assert again.returncode == 0, again.stderr
    rescored = json.loads((folder / "baseline.json").read_text())
    assert rescored["values"] == record["values"] and rescored["heldout"] == record["heldout"]


def test_a_baseline_is_not_recorded_beside_normalized_trials(
    tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    """A study that normalizes an objective holds trial values in other units than a
    baseline's raw ones (which a spec edited to ``normalize: false`` would give)."""
    spec = tiny_spec(zoo_dir)
    spec["objectives"][0]["normalize"] = True
    spec_file = write_spec(tmp_path / "normalized.yaml", spec)
    assert run_cli("study", "create", str(spec_file), "--storage", sqlite_url).returncode == 0
    study = optuna.load_study(study_name=spec["name"], storage=sqlite_url)
    record = {
        "method": "epo",
        "preference": [0.5, 0.5],
        "objectives": ["accuracy", "tokens"],
        "values": {"accuracy": 0.4, "tokens": 12.0},
        "heldout": None,
        "train_seconds": 1.0,
        "training": {"steps": 3},
    }
    with pytest.raises(UserError, match="normalizes accuracy"):
        record_in_study(study, record, tmp_path)
    assert attrs.BASELINES.get(study) is None


def _bad_spec(tmp_path: Path, zoo: EncoderZoo, records: list[dict]) -> Path:
    """The encoder spec whose first objective trains on ``records``."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = encoder_spec(zoo, "bad")
    spec["objectives"][0]["train"] = str(train)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("arguments", "records", "message"),
    [
        (("--preference", "0.7,0.3"), None, "--preference has 2 weights; the spec has 4"),
        (("--preference", "1,0,1,1"), None, "must be positive numbers"),
        (("--preference", "a,b"), None, "--preference"),
        ((), None, "--preference is required"),
        (("--preference", "1,1,1,1"), [{"text": "a b", "label": 4}], "label 4 of"),
        (("--preference", "1,1,1,1"), [{"text": "a b"}], "missing field 'label'"),
        (("--preference", "1,1,1,1"), [{"label": 1}], "missing field 'text'"),
    ],
)
def test_bad_baseline_inputs_are_one_line_errors(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
    arguments: tuple[str, ...],
    records: list[dict] | None,
    message: str,
) -> None:
    spec_file = (
        _bad_spec(tmp_path, encoder_zoo, records)
        if records is not None
        else _spec_file(tmp_path, encoder_zoo)
    )
    out = tmp_path / "out"
    result = run_cli("baseline", "epo", str(spec_file), *arguments, "--out", str(out), *STEPS)
    assert_one_line_error(result, message)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing partial


def test_an_out_folder_inside_a_file_is_a_one_line_error_before_training(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    spec_file = _spec_file(tmp_path, encoder_zoo)
    (tmp_path / "afile").write_text("not a folder\n")
    out = tmp_path / "afile" / "baseline"
    result = run_cli(
        "baseline", "epo", str(spec_file), "--preference", "1,1,1,1", "--out", str(out), *STEPS
    )
    assert_one_line_error(result, str(out), "cannot write a folder there")
    assert "fine-tuning" not in result.stdout + result.stderr


def test_evaluate_only_needs_a_baseline_folder_and_no_out(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    spec_file = _spec_file(tmp_path, encoder_zoo)
    not_one = run_cli("baseline", "epo", str(spec_file), "--evaluate-only", str(tmp_path))
    assert_one_line_error(not_one, "not a baseline folder")
    both = run_cli(
        "baseline", "epo", str(spec_file), "--evaluate-only", str(tmp_path), "--out", "x"
    )
    assert_one_line_error(both, "exactly one of --out DIR")
    trained = run_cli(
        "baseline", "epo", str(spec_file), "--evaluate-only", str(tmp_path), "--steps", "500"
    )
    assert_one_line_error(trained, "without training; drop --steps")  # not silently ignored


def test_evaluate_only_refuses_a_spec_whose_heads_differ_from_the_trained_ones(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    """Two tasks' heads swapped in the spec (both of 2 labels): re-scoring would answer each
    task with the other's head and overwrite the saved values."""
    spec = encoder_spec(encoder_zoo, "enc")
    names = [o["name"] for o in spec["objectives"]]
    trained = {o["name"]: f"head-{o['head']}" for o in spec["objectives"]}
    by_name = {o["name"]: o for o in spec["objectives"]}
    by_name["sentiment"]["head"], by_name["paraphrase"]["head"] = 3, 1
    spec_file = tmp_path / "swapped.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "saved"
    folder.mkdir()
    record = {"kind": "baseline", "method": "epo", "objectives": names, "heads": trained}
    (folder / "baseline.json").write_text(json.dumps(record))
    result = run_cli("baseline", "epo", str(spec_file), "--evaluate-only", str(folder))
    assert_one_line_error(result, "sentiment with head-3")
    assert json.loads((folder / "baseline.json").read_text()) == record  # left as it was


@pytest.mark.slow
def test_the_preference_benchmark_runs_on_the_encoder_zoo(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    """``scripts/bench_preference.py`` end to end, tiny: a merge row and a row per baseline
    method for each of its five preferences, with held-out values and seconds."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "table"
    result = subprocess.run(
        [
            sys.executable, str(REPO / "scripts" / "bench_preference.py"), "--zoo",
            str(encoder_zoo.root), "--trials", "2", "--steps", "2", "--batch-size", "4",
            "--out", str(out),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 15
    assert [row["method"] for row in rows[1:3]] == ["chebyshev", "epo"]
    assert rows[0]["method"].startswith("merge (trial ")
    assert all(
        set(row["heldout"]) == {"topic", "sentiment", "entailment", "paraphrase"} for row in rows
    )
    assert "| preference | method |" in out.with_suffix(".md").read_text()
