"""Mistakes a user can make at `study create` end in one line and exit code 2, and write
nothing: no study, no trial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest

from tests.conftest import run_cli, tiny_spec, write_spec


def assert_one_line_error(result, *needles: str) -> None:  # noqa: ANN001
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def no_studies(url: str) -> bool:
    return optuna.get_all_study_summaries(optuna.storages.RDBStorage(url)) == []


@pytest.mark.slow
def test_missing_expert_folder(tmp_path: Path, zoo_dir: Path, sqlite_url: str) -> None:
    spec = tiny_spec(zoo_dir)
    spec["models"]["experts"][1] = str(tmp_path / "no-such-expert")
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", sqlite_url
    )
    assert_one_line_error(result, "no-such-expert", "not found")
    assert no_studies(sqlite_url)


@pytest.mark.slow
def test_unknown_method(tmp_path: Path, zoo_dir: Path, sqlite_url: str) -> None:
    spec = tiny_spec(zoo_dir)
    spec["merge"]["method"] = "frankenmerge"
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", sqlite_url
    )
    assert_one_line_error(result, "frankenmerge")
    assert no_studies(sqlite_url)


@pytest.mark.slow
def test_expert_with_other_shapes(tmp_path: Path, zoo_dir: Path, sqlite_url: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(zoo_dir / "base")
    config.intermediate_size = config.intermediate_size * 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide-expert")
    spec = tiny_spec(zoo_dir)
    spec["models"]["experts"][0] = str(tmp_path / "wide-expert")
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", sqlite_url
    )
    assert_one_line_error(result, "wide-expert", "shape")
    assert no_studies(sqlite_url)


@pytest.mark.slow
def test_unreachable_database(tmp_path: Path, zoo_dir: Path) -> None:
    spec_path = write_spec(tmp_path / "s.yaml", tiny_spec(zoo_dir))
    result = run_cli(
        "study",
        "create",
        str(spec_path),
        "--storage",
        "postgresql://postgres:hunter2@127.0.0.1:9/none",
    )
    assert_one_line_error(result, "cannot connect", "postgres:***@")
    assert "hunter2" not in result.stderr


@pytest.mark.slow
def test_malformed_task_file(tmp_path: Path, zoo_dir: Path, sqlite_url: str) -> None:
    task = tmp_path / "broken.jsonl"
    shutil.copy(zoo_dir / "tasks" / "arith.jsonl", task)
    with task.open("a") as handle:
        handle.write('{"prompt": "Q: 1+1=\\nA:", "answer": \n')
    spec = tiny_spec(zoo_dir)
    spec["objectives"][0]["task"] = str(task)
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", sqlite_url
    )
    assert_one_line_error(result, "broken.jsonl")
    assert no_studies(sqlite_url)


def test_unknown_study_name(sqlite_url: str) -> None:
    result = run_cli("study", "status", "nope", "--storage", sqlite_url)
    assert_one_line_error(result, "no study named 'nope'")


def test_invalid_spec_file(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"models": {"base": "x"}}))
    result = run_cli("study", "create", str(path), "--storage", sqlite_url)
    assert_one_line_error(result, str(path))
    assert no_studies(sqlite_url)
