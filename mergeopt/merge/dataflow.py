"""Data-flow-space merging (Sakana's DFS): tokens take a path through the decoder layers of
several resident models; no weight is merged or copied.

A path is a list of hops ``(source, layer, scale)``: decoder layer ``layer`` of source model
``source`` (0 is model A, whose embeddings, final norm and head the path uses), its input (the
residual stream) multiplied by ``scale``. :class:`DataflowEngine` re-points the resident model's
layer list at the source models' resident layer modules for each trial (:class:`PathLayer` wraps
each with its position and scale), and sets the config's depth to the path's.

Repeated layers: transformers' attention writes its KV cache into slot ``self.layer_idx`` and
the cache is built with ``config.num_hidden_layers`` slots; a layer module taken twice would
overwrite its own keys. :class:`PathLayer` sets ``layer_idx`` of the layer's attention modules to
its position before each call, so every position has its own slot.

Export (:func:`folded_layer_tensors`): the hop scales fold into plain weights. In a pre-norm
layer ``L(x) = x + A(n1(x)) + M(n2(x + A(n1(x))))`` with scale-invariant RMSNorms ``n1, n2``,
``L(c x) = c L'(x)`` where ``L'`` is ``L`` with its residual writers (``o_proj``, ``down_proj``)
divided by ``c``. Carrying the product ``C_p = s_0 ... s_p`` of the scales down the path, the
layer at position ``p`` gets its writers divided by ``C_p``; the final norm removes ``C``. Exact
but for the norms' epsilon (``tests/test_dataflow.py`` checks the logits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeopt.errors import UserError

Hop = tuple[int, int, float]
"""``(source, layer, scale)``: one position of a path."""

RESIDUAL_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")
"""The tensors of a Llama-style decoder layer that write into the residual stream."""

LLAMA_STYLE_LAYER = frozenset(
    {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")),
        *(f"mlp.{p}_proj.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")),
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
    }
)
"""Tensor names (within one layer) of the pre-norm decoder layers whose scales fold exactly:
Llama, Mistral, Qwen2, Qwen3 (its q/k norms act inside attention)."""


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the model's ``layers`` ModuleList (``model.model`` for Qwen2, Llama)."""
    stack = getattr(model, "base_model", model)
    if not isinstance(getattr(stack, "layers", None), torch.nn.ModuleList):
        raise UserError(
            f"{type(model).__name__}: data-flow search needs a decoder whose layers are a "
            "`layers` list (Llama, Mistral, Qwen2, Qwen3)"
        )
    return stack


def _attention_types(config: Any, count: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * count


class PathLayer(torch.nn.Module):
    """One position of a path: a resident decoder layer, its input scaled by ``scale``, its
    attention told its position (``layer_idx``) before each call (module docstring)."""

    def __init__(
        self, layer: torch.nn.Module, *, position: int, scale: float, attention_type: str
    ) -> None:
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = scale
        self.attention_type = attention_type
        # A plain list: the modules are the layer's own, not registered twice.
        self._indexed: list[torch.nn.Module] = [
            module for module in layer.modules() if hasattr(module, "layer_idx")
        ]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        for module in self._indexed:
            setattr(module, "layer_idx", self.position)  # noqa: B010 - nn.Module types attrs as Tensor|Module
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


class DataflowEngine:
    """The decoder layers of every source model resident beside the scorer's ``model`` (which
    is source 0, model A), and the per-trial re-pointing of ``model``'s layer list at them.

    Args:
        model: the resident transformers model of source 0 (its own layers are source 0's).
        sources: folders of the other source models (1, 2, ...), loaded in ``model``'s dtype
            onto its device; only their decoder layers are kept.
    """

    def __init__(
        self, *, model: torch.nn.Module, sources: Sequence[Path], trust_remote_code: bool = False
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.model = model
        self.stack = decoder_stack(model)
        config: Any = model.config
        self.config = config
        parameter = next(model.parameters())
        own = self.stack.layers
        assert isinstance(own, torch.nn.ModuleList)
        self.layers: list[list[torch.nn.Module]] = [list(own)]
        self.attention_types: list[list[str]] = [_attention_types(config, len(own))]
        for folder in sources:
            source = AutoModelForCausalLM.from_pretrained(
                folder, dtype=parameter.dtype, trust_remote_code=trust_remote_code
            )
            layers = decoder_stack(source).layers
            assert isinstance(layers, torch.nn.ModuleList)
            layers.to(parameter.device).eval().requires_grad_(False)
            self.layers.append(list(layers))
            self.attention_types.append(_attention_types(source.config, len(layers)))
        self._own = own
        self._own_depth = int(config.num_hidden_layers)
        self._own_types = getattr(config, "layer_types", None)
        self.path: list[Hop] | None = None

    def apply(self, path: Sequence[Hop]) -> None:
        """Point the model's layer list at ``path``'s layers (no weights copied)."""
        if not path:
            raise ValueError("a data-flow path needs at least one layer")
        hops = [(int(s), int(i), float(w)) for s, i, w in path]
        self.stack.layers = torch.nn.ModuleList(
            PathLayer(
                self.layers[source][layer],
                position=position,
                scale=scale,
                attention_type=self.attention_types[source][layer],
            )
            for position, (source, layer, scale) in enumerate(hops)
        )
        self.config.num_hidden_layers = len(hops)
        if self._own_types is not None:
            self.config.layer_types = [self.attention_types[s][i] for s, i, _ in hops]
        self.path = hops

    def restore(self) -> None:
        """Model A's own layers again (what loading whole checkpoints into it needs)."""
        for position, layer in enumerate(self._own):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    setattr(module, "layer_idx", position)  # noqa: B010 - as in PathLayer
        self.stack.layers = self._own
        self.config.num_hidden_layers = self._own_depth
        if self._own_types is not None:
            self.config.layer_types = self._own_types
        self.path = None

    def forget(self, target: object) -> None:
        """Source checkpoints were loaded into model A's layers (anchors): show its own
        layers, which now hold them; the next trial re-points the list anyway."""
        self.restore()


def cumulative_scales(path: Sequence[Hop]) -> list[float]:
    """``C_p = s_0 * ... * s_p``: the factor the residual stream carries after position p."""
    products, product = [], 1.0
    for _, _, scale in path:
        product *= scale
        products.append(product)
    return products


def folded_layer_tensors(
    path: Sequence[Hop], layer_tensors: Sequence[Sequence[dict[str, torch.Tensor]]]
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(position, tensors)`` of the plain checkpoint equivalent to ``path`` (module docstring):
    ``layer_tensors[source][layer]`` are a layer's tensors by name within the layer
    (``self_attn.o_proj.weight``); the residual writers come out multiplied by ``1 / C_p`` in
    their own dtype, as mergekit's ``passthrough`` applies a ``scale`` (so a mergekit config of
    the path reproduces these weights exactly)."""
    for position, ((source, layer, _), product) in enumerate(
        zip(path, cumulative_scales(path), strict=True)
    ):
        tensors = {}
        for name, tensor in layer_tensors[source][layer].items():
            if product != 1.0 and name.startswith(RESIDUAL_WRITERS):
                tensor = tensor * (1.0 / product)
            tensors[name] = tensor
        yield position, tensors
