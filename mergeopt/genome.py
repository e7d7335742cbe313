"""The genome: Optuna trial parameters <-> per-block, per-expert merge parameters, or (data-flow
space) <-> a path through the source models' layers.

Parameter space (:class:`Genome`): every searched merge parameter is one trial parameter per
(block, expert), named ``b{block:02d}.e{expert}.{param}`` — for example ``b03.e1.weight`` is the
weight of expert 1 in block 3. The last block holds embeddings, final norm and LM head (see
``blocks.py``).

Data-flow space (:class:`DataflowGenome`): ``h{hop:03d}.take`` and ``h{hop:03d}.scale`` per
candidate hop (see its docstring).

This module is the only place that knows either mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

_PARAM_RE = re.compile(r"^b(\d+)\.e(\d+)\.([a-z_]+)$")
_HOP_RE = re.compile(r"^h(\d+)\.(take|scale)$")

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


Hop = tuple[int, int, float]
"""``(source, layer, scale)``: one position of a data-flow path (``merge/dataflow.py``)."""


@dataclass(frozen=True)
class DataflowGenome:
    """The search space of a data-flow study (Sakana's DFS, arXiv:2403.13187).

    The candidate hops are every decoder layer of every source model, sources in order (model A
    first), repeated ``repeats`` times: ``T = M x repeats`` hops for ``M`` layers in all. Hop
    ``t`` has ``h{t:03d}.take`` in [-1, 1] (taken when positive) and, when ``scale`` is given,
    ``h{t:03d}.scale`` (the factor on its input, searched on a log scale so that 1 is the
    middle of the range). The path is model A's first layer, the taken hops in order, model A's
    last layer (the ends, fixed, with scale 1); around it, model A's embeddings, final norm
    and head.

    Attributes:
        source_layers: the number of decoder layers of each source model.
        repeats: ``r``, how many times the layers of all sources are offered in turn.
        scale: bounds of the searched input scales, or None (every scale 1).
    """

    source_layers: tuple[int, ...]
    repeats: int
    scale: tuple[float, float] | None

    def __post_init__(self) -> None:
        if not self.source_layers or min(self.source_layers) < 2 or self.repeats < 1:
            raise ValueError("a data-flow genome needs sources of 2+ layers and repeats >= 1")
        if self.scale is not None and not 0 < self.scale[0] < self.scale[1]:
            raise ValueError(f"scale bounds must satisfy 0 < low < high, got {self.scale}")

    @property
    def hops(self) -> list[tuple[int, int]]:
        """``(source, layer)`` of each candidate hop, in genome order."""
        one_pass = [(s, i) for s, count in enumerate(self.source_layers) for i in range(count)]
        return one_pass * self.repeats

    @property
    def param_names(self) -> list[str]:
        kinds = ("take", "scale") if self.scale is not None else ("take",)
        return [f"h{hop:03d}.{kind}" for hop in range(len(self.hops)) for kind in kinds]

    @property
    def dimension(self) -> int:
        return len(self.param_names)

    def distributions(self) -> dict[str, BaseDistribution]:
        from optuna.distributions import FloatDistribution

        distributions: dict[str, BaseDistribution] = {}
        for hop in range(len(self.hops)):
            distributions[f"h{hop:03d}.take"] = FloatDistribution(-1.0, 1.0)
            if self.scale is not None:
                distributions[f"h{hop:03d}.scale"] = FloatDistribution(*self.scale, log=True)
        return distributions

    def path(self, params: Mapping[str, float]) -> list[Hop]:
        """The trial's path: A's first layer, the taken hops, A's last layer."""
        for name in self.param_names:
            if name not in params:
                raise KeyError(f"trial has no value for genome parameter {name!r}")
        middle = [
            (source, layer, float(params[f"h{hop:03d}.scale"]) if self.scale is not None else 1.0)
            for hop, (source, layer) in enumerate(self.hops)
            if params[f"h{hop:03d}.take"] > 0
        ]
        return [(0, 0, 1.0), *middle, (0, self.source_layers[0] - 1, 1.0)]

    def source_alone(self) -> dict[str, float]:
        """Trial parameters whose path is model A's own layers, in order, unscaled."""
        inner = set(range(1, self.source_layers[0] - 1))
        params: dict[str, float] = {}
        for hop, (source, layer) in enumerate(self.hops):
            first_pass = hop < sum(self.source_layers)
            params[f"h{hop:03d}.take"] = (
                1.0 if first_pass and source == 0 and layer in inner else -1.0
            )
            if self.scale is not None:
                params[f"h{hop:03d}.scale"] = 1.0
        return params

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": "dataflow",
            "source_layers": list(self.source_layers),
            "repeats": self.repeats,
            "scale": None if self.scale is None else list(self.scale),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataflowGenome:
        scale = data.get("scale")
        return cls(
            source_layers=tuple(int(n) for n in data["source_layers"]),
            repeats=int(data["repeats"]),
            scale=None if scale is None else (float(scale[0]), float(scale[1])),
        )


SearchGenome = Genome | DataflowGenome
"""A study's search space: parameter space or data-flow space."""


def genome_from_dict(data: Mapping[str, Any]) -> SearchGenome:
    """The genome a study stores (``to_dict``), of either space."""
    if data.get("space") == "dataflow":
        return DataflowGenome.from_dict(data)
    return Genome.from_dict(data)


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
