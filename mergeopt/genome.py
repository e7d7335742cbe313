"""The genome: Optuna trial parameters <-> per-block, per-expert merge parameters.

Every searched merge parameter is one trial parameter per (block, expert), named
``b{block:02d}.e{expert}.{param}`` — for example ``b03.e1.weight`` is the weight of expert 1
in block 3. The last block holds embeddings, final norm and LM head (see ``blocks.py``).
This module is the only place that knows that mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

_PARAM_RE = re.compile(r"^b(\d+)\.e(\d+)\.([a-z_]+)$")

BlockParams = list[list[dict[str, float]]]
"""``block_params[block][expert]`` is the parameter dict of one expert in one block."""


def param_name(block: int, expert: int, param: str) -> str:
    return f"b{block:02d}.e{expert}.{param}"


def parse_param_name(name: str) -> tuple[int, int, str]:
    """``"b03.e1.weight"`` -> ``(3, 1, "weight")``; raises ValueError for other names."""
    match = _PARAM_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a mergeopt genome parameter (bNN.eK.param)")
    return int(match.group(1)), int(match.group(2)), match.group(3)


@dataclass(frozen=True)
class Genome:
    """The search space of a merge study.

    Attributes:
        num_blocks: blocks including the embeddings/norm/head block.
        num_experts: fine-tuned models merged into the base.
        searched: bounds ``(low, high)`` of each searched per-expert parameter, e.g.
            ``{"weight": (0.0, 1.0), "density": (0.1, 1.0)}``.
        fixed: per-expert parameters held constant in every block (not searched).
    """

    num_blocks: int
    num_experts: int
    searched: Mapping[str, tuple[float, float]]
    fixed: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.num_experts < 1:
            raise ValueError("a genome needs at least one block and one expert")
        overlap = set(self.searched) & set(self.fixed)
        if overlap:
            raise ValueError(f"parameters both searched and fixed: {sorted(overlap)}")
        for name, (low, high) in self.searched.items():
            if not low < high:
                raise ValueError(f"bounds of {name!r} must satisfy low < high, got ({low}, {high})")

    @property
    def param_names(self) -> list[str]:
        """Trial parameter names in genome order: block, then expert, then parameter."""
        return [
            param_name(block, expert, param)
            for block in range(self.num_blocks)
            for expert in range(self.num_experts)
            for param in self.searched
        ]

    @property
    def dimension(self) -> int:
        return self.num_blocks * self.num_experts * len(self.searched)

    def distributions(self) -> dict[str, BaseDistribution]:
        # Imported here so that the merge engine can use genomes where optuna is absent.
        from optuna.distributions import FloatDistribution

        return {
            name: FloatDistribution(*self.searched[parse_param_name(name)[2]])
            for name in self.param_names
        }

    def block_params(self, params: Mapping[str, float]) -> BlockParams:
        """Per-block, per-expert parameter dicts (fixed parameters included) of a trial."""
        blocks: BlockParams = [
            [dict(self.fixed) for _ in range(self.num_experts)] for _ in range(self.num_blocks)
        ]
        for name in self.param_names:
            if name not in params:
                raise KeyError(f"trial has no value for genome parameter {name!r}")
            block, expert, param = parse_param_name(name)
            blocks[block][expert][param] = float(params[name])
        return blocks

    def broadcast(self, per_expert: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """Trial parameters that give every block the same per-expert values (model-level)."""
        if len(per_expert) != self.num_experts:
            raise ValueError(
                f"expected values for {self.num_experts} experts, got {len(per_expert)}"
            )
        return {
            param_name(block, expert, param): float(per_expert[expert][param])
            for block in range(self.num_blocks)
            for expert in range(self.num_experts)
            for param in self.searched
        }

    def expert_alone(self, expert: int) -> dict[str, float]:
        """Trial parameters closest to the expert itself: its weight at the upper bound and the
        others' at the lower bound, every other searched parameter (density, ...) at its upper
        bound. With weights in [0, 1] and task arithmetic this is exactly the expert."""
        per_expert = [
            {
                param: high if (param != "weight" or other == expert) else low
                for param, (low, high) in self.searched.items()
            }
            for other in range(self.num_experts)
        ]
        return self.broadcast(per_expert)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "num_experts": self.num_experts,
            "searched": {k: list(v) for k, v in self.searched.items()},
            "fixed": dict(self.fixed),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Genome:
        return cls(
            num_blocks=int(data["num_blocks"]),
            num_experts=int(data["num_experts"]),
            searched={k: (float(v[0]), float(v[1])) for k, v in data["searched"].items()},
            fixed={k: float(v) for k, v in data.get("fixed", {}).items()},
        )


def to_mergekit_config(
    block_params: BlockParams,
    *,
    layer_blocks: Sequence[int],
    base_model: str,
    experts: Sequence[str],
    method: str,
    method_params: Mapping[str, float | bool] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The mergekit configuration (a dict ready for ``yaml.safe_dump``) of one merge recipe.

    Per-block values become mergekit filter entries, one per decoder layer
    (``{filter: "layers.3.", value: 0.61}``), followed by an unfiltered entry with the value of
    the embeddings/norm/head block, which is what every non-layer tensor matches; mergekit takes
    the first entry whose filter is a substring of the tensor name, and ``"layers.3."`` never
    matches layer 13 or 30. A parameter with the same value in every block is written as a plain
    scalar. Gradient lists are not used because mergekit interpolates them linearly over the
    layers, which cannot express piecewise-constant blocks.

    Args:
        block_params: ``block_params[block][expert]`` as :meth:`Genome.block_params` returns it;
            the last block is the embeddings/norm/head block.
        layer_blocks: the block of each decoder layer (``BlockLayout.layer_blocks``).
        base_model: path (or hub id) of the base model.
        experts: paths of the experts, in genome order.
        method: mergekit ``merge_method`` name (``task_arithmetic``, ``ties``, ...).
        method_params: global method parameters (``normalize``, ``lambda``, ...).
        dtype: the dtype mergekit computes in.
    """
    num_blocks = len(block_params)
    if not layer_blocks or max(layer_blocks) != num_blocks - 2:
        raise ValueError(
            f"layer_blocks name {max(layer_blocks, default=-1) + 1} layer blocks; the recipe "
            f"has {num_blocks} blocks (layer blocks + 1 outer block)"
        )
    if any(len(row) != len(experts) for row in block_params):
        raise ValueError(f"the recipe does not have {len(experts)} experts in every block")
    outer = num_blocks - 1
    models: list[dict[str, Any]] = []
    for expert, path in enumerate(experts):
        parameters: dict[str, Any] = {}
        for name in block_params[outer][expert]:
            per_block = [float(block_params[b][expert][name]) for b in range(num_blocks)]
            if all(value == per_block[0] for value in per_block):
                parameters[name] = per_block[0]
                continue
            parameters[name] = [
                {"filter": f"layers.{layer}.", "value": per_block[block]}
                for layer, block in enumerate(layer_blocks)
            ] + [{"value": per_block[outer]}]
        models.append({"model": str(path), "parameters": parameters})
    config: dict[str, Any] = {"merge_method": method, "base_model": str(base_model)}
    if method == "linear":  # a weighted average of the experts alone: no base model takes part
        del config["base_model"]
    config.update(models=models, dtype=dtype)
    if method_params:
        config["parameters"] = {
            key: (value if isinstance(value, bool) else float(value))
            for key, value in method_params.items()
        }
    return config
