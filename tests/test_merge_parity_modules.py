"""`mergeopt merge` against mergekit-yaml on ``modules:`` configs (issue #15): a multimodal model
(tiny LLaVA: a Llama text model and a CLIP vision tower) merged module by module, each module
with its own models or slices and parameters; a one-stack model through its ``default`` module;
and the one-line refusals of what mergekit would get wrong."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergeopt.errors import UserError
from mergeopt.merge.mergekit_config import run_mergekit_config
from tests.test_merge_oracle import assert_same, both
from tests.test_merge_parity import llama, llava

TEXT = "model.language_model.layers"
VISION = "model.vision_tower.encoder.layers"


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Base and two experts of a tiny LLaVA: text model 2 layers, vision tower 3."""
    return llava(tmp_path_factory.mktemp("llava"))


def models(paths: list[Path], weight: Any = 1.0) -> list[dict[str, Any]]:
    return [{"model": str(p), "parameters": {"weight": weight}} for p in paths]


@pytest.mark.slow
def test_linear_modules_each_with_their_own_models_slices_and_parameters(
    towers: list[Path], tmp_path: Path
) -> None:
    """default from base and expert 1, the text layers as a slice with a gradient, the vision
    tower from the two experts with a gradient over its 3 layers and its own normalize."""
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "modules": {
            "default": {"models": models(towers[:2], 0.7)},
            TEXT: {
                "slices": [
                    {
                        "sources": [
                            {"model": str(p), "layer_range": [0, 2], "parameters": {"weight": w}}
                            for p, w in zip(towers[:2], ([0.2, 0.8], 0.5), strict=True)
                        ]
                    }
                ]
            },
            VISION: {"models": models(towers[1:], [1.0, 0.1]), "parameters": {"normalize": False}},
        },
    }
    ours, theirs = both(config, tmp_path)
    assert set(ours) == set(theirs)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_slerp_modules_take_t_from_their_own_parameters_and_reorder_a_towers_layers(
    towers: list[Path], tmp_path: Path
) -> None:
    """Precedence model < slice < module < global: the text tower's slices swap its two layers
    with t from the slice, the vision tower's t is its module's gradient, default the global t."""
    base, expert = str(towers[0]), str(towers[2])
    swapped = [
        {
            "sources": [{"model": m, "layer_range": [start, start + 1]} for m in (base, expert)],
            "parameters": {"t": t},
        }
        for start, t in ((1, 0.25), (0, 0.75))
    ]
    config = {
        "merge_method": "slerp",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"t": 0.4},
        "modules": {
            "default": {"models": [{"model": base}, {"model": expert}]},
            TEXT: {"slices": swapped, "parameters": {"t": 0.9}},
            VISION: {
                "models": [{"model": base}, {"model": expert}],
                "parameters": {"t": [0.0, 1.0]},
            },
        },
    }
    ours, theirs = both(config, tmp_path)
    assert set(ours) == set(theirs)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_ties_modules_add_the_base_and_take_each_towers_density(
    towers: list[Path], tmp_path: Path
) -> None:
    """A base outside each module's models joins them (as mergekit adds it); each tower's
    density from its module, a gradient over the text layers."""
    experts = models(towers[1:], 0.6)
    config = {
        "merge_method": "ties",
        "base_model": str(towers[0]),
        "dtype": "float32",
        "parameters": {"density": 0.5},
        "modules": {
            "default": {"models": experts},
            TEXT: {"models": experts, "parameters": {"density": [0.2, 0.9]}},
            VISION: {"models": experts, "parameters": {"density": 0.3, "normalize": False}},
        },
    }
    ours, theirs = both(config, tmp_path)
    assert set(ours) == set(theirs)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_a_one_stack_model_merges_through_its_default_module_as_mergekit(
    tmp_path: Path,
) -> None:
    """modules: {default: ...} of a Llama: slices that stack layers (4 -> 6) with the module's
    weight as the per-model default."""
    import json

    paths = llama(tmp_path / "models")
    stacked = [
        {"sources": [{"model": str(p), "layer_range": layers} for p in paths[:2]]}
        for layers in ([0, 3], [1, 4])
    ]
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 0.1},
        "modules": {"default": {"slices": stacked, "parameters": {"weight": [0.3, 0.6]}}},
    }
    ours, theirs = both(config, tmp_path)
    assert set(ours) == set(theirs)
    assert_same(ours, theirs)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["num_hidden_layers"] == 6


def test_a_modules_models_null_beside_its_slices_is_not_given_as_for_mergekit(
    tmp_path: Path,
) -> None:
    """mergekit reads a module's ``models: null`` (a key a template leaves empty) as absent."""
    paths = llama(tmp_path / "models")
    sliced = [{"sources": [{"model": str(p), "layer_range": [0, 4]} for p in paths[:2]]}]
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 0.5},
        "modules": {"default": {"models": None, "slices": sliced}},
    }
    ours, theirs = both(config, tmp_path)
    assert set(ours) == set(theirs)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_a_module_left_out_is_not_written_as_mergekit_with_a_warning(
    towers: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "modules": {"default": {"models": models(towers)}, TEXT: {"models": models(towers)}},
    }
    with caplog.at_level(logging.WARNING):
        ours, theirs = both(config, tmp_path)
    assert f"modules {VISION} are not in the config" in caplog.text
    assert set(ours) == set(theirs)
    assert not [name for name in ours if name.startswith(f"{VISION}.")]
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (
            {"text_decoder": {"models": "ALL"}},
            f"modules.text_decoder: the model has no such module (its modules: default, {TEXT}",
        ),
        (
            {TEXT: {"slices": [{"sources": "ALL", "layer_range": [0, 1]}]}},
            f"modules.{TEXT}: slices give 1 layers, the module has 2; changing a tower's layer "
            "count is not supported",
        ),
        (
            {"default": {"slices": [{"sources": "ALL", "layer_range": [0, 1]}]}},
            "modules.default: holds no layers (a tower's stack is a module of its own); "
            "give models",
        ),
        (
            {"default": {"models": "ALL", "slices": [{"sources": "ALL", "layer_range": [0, 1]}]}},
            "modules.default: give exactly one of models and slices",
        ),
        (
            {"default": {"models": "ALL", "weights": 1}},
            "modules.default: unsupported key 'weights'",
        ),
        ([], "modules: expected a mapping of module names"),
        ({"default": {"models": 5}}, "modules.default.models: expected a list"),
    ],
)
def test_modules_mergekit_would_reject_or_get_wrong_are_one_line(
    towers: list[Path], tmp_path: Path, modules: Any, message: str
) -> None:
    def filled(value: Any, layers: list[int] | None = None) -> Any:
        """ "ALL" stands for every model of the family (as sources: with the entry's layers)."""
        if isinstance(value, dict):
            layers = value.get("layer_range", layers)
            return {
                key: filled(item, layers) for key, item in value.items() if key != "layer_range"
            }
        if isinstance(value, list):
            return [filled(item, layers) for item in value]
        if value == "ALL":
            if layers is None:
                return models(towers)
            return [{"model": str(p), "layer_range": layers} for p in towers]
        return value

    config = {"merge_method": "linear", "modules": filled(modules)}
    config_path = tmp_path / "c.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        run_mergekit_config(config_path, tmp_path / "out")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
