"""Where a tensor sits in a model, from its Hugging Face name: the one layer-name resolver.

Every architecture mergekit describes (its ``_data/architectures``) numbers its repeated
blocks as ``STACK.N.`` under a stack called ``layers``, ``layer``, ``h``, ``blocks`` or
``block``: Llama, Qwen2, Mistral, Granite ``model.layers.N``, Falcon and GPT-2
``transformer.h.N`` (GPT-2 also bare ``h.N``), GPT-NeoX ``gpt_neox.layers.N``, BERT
``encoder.layer.N``, T5 ``encoder.block.N``, Qwen-VL ``visual.blocks.N``, LLaVA's language
model ``model.language_model.layers.N`` and vision tower ``...encoder.layers.N``. A *module*
is one such stack (its name prefix); a multimodal model has several, each with its own layer
count, as mergekit infers them.

Tensors outside the layers have a role: before the layers (input embeddings: mergekit's
pre-weights, planned from a mergekit config's first slice) or after them (final norms and output
heads: post-weights, from the last slice). The role comes from the tensor's own module name,
never from a substring: GPT-NeoX's ``embed_out`` is a head, ``embed_in`` an embedding. A
tensor whose module this table does not know counts as a pre-weight, as mergekit treats
every loose weight of an architecture it infers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_LAYER_RE = re.compile(r"^(?P<module>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.")

VOCAB_EMBEDDINGS = frozenset(
    {"embed_tokens", "embed_in", "wte", "word_embeddings", "tok_embeddings", "shared"}
)
"""Input token embeddings (a pre-weight with one row per vocabulary entry)."""
VOCAB_HEADS = frozenset({"lm_head", "embed_out", "output", "output_layer"})
"""Output heads over the vocabulary (a post-weight with one row per vocabulary entry)."""
POST_MODULES = frozenset(
    {*VOCAB_HEADS, "norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "score"}
    | {"classifier", "pooler"}
)
"""Modules after the layers: final norms and heads."""

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
"""Config keys that give the (text) model's layer count, in the order they are tried."""


@dataclass(frozen=True)
class LayerRef:
    """A tensor inside a layer: its stack (``module``, the name prefix) and layer index."""

    module: str
    index: int


def layer_of(name: str) -> LayerRef | None:
    """The stack and layer index of ``name``, or None for a tensor outside the layers.

    >>> layer_of("transformer.h.3.self_attention.dense.weight")
    LayerRef(module='transformer.h', index=3)
    >>> layer_of("gpt_neox.embed_in.weight") is None
    True
    """
    match = _LAYER_RE.match(name)
    if match is None:
        return None
    return LayerRef(module=match.group("module"), index=int(match.group("index")))


def _module_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1]


def is_post_weight(name: str) -> bool:
    """A tensor outside the layers that comes after them (a final norm or a head)."""
    return layer_of(name) is None and _module_name(name) in POST_MODULES


def is_classifier_head(name: str) -> bool:
    """A tensor of a sequence classifier's head (``classifier.out_proj.weight`` of RoBERTa,
    ``classifier.weight`` of BERT, ``roberta.classifier...`` when prefixed): outside the layers,
    under a module called ``classifier``. Its first dimension may be the task's label count.

    >>> is_classifier_head("classifier.out_proj.bias"), is_classifier_head("bert.pooler.dense.bias")
    (True, False)
    """
    return layer_of(name) is None and "classifier" in name.split(".")[:-1]


def has_vocabulary_rows(name: str) -> bool:
    """The input embeddings or the output head: dimension 0 runs over the vocabulary."""
    if layer_of(name) is not None:
        return False
    return _module_name(name) in VOCAB_EMBEDDINGS | VOCAB_HEADS


def layer_counts(names: Iterable[str]) -> dict[str, int]:
    """Each stack's layer count (highest index + 1) among ``names``, in order of appearance."""
    counts: dict[str, int] = {}
    for name in names:
        ref = layer_of(name)
        if ref is not None:
            counts[ref.module] = max(counts.get(ref.module, 0), ref.index + 1)
    return counts


def config_num_layers(config: Mapping[str, Any]) -> int | None:
    """The (text) model's layer count from a ``config.json``: ``num_hidden_layers``, GPT-2's
    ``n_layer`` and the like, or the same under ``text_config``; None when none is there."""
    for scope in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return None
