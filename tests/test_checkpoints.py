"""Checkpoint reading: shards, tied heads, mismatched models as one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeopt.checkpoints import Checkpoint, CheckpointReader, check_mergeable
from mergeopt.errors import UserError


def write_model(path: Path, tensors: dict[str, torch.Tensor], *, tied: bool, shards: int = 1):
    path.mkdir(parents=True)
    names = list(tensors)
    for index in range(shards):
        part = {n: tensors[n] for n in names[index::shards]}
        save_file(part, str(path / f"model-{index + 1:05d}-of-{shards:05d}.safetensors"))
    config = {"model_type": "qwen2", "num_hidden_layers": 1, "tie_word_embeddings": tied}
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


TENSORS = {
    "model.embed_tokens.weight": torch.arange(12.0).view(4, 3),
    "model.layers.0.mlp.up_proj.weight": torch.ones(2, 3),
    "model.norm.weight": torch.ones(3),
}


def test_sharded_checkpoint_reads_every_tensor_in_the_asked_dtype(tmp_path: Path) -> None:
    checkpoint = Checkpoint(path=write_model(tmp_path / "m", TENSORS, tied=True, shards=2))
    assert set(checkpoint.names) == set(TENSORS)
    assert checkpoint.shapes["model.embed_tokens.weight"] == (4, 3)
    with CheckpointReader([checkpoint]) as reader:
        tensor = reader.read(0, "model.layers.0.mlp.up_proj.weight", dtype=torch.bfloat16)
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor.float(), torch.ones(2, 3))
        head = reader.read(0, "lm_head.weight")  # tied: served from the embeddings
        assert torch.equal(head, TENSORS["model.embed_tokens.weight"])


def test_untied_base_with_tied_expert_merges_the_expert_embeddings_as_head(tmp_path: Path) -> None:
    base = Checkpoint(
        path=write_model(
            tmp_path / "base", {**TENSORS, "lm_head.weight": torch.zeros(4, 3)}, tied=False
        )
    )
    expert = Checkpoint(path=write_model(tmp_path / "expert", TENSORS, tied=True))
    assert "lm_head.weight" in check_mergeable(base, [expert])
    assert expert.source_name("lm_head.weight") == "model.embed_tokens.weight"


def test_mismatched_models_are_user_errors(tmp_path: Path) -> None:
    base = Checkpoint(path=write_model(tmp_path / "base", TENSORS, tied=True))
    wrong_shape = {**TENSORS, "model.norm.weight": torch.ones(4)}
    other = Checkpoint(path=write_model(tmp_path / "other", wrong_shape, tied=True))
    with pytest.raises(UserError, match=r"model.norm.weight has shape \[4\], the base has \[3\]"):
        check_mergeable(base, [other])
    missing = {k: v for k, v in TENSORS.items() if "layers" not in k}
    short = Checkpoint(path=write_model(tmp_path / "short", missing, tied=True))
    with pytest.raises(UserError, match="model.layers.0.mlp.up_proj.weight of the base"):
        check_mergeable(base, [short])
    with pytest.raises(UserError, match="no \\*.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        Checkpoint(path=tmp_path / "empty")
