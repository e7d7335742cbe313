"""The one layer-name resolver: every architecture's layer stacks, and pre- vs post-weights by
the tensor's role (a head named ``embed_out`` is a head)."""

from __future__ import annotations

import pytest

from mergeopt.blocks import layer_of_tensor
from mergeopt.tensor_names import (
    LayerRef,
    config_num_layers,
    has_vocabulary_rows,
    is_post_weight,
    layer_counts,
    layer_of,
)


@pytest.mark.parametrize(
    ("name", "module", "index"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "model.layers", 3),
        ("transformer.h.2.self_attention.dense.weight", "transformer.h", 2),
        ("h.1.attn.c_attn.bias", "h", 1),
        ("gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers", 0),
        ("model.language_model.layers.5.mlp.up_proj.weight", "model.language_model.layers", 5),
        (
            "model.vision_tower.vision_model.encoder.layers.7.mlp.fc1.weight",
            "model.vision_tower.vision_model.encoder.layers",
            7,
        ),
        ("bert.encoder.layer.4.output.dense.weight", "bert.encoder.layer", 4),
        ("model.layers.1.mlp.experts.3.w1.weight", "model.layers", 1),
    ],
)
def test_layers_of_every_architecture(name: str, module: str, index: int) -> None:
    assert layer_of(name) == LayerRef(module=module, index=index)
    assert layer_of_tensor(name) == index


@pytest.mark.parametrize(
    ("name", "post", "vocabulary"),
    [
        ("model.embed_tokens.weight", False, True),
        ("gpt_neox.embed_in.weight", False, True),
        ("transformer.wte.weight", False, True),
        ("transformer.wpe.weight", False, False),
        ("transformer.word_embeddings.weight", False, True),
        ("embed_out.weight", True, True),
        ("lm_head.weight", True, True),
        ("model.norm.weight", True, False),
        ("transformer.ln_f.bias", True, False),
        ("gpt_neox.final_layer_norm.weight", True, False),
        ("model.multi_modal_projector.linear_1.weight", False, False),
    ],
)
def test_outer_tensors_by_role(name: str, post: bool, vocabulary: bool) -> None:
    assert layer_of(name) is None
    assert is_post_weight(name) is post
    assert has_vocabulary_rows(name) is vocabulary


def test_each_stack_counts_its_own_layers() -> None:
    names = [f"model.language_model.layers.{i}.x.weight" for i in range(2)]
    names += [f"model.vision_tower.encoder.layers.{i}.y.weight" for i in range(3)]
    assert layer_counts(["lm_head.weight", *names]) == {
        "model.language_model.layers": 2,
        "model.vision_tower.encoder.layers": 3,
    }


@pytest.mark.parametrize(
    ("config", "layers"),
    [
        ({"num_hidden_layers": 4}, 4),
        ({"n_layer": 12}, 12),
        ({"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 3}}, 2),
        ({"hidden_size": 8}, None),
    ],
)
def test_layer_count_from_the_config(config: dict, layers: int | None) -> None:
    assert config_num_layers(config) == layers
