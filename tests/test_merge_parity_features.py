"""`mergeopt merge` against mergekit on the config features added last: a slice's own
``base_model``, ``residual_weight`` (read and ignored by mergekit 0.1.5), tokenizers (``union``,
a model, the ``tokenizer:`` block with its ``tokens`` and ``pad_to_multiple_of``),
``chat_template``, the methods ``arcee_fusion``, ``ram`` and ``ramplus_tl``, and LoRA references
(``model+adapter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mergeopt.errors import UserError
from mergeopt.merge.mergekit_config import run_mergekit_config
from tests.test_merge_oracle import assert_same, both
from tests.test_merge_parity import llama


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny Llama base and two experts (4 layers, hidden 32)."""
    return llama(tmp_path_factory.mktemp("llama"))


def write_config(config: dict[str, Any], folder: Path) -> Path:
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_slice_with_its_own_base_model_merges_as_mergekit(
    family: list[Path], tmp_path: Path
) -> None:
    base, first, second = (str(p) for p in family)

    def sources(layers: list[int]) -> list[dict[str, Any]]:
        return [
            {"model": base, "layer_range": layers, "parameters": {"weight": 0.3}},
            {"model": first, "layer_range": layers, "parameters": {"weight": 0.6}},
            {"model": second, "layer_range": layers, "parameters": {"weight": 0.4}},
        ]

    config = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"density": 0.5},
        "slices": [
            {"sources": sources([0, 2]), "base_model": first},  # embeddings: first is the base
            {"sources": sources([2, 4])},
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert set(ours) == set(theirs)


def test_residual_weight_is_ignored_with_a_warning_as_mergekit_ignores_it(
    family: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, first, _ = (str(p) for p in family)
    layers = [0, 4]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": layers},
                    {"model": first, "layer_range": layers, "parameters": {"weight": 0.7}},
                ],
                "residual_weight": 0.25,
            }
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert "slices[0].residual_weight is ignored, as mergekit does" in caplog.text
    assert_same(ours, theirs)


def test_a_slice_base_model_outside_its_sources_is_one_line(
    family: list[Path], tmp_path: Path
) -> None:
    base, first, second = (str(p) for p in family)
    config = {
        "merge_method": "ties",
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 4]},
                    {"model": first, "layer_range": [0, 4], "parameters": {"weight": 1.0}},
                ],
                "base_model": second,
            }
        ],
    }
    with pytest.raises(UserError, match=r"slices\[0\]: base_model .* is not among the sources"):
        run_mergekit_config(write_config(config, tmp_path), tmp_path / "out")
