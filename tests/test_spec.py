"""The study spec: valid specs parse with absolute paths, every invalid one is one line that
names the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeopt.errors import UserError
from mergeopt.spec import load_spec

REPO = Path(__file__).resolve().parent.parent

VALID = """\
name: demo
models: {base: ./base, experts: [./a, ./b]}
merge:
  method: ties
  blocks: {num_blocks: 4}
  search: {weight: [0.0, 1.0], density: [0.2, 1.0]}
objectives:
  - {name: acc, task: tasks/arith.jsonl, metric: accuracy}
  - {name: tokens, task: tasks/arith.jsonl, metric: mean_tokens, direction: minimize}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_the_shipped_demo_spec_is_valid() -> None:
    spec = load_spec(REPO / "studies" / "tiny.yaml")
    assert spec.name == "tiny"
    assert [o.direction for o in spec.objectives] == ["maximize", "minimize"]


def test_relative_paths_are_resolved_against_the_spec_folder(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert spec.models.base == str(tmp_path / "base")
    assert spec.objectives[0].task == str(tmp_path / "tasks" / "arith.jsonl")


def test_defaults_live_in_the_spec(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert spec.sampler.name == "tpe"
    assert spec.scorer.backend == "hf"
    assert spec.worker.effective_grace_period == 3 * spec.worker.heartbeat_interval


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: [1, 2\n", "malformed YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        (VALID.replace("method: ties", "method: 3"), "merge.method"),
        (VALID.replace("experts: [./a, ./b]", "experts: []"), "models.experts"),
        (VALID.replace("[0.0, 1.0], density", "[1.0, 0.0], density"), "merge.search"),
        (VALID.replace("density: [0.2, 1.0]", "density: [0.2, 1.5]"), "must lie in [0, 1]"),
        (VALID.replace("density: [0.2, 1.0]", "lambda: [0.2, 1.0]"), "unknown per-expert"),
        (VALID.replace("num_blocks: 4", "num_blocks: 0"), "merge.blocks.num_blocks"),
        (VALID.replace("num_blocks: 4", "num_blocks: 4, layers_per_block: 2"), "not both"),
        (VALID.replace("metric: accuracy}", "metric: bleu}"), "objectives.0"),
        (VALID.replace("name: tokens", "name: acc"), "unique"),
        (VALID.replace("name: demo", "name: demo\ncolour: blue"), "colour: unknown field"),
        (VALID.replace("merge:\n", "mrege:\n"), "unknown field"),
        (VALID + "scorer: {batch_size: -1}\n", "scorer.batch_size"),
        (VALID + "sampler: {name: tpe, options: 3}\n", "sampler.options"),
        (VALID.replace("name: demo", "name: 'bad name!'"), "name"),
    ],
)
def test_invalid_specs_are_one_line_naming_file_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as raised:
        load_spec(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_a_missing_spec_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
