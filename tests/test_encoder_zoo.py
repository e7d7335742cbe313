"""The encoder zoo: its experts learned their tasks, a TIES merge of all four keeps well above
chance on every task, a seed builds the same weights, and a study on it runs end to end from
the command line (classification objectives, the classifier scorer, padded heads)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file

from mergeopt import attrs
from mergeopt.zoo.encoder import EncoderZoo, EncoderZooTraining, build_encoder_zoo
from mergeopt.zoo.encoder_tasks import LABEL_COUNTS
from tests._encoder_zoo_fixture import encoder_zoo  # noqa: F401 - the fixture
from tests.conftest import REPO, run_cli

MARGIN = 0.15
"""How far above chance (the majority label's share) a working model scores, at least."""


def test_each_expert_learned_its_task_and_a_ties_merge_keeps_them(
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    metadata = encoder_zoo.metadata
    chance = metadata["chance"]
    for task in LABEL_COUNTS:
        assert metadata["models"][f"expert-{task}"][task] > chance[task] + MARGIN
        assert metadata["merges"]["ties"][task] > chance[task] + MARGIN, task


@pytest.mark.slow
def test_a_seed_builds_the_same_zoo(tmp_path: Path) -> None:
    small = EncoderZooTraining(
        pretrain_steps=3, probe_steps=2, expert_steps=2, split_size=8, train_size=8
    )
    first = build_encoder_zoo(tmp_path / "a", training=small, progress=False)
    second = build_encoder_zoo(tmp_path / "b", training=small, progress=False)
    for folder in (first.base, *first.experts.values()):
        one = load_file(folder / "model.safetensors")
        other = load_file(second.root / folder.name / "model.safetensors")
        assert all(one[name].equal(other[name]) for name in one)
    for name, task_file in first.tasks.items():
        assert task_file.read_text() == second.tasks[name].read_text()
    assert set(json.loads(first.tasks["topic"].read_text().splitlines()[0])) == {"text", "label"}


def encoder_spec(zoo: EncoderZoo, name: str) -> dict:
    """``studies/encoder.yaml`` on this zoo (absolute paths)."""
    spec = yaml.safe_load((REPO / "studies" / "encoder.yaml").read_text())
    spec["name"] = name
    spec["models"] = {
        "base": str(zoo.base),
        "experts": [str(zoo.experts[task]) for task in LABEL_COUNTS],
    }
    for objective in spec["objectives"]:
        objective["task"] = str(zoo.tasks[objective["name"]])
        objective["heldout"] = str(zoo.tasks[f"{objective['name']}.heldout"])
        objective["train"] = str(zoo.tasks[f"{objective['name']}.train"])
        objective["limit"] = 64
    return spec


@pytest.mark.slow
def test_a_study_on_the_encoder_zoo_runs_end_to_end(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    spec_file = tmp_path / "encoder.yaml"
    spec_file.write_text(yaml.safe_dump(encoder_spec(encoder_zoo, "enc")))
    created = run_cli("study", "create", str(spec_file), "--storage", url)
    assert created.returncode == 0, created.stderr
    ran = run_cli("study", "run", "enc", "-n", "4", "--storage", url, "--no-progress")
    assert ran.returncode == 0, ran.stderr
    study = optuna.load_study(study_name="enc", storage=url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    for trial in complete:
        assert all(0.0 <= value <= 1.0 for value in trial.values)
        metrics = trial.user_attrs[attrs.METRICS]
        assert set(metrics) == set(LABEL_COUNTS)
        assert metrics["entailment"]["macro_f1"] == trial.values[2]
    assert len({tuple(t.values) for t in complete}) > 1  # the merge changes the model
    status = run_cli("study", "status", "enc", "--storage", url)
    assert status.returncode == 0, status.stderr
    evaluated = run_cli("study", "evaluate", "enc", "--heldout", "--pareto", "--storage", url)
    assert evaluated.returncode == 0, evaluated.stderr

    # the export: a sequence classifier carrying the merged head, padded to the widest (4)
    out = tmp_path / "best"
    exported = run_cli(
        "study", "export", "enc", "--best", "topic", "--format", "hf", "--out", str(out),
        "--storage", url,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        next(out.glob("**/config.json")).parent
    )
    assert model.config.num_labels == 4


def _create_error(tmp_path: Path, zoo: EncoderZoo, change: dict, records: list[dict]) -> str:
    task = tmp_path / "bad.jsonl"
    task.write_text("".join(json.dumps(record) + "\n" for record in records))
    spec = encoder_spec(zoo, "bad")
    spec["objectives"] = [{**spec["objectives"][0], "task": str(task), **change}]
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result = run_cli("study", "create", str(spec_file), "--storage", f"sqlite:///{tmp_path}/s.db")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_zoo_build_keeps_an_up_to_date_encoder_zoo_and_prints_its_table(
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    result = run_cli("zoo", "build", str(encoder_zoo.root), "--kind", "encoder")
    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout
    assert "| ties merge of the 4 experts |" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "records", "message"),
    [
        ({}, [{"text": "ball team", "label": 4}], "label 4 of .* is out of range.* 4 labels"),
        ({}, [{"text": "ball team", "label": -1}], "field 'label' must be a class index"),
        ({}, [{"text": "ball team"}], "missing field 'label'"),
        ({}, [{"label": 1}], "missing field 'text'"),
        ({"metric": "perplexity"}, [{"text": "a", "label": 0}], "accuracy, macro_f1"),
    ],
)
def test_bad_classification_inputs_are_one_line_errors(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
    change: dict,
    records: list[dict],
    message: str,
) -> None:
    import re

    assert re.search(message, _create_error(tmp_path, encoder_zoo, change, records))


def test_a_classifier_study_exports_hf_only_and_refuses_mergekit(
    tmp_path: Path,
    encoder_zoo: EncoderZoo,  # noqa: F811 - the fixture
) -> None:
    """No mergekit config reproduces zero-padded heads on a masked-LM base: ``both`` (the
    default) writes the hf folder and says so, ``mergekit`` is a one-line error."""
    from optuna.trial import create_trial

    from mergeopt.spec import StudySpec
    from mergeopt.study import create_study, stored_genome

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = create_study(
        StudySpec.model_validate(encoder_spec(encoder_zoo, "enc")), storage_url=url
    )
    distributions = stored_genome(study).distributions()
    study.add_trial(
        create_trial(
            values=[0.5] * len(study.directions),
            params={name: 0.5 for name in distributions},
            distributions=distributions,
        )
    )
    refused = run_cli(
        "study", "export", "enc", "--trial", "0", "--format", "mergekit",
        "--out", str(tmp_path / "mk"), "--storage", url,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --format mergekit: a classifier study")
    assert refused.stderr.count("\n") == 1 and not (tmp_path / "mk").exists()

    out = tmp_path / "both"
    exported = run_cli(
        "study", "export", "enc", "--trial", "0", "--out", str(out), "--storage", url
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "writing the hf folder only" in exported.stdout
    assert (out / "config.json").is_file() and not (out / "mergekit_config.yml").exists()
    assert json.loads((out / "mergeopt.json").read_text())["format"] == "hf"
