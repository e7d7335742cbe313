"""Block layouts: which decoder layers are merged with the same parameters.

A layout maps every transformer layer to a block; embeddings, the final norm and the LM head
form one extra block of their own (SIPBMM's "+1"), always the last one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeopt.tensor_names import layer_of


def layer_of_tensor(name: str) -> int | None:
    """The layer index of a Hugging Face tensor name (any architecture's layer stack, see
    :mod:`mergeopt.tensor_names`), or None for non-layer tensors.

    >>> layer_of_tensor("model.layers.3.self_attn.q_proj.weight")
    3
    >>> layer_of_tensor("transformer.h.2.mlp.c_fc.weight")
    2
    >>> layer_of_tensor("model.embed_tokens.weight") is None
    True
    """
    ref = layer_of(name)
    return ref.index if ref else None


@dataclass(frozen=True)
class BlockLayout:
    """Layers grouped into contiguous blocks, plus one block for everything outside the layers.

    Attributes:
        layer_blocks: ``layer_blocks[i]`` is the block of decoder layer ``i``; blocks are
            numbered from 0 in layer order and are contiguous.
    """

    layer_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layer_blocks:
            raise ValueError("a block layout needs at least one layer")
        if self.layer_blocks[0] != 0 or any(
            b - a not in (0, 1)
            for a, b in zip(self.layer_blocks, self.layer_blocks[1:], strict=False)
        ):
            raise ValueError(f"blocks must be contiguous and numbered from 0: {self.layer_blocks}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_blocks)

    @property
    def num_layer_blocks(self) -> int:
        return self.layer_blocks[-1] + 1

    @property
    def num_blocks(self) -> int:
        """Layer blocks plus the embeddings/norm/head block."""
        return self.num_layer_blocks + 1

    @property
    def outer_block(self) -> int:
        """Index of the block holding embeddings, final norm and LM head."""
        return self.num_layer_blocks

    def block_of_tensor(self, name: str) -> int:
        layer = layer_of_tensor(name)
        if layer is None:
            return self.outer_block
        if layer >= self.num_layers:
            raise ValueError(
                f"tensor {name!r} is in layer {layer}, the layout has {self.num_layers}"
            )
        return self.layer_blocks[layer]

    def layers_of_block(self, block: int) -> list[int]:
        return [i for i, b in enumerate(self.layer_blocks) if b == block]

    @classmethod
    def fixed(
        cls, num_layers: int, *, layers_per_block: int | None = None, num_blocks: int | None = None
    ) -> BlockLayout:
        """Consecutive layers in blocks of (nearly) equal size.

        Give exactly one of ``layers_per_block`` (the last block may be shorter) or
        ``num_blocks`` (sizes differ by at most one layer, larger blocks first).
        """
        if (layers_per_block is None) == (num_blocks is None):
            raise ValueError("give exactly one of layers_per_block and num_blocks")
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if layers_per_block is not None:
            if not 1 <= layers_per_block <= num_layers:
                raise ValueError(f"layers_per_block must be in [1, {num_layers}]")
            return cls(tuple(i // layers_per_block for i in range(num_layers)))
        assert num_blocks is not None
        if not 1 <= num_blocks <= num_layers:
            raise ValueError(f"num_blocks must be in [1, {num_layers}]")
        return cls.from_sizes(_even_sizes(num_layers, num_blocks))

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> BlockLayout:
        if any(s < 1 for s in sizes):
            raise ValueError(f"block sizes must be positive: {list(sizes)}")
        return cls(tuple(b for b, size in enumerate(sizes) for _ in range(size)))

    def sizes(self) -> list[int]:
        return [len(self.layers_of_block(b)) for b in range(self.num_layer_blocks)]

    @classmethod
    def by_difference(
        cls,
        layer_scores: Sequence[float],
        *,
        num_blocks: int,
        alpha: float = 1.0,
        beta: float = 1.0,
    ) -> BlockLayout:
        """Contiguous blocks of layers with similar difference scores (SIPBMM's partition).

        Minimizes, exactly (dynamic programming, O(num_blocks · L²)),

            alpha · Σ_blocks Σ_{l in block} (s_l − mean_block)²  +  beta · Σ_blocks (n_b/m − 1)²

        over all partitions of the L layers into ``num_blocks`` contiguous blocks, where
        ``s`` are the layer scores min-max scaled to [0, 1] (so alpha does not depend on
        their units), ``n_b`` the block sizes and ``m = L / num_blocks``. alpha = 0 gives
        equal sizes; beta = 0 pure within-block variance. Ties go to the earliest split.
        (SIPBMM: arXiv 2512.09972, layers grouped by a variance + balance objective.)
        """
        count = len(layer_scores)
        if count < 1:
            raise ValueError("need at least one layer score")
        if not 1 <= num_blocks <= count:
            raise ValueError(f"num_blocks must be in [1, {count}]")
        if alpha < 0 or beta < 0:
            raise ValueError("alpha and beta must be non-negative")
        low, high = min(layer_scores), max(layer_scores)
        span = (high - low) or 1.0
        scores = [(float(v) - low) / span for v in layer_scores]
        prefix = [0.0]
        prefix_sq = [0.0]
        for value in scores:
            prefix.append(prefix[-1] + value)
            prefix_sq.append(prefix_sq[-1] + value * value)
        mean_size = count / num_blocks

        def segment_cost(start: int, end: int) -> float:
            size = end - start
            total = prefix[end] - prefix[start]
            variance = max(0.0, prefix_sq[end] - prefix_sq[start] - total * total / size)
            return alpha * variance + beta * (size / mean_size - 1.0) ** 2

        infinity = float("inf")
        # best[b][j]: the cheapest split of the first j layers into b blocks
        best = [[infinity] * (count + 1) for _ in range(num_blocks + 1)]
        split = [[0] * (count + 1) for _ in range(num_blocks + 1)]
        best[0][0] = 0.0
        for blocks in range(1, num_blocks + 1):
            for end in range(blocks, count - (num_blocks - blocks) + 1):
                for start in range(blocks - 1, end):
                    if best[blocks - 1][start] == infinity:
                        continue
                    cost = best[blocks - 1][start] + segment_cost(start, end)
                    if cost < best[blocks][end] - 1e-12:
                        best[blocks][end] = cost
                        split[blocks][end] = start
        sizes: list[int] = []
        end = count
        for blocks in range(num_blocks, 0, -1):
            start = split[blocks][end]
            sizes.append(end - start)
            end = start
        return cls.from_sizes(sizes[::-1])

    def to_dict(self) -> dict[str, Any]:
        return {"layer_blocks": list(self.layer_blocks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockLayout:
        return cls(tuple(int(b) for b in data["layer_blocks"]))


def _even_sizes(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _difference_stats(base: Path | str, experts: Sequence[Path | str]) -> dict[str, list[Any]]:
    from mergeopt.checkpoints import tensor_difference_stats  # torch: imported only here

    return tensor_difference_stats(Path(base), [Path(p) for p in experts])


def _group_scores(
    stats: dict[str, list[Any]], group_of: Any, groups: int, metric: str
) -> list[float]:
    """Mean over experts of a group's task-vector size: L2 (RMS per element) or 1 − cosine."""
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    num_experts = len(next(iter(stats.values())))
    sums = [[[0.0] * 5 for _ in range(num_experts)] for _ in range(groups)]
    for name, rows in stats.items():
        group = group_of(name)
        if group is None:
            continue
        for expert, row in enumerate(rows):
            for i, value in enumerate(row):
                sums[group][expert][i] += value
    scores = []
    for group in sums:
        values = []
        for delta_sq, dot, base_sq, expert_sq, numel in group:
            if metric == "l2":
                values.append(math.sqrt(delta_sq / numel) if numel else 0.0)
            else:
                norms = math.sqrt(base_sq * expert_sq)
                values.append(1.0 - dot / norms if norms > 0 else 0.0)
        scores.append(sum(values) / len(values))
    return scores


def layer_difference_scores(
    base: Path | str, experts: Sequence[Path | str], *, metric: str = "l2"
) -> list[float]:
    """One score per decoder layer: how far the experts moved it from the base.

    ``l2``: the root-mean-square of the task vector over the layer's tensors (so layers of any
    size compare), averaged over experts; ``cosine``: 1 − cos(base layer, expert layer) over the
    concatenated tensors, averaged over experts. Reads each tensor once (safetensors, fp32).
    """
    stats = _difference_stats(base, experts)
    layers = 1 + max((layer_of_tensor(n) or 0) for n in stats)
    return _group_scores(stats, layer_of_tensor, layers, metric)


def block_importance(
    base: Path | str, experts: Sequence[Path | str], layout: BlockLayout, *, metric: str = "l2"
) -> list[float]:
    """Per block (the outer embeddings/norm/head block last): the block's task-vector size
    (``metric`` as in :func:`layer_difference_scores`), divided by the largest, so in [0, 1]
    with the most changed block at 1 — SIPBMM's structural importance prior."""
    stats = _difference_stats(base, experts)
    scores = _group_scores(stats, layout.block_of_tensor, layout.num_blocks, metric)
    top = max(scores)
    return [score / top if top > 0 else 0.0 for score in scores]
