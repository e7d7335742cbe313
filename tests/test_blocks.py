"""Block layouts: fixed sizes, SIPBMM's difference-based partition, block importance."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeopt.blocks import BlockLayout, block_importance, layer_difference_scores


def test_fixed_layouts_cover_layers_contiguously() -> None:
    assert BlockLayout.fixed(5, layers_per_block=2).layer_blocks == (0, 0, 1, 1, 2)
    assert BlockLayout.fixed(5, num_blocks=2).sizes() == [3, 2]
    layout = BlockLayout.fixed(4, num_blocks=2)
    assert layout.block_of_tensor("model.layers.3.mlp.up_proj.weight") == 1
    assert layout.block_of_tensor("lm_head.weight") == layout.outer_block == 2


def objective(sizes: list[int], scores: list[float], alpha: float, beta: float) -> float:
    low, high = min(scores), max(scores)
    scaled = [(s - low) / ((high - low) or 1.0) for s in scores]
    mean_size = len(scores) / len(sizes)
    total, start = 0.0, 0
    for size in sizes:
        block = scaled[start : start + size]
        mean = sum(block) / size
        total += alpha * sum((v - mean) ** 2 for v in block) + beta * (size / mean_size - 1) ** 2
        start += size
    return total


def all_partitions(count: int, parts: int) -> list[list[int]]:
    result = []
    for cuts in itertools.combinations(range(1, count), parts - 1):
        edges = [0, *cuts, count]
        result.append([b - a for a, b in itertools.pairwise(edges)])
    return result


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (1.0, 0.1), (0.3, 1.0)])
def test_difference_partition_is_the_exact_optimum(seed: int, alpha: float, beta: float) -> None:
    scores = torch.rand(9, generator=torch.Generator().manual_seed(seed)).tolist()
    layout = BlockLayout.by_difference(scores, num_blocks=4, alpha=alpha, beta=beta)
    best = min(objective(p, scores, alpha, beta) for p in all_partitions(9, 4))
    assert objective(layout.sizes(), scores, alpha, beta) == pytest.approx(best, abs=1e-9)


def test_difference_partition_splits_at_jumps_and_balances_without_alpha() -> None:
    scores = [0.1, 0.1, 0.1, 0.9, 0.9, 0.5, 0.5, 0.5]
    assert BlockLayout.by_difference(scores, num_blocks=3, beta=0.0).sizes() == [3, 2, 3]
    assert BlockLayout.by_difference(scores, num_blocks=4, alpha=0.0).sizes() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="num_blocks"):
        BlockLayout.by_difference(scores, num_blocks=9)


def make_family(folder: Path) -> list[Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_merge_oracle_helpers", Path(__file__).with_name("test_merge_oracle.py")
    )
    assert spec is not None and spec.loader is not None
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    base, *experts = oracle.make_tiny_qwen2_family(folder, tied=False, num_experts=2)
    base_state = load_file(base / "model.safetensors")
    for index, expert in enumerate(experts):
        scale = {0: 0.001, 1: 0.01, 2: 0.1, 3: 0.01}
        state = {
            name: tensor
            + scale.get(int(name.split(".")[2]) if ".layers." in name else 3, 0.0)
            * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(index))
            for name, tensor in base_state.items()
        }
        save_file(state, str(expert / "model.safetensors"), metadata={"format": "pt"})
    return [base, *experts]


def test_layer_scores_and_block_importance_follow_the_task_vectors(tmp_path: Path) -> None:
    base, *experts = make_family(tmp_path)
    scores = layer_difference_scores(base, experts)
    assert len(scores) == 4
    assert scores.index(max(scores)) == 2 and scores.index(min(scores)) == 0
    cosine = layer_difference_scores(base, experts, metric="cosine")
    assert cosine.index(max(cosine)) == 2 and all(c >= 0 for c in cosine)
    layout = BlockLayout.by_difference(scores, num_blocks=2, beta=0.0)
    importance = block_importance(base, experts, layout)
    assert len(importance) == layout.num_blocks == 3
    assert max(importance) == 1.0 and all(0.0 <= v <= 1.0 for v in importance)
    assert importance[layout.layer_blocks[2]] == 1.0
