"""Greedy decoding with a static KV cache, for the transformers scorer.

Every tensor a decode step touches has a fixed shape and a fixed address (the cache, the next
tokens, their positions, the attention mask, the step counter), and the step advances all of
them in place on the device. So the step can be captured once as a CUDA graph and replayed for
every token of every trial: the merge engine writes merged weights into the same parameter
tensors, which the graph reads where they lie. Off CUDA the same step runs eagerly; the graph is
a thin layer over it, so CPU tests check the decoding itself.

On CUDA the model's forward pass in the step is compiled (``torch.compile``, Inductor, no
CUDA graphs of its own) before the capture: fused elementwise kernels are what bring a step
near the time of reading the weights once. Compilation and capture are paid once per decoder
shape and worker.

Grouped-query attention in a decode step runs on the key/value heads as they lie in the cache:
the query's heads are packed per key/value head (``PACKED_GQA``). transformers' sdpa path copies
every layer's cache ``num_key_value_groups`` times a step whenever a mask is passed (5.17-5.19;
later releases pack the query themselves for one token, but not under ``torch.compile``): for a
4B model several GB a step.

Shapes: ``rows`` prompts per batch (the last batch padded with one-token dummy rows) and a
cache of ``length`` slots. A batch's prompts are left-padded to a prefill width; prompt slots
are ``[0, width)``, generated tokens take the slots after it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# How many steps are queued at a time; the host reads a chunk's tokens while the next chunk
# runs, so a batch whose every row has stopped runs at most two chunks too many.
STEPS_BETWEEN_CHECKS = 8
# Prefill widths and cache lengths round up to these, so a few shapes serve every batch.
PREFILL_WIDTH_MULTIPLE = 16
CACHE_LENGTH_MULTIPLE = 64
# Steps run outside a graph before the capture, on a side stream: the first compiles the
# forward pass, both warm cuBLAS and the allocator up.
WARMUP_STEPS = 2


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def prefill_width(prompts: list[list[int]]) -> int:
    """The width a batch's prompts are left-padded to."""
    return round_up(max(len(ids) for ids in prompts), PREFILL_WIDTH_MULTIPLE)


def cache_length(width: int, max_new_tokens: int) -> int:
    """Slots for a prompt of ``width`` and every generated token but the last (never fed back)."""
    return round_up(width + max_new_tokens - 1, CACHE_LENGTH_MULTIPLE)


def batch_rows(count: int, batch_size: int) -> int:
    """Rows of the decoder serving ``count`` prompts: a power of two up to ``batch_size``, so
    a short last batch reuses a smaller graph instead of capturing one per size."""
    rows = 1
    while rows < count:
        rows *= 2
    return min(rows, batch_size)


# The attention implementation a decode step switches sdpa models to (registered on first use).
PACKED_GQA = "mergeopt_packed_gqa"


def packed_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa attention whose one query token per row attends on the key/value heads directly.

    ``query`` is ``rows x heads x 1 x dim``; ``key`` and ``value`` ``rows x kv_heads x length x
    dim``; ``attention_mask`` additive, ``rows x 1 x 1 x length``. The query is viewed as
    ``rows x kv_heads x groups x dim`` (query head ``h`` reads key/value head ``h // groups``,
    as transformers' ``repeat_kv`` pairs them), so no key or value is copied. Anything else
    (several query tokens, no grouping) goes to transformers' sdpa unchanged. Returns
    ``rows x 1 x heads x dim``, as attention implementations do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, tokens, dim = query.shape
    if tokens != 1 or groups == 1 or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    packed = query.reshape(rows, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling
    )
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def _register_packed_gqa() -> None:
    from transformers import AttentionInterface

    if PACKED_GQA not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_GQA, packed_gqa_attention)


def supports_static_decoding(model: Any) -> bool:
    """Whether a model's attention is plain causal attention over all earlier tokens, through
    an implementation that takes a prepared 4-D additive mask (sdpa or eager): the static
    decoder builds its own masks and does not know sliding windows."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return False
    return not getattr(config, "use_sliding_window", False)


class StaticKVCache:
    """Keys and values of every layer, ``rows x kv_heads x length x head_dim`` each, allocated
    by the first forward pass; a forward pass of ``q`` tokens writes slots ``position ..
    position + q - 1`` (``position`` is a device tensor the decoder advances).

    Duck-types the one method transformers' decoder layers call on a cache (``update``)."""

    def __init__(self, *, length: int, device: torch.device) -> None:
        self.length = length
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._offsets = torch.arange(length, dtype=torch.long, device=device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at ``position``; give the layer's whole cache (the
        extra arguments transformers versions pass are not needed)."""
        if layer_idx == len(self.keys):
            rows, heads, _, key_dim = key_states.shape
            self.keys.append(key_states.new_zeros(rows, heads, self.length, key_dim))
            self.values.append(
                value_states.new_zeros(rows, heads, self.length, value_states.shape[-1])
            )
        slots = self.position + self._offsets[: key_states.shape[-2]]
        self.keys[layer_idx].index_copy_(2, slots, key_states)
        self.values[layer_idx].index_copy_(2, slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Only read by models when no positions are passed; the decoder always passes them."""
        return 0


class StaticDecoder:
    """Greedy decoding of ``rows`` prompts into a cache of ``length`` slots: ``prefill`` one
    batch, then ``advance`` one token at a time; ``generated`` (``rows x length``) holds token
    k of each row in column k and ``finite`` whether that step's logits were all finite.

    With ``capture`` (CUDA), the step is captured as a graph after ``WARMUP_STEPS`` eager steps
    and replayed from then on, in this batch and every later one."""

    def __init__(
        self,
        model: Any,
        *,
        rows: int,
        length: int,
        cache_field: str,
        capture: bool,
        graph_pool: Any = None,
    ) -> None:
        device = model.device
        self.model = model
        self.rows = rows
        self.length = length
        self.cache_field = cache_field
        self.capture = capture
        self.graph_pool = graph_pool
        self.cache = StaticKVCache(length=length, device=device)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.masked = torch.finfo(model.dtype).min
        # Additive mask of a decode step: 0 on a row's prompt slots and generated slots.
        self.mask = torch.full((rows, 1, 1, length), self.masked, dtype=model.dtype, device=device)
        self.generated = torch.zeros((rows, length), dtype=torch.long, device=device)
        self.finite = torch.ones((rows, length), dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        # The configs of the attention layers that run sdpa: a decode step runs them packed.
        self._sdpa_configs = list(
            {
                id(module.config): module.config
                for module in model.modules()
                if hasattr(module, "num_key_value_groups")
                and getattr(getattr(module, "config", None), "_attn_implementation", None) == "sdpa"
            }.values()
        )
        if self._sdpa_configs:
            _register_packed_gqa()
        self._forward: Callable[..., torch.Tensor] = self._model_logits
        if capture:
            self._forward = torch.compile(self._model_logits, dynamic=False)

    @contextmanager
    def _packed_attention(self) -> Iterator[None]:
        """The sdpa layers attend through ``packed_gqa_attention`` inside the block (the
        config's own attribute is set, not its setter: sub-configs keep theirs)."""
        for config in self._sdpa_configs:
            config._attn_implementation_internal = PACKED_GQA
        try:
            yield
        finally:
            for config in self._sdpa_configs:
                config._attn_implementation_internal = "sdpa"

    def _model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Last-position logits, ``rows x vocab``; writes the step's keys and values."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_field: self.cache},
        )
        return out.logits[:, -1, :]

    def read_back(
        self, start: int, stop: int
    ) -> Callable[[], tuple[list[list[int]], list[list[bool]]]]:
        """Queue the copy of steps ``start .. stop - 1`` to the host (token and finiteness of
        every row, step by step); the returned function waits for it and gives the lists."""
        tokens = self.generated[:, start:stop].T
        finite = self.finite[:, start:stop].T
        if self.tokens.device.type != "cuda":  # the steps have run already
            lists = tokens.tolist(), finite.tolist()
            return lambda: lists
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_finite.copy_(finite, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> tuple[list[list[int]], list[list[bool]]]:
            copied.synchronize()
            return host_tokens.tolist(), host_finite.tolist()

        return wait

    def prefill(self, prompts: list[list[int]], *, pad_token_id: int) -> None:
        """Left-pad ``prompts`` (dummy rows fill the batch), run them through the model, and
        record token 0 of every row. Positions count real tokens only, as in the dynamic path."""
        device = self.tokens.device
        width = prefill_width(prompts)
        rows = [*prompts, *([[pad_token_id]] * (self.rows - len(prompts)))]
        input_ids = torch.full((self.rows, width), pad_token_id, dtype=torch.long)
        real = torch.zeros((self.rows, self.length), dtype=torch.bool)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            real[row, width - len(ids) : width] = True
        real = real.to(device)
        causal = torch.ones((width, self.length), dtype=torch.bool, device=device).tril()
        allowed = causal[None, :, :] & real[:, None, :]  # rows x width x length
        prefill_mask = torch.full(
            (self.rows, 1, width, self.length), self.masked, dtype=self.mask.dtype, device=device
        )
        prefill_mask.masked_fill_(allowed[:, None], 0.0)
        position_ids = (real[:, :width].long().cumsum(-1) - 1).clamp(min=0)
        self.cache.position.zero_()
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=prefill_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_field: self.cache},
        )
        logits = out.logits[:, -1, :]
        next_tokens = logits.argmax(dim=-1, keepdim=True)
        self.generated[:, :1] = next_tokens
        self.finite[:, :1] = torch.isfinite(logits).all(dim=-1, keepdim=True)
        self.tokens.copy_(next_tokens)
        self.positions.copy_(position_ids[:, -1:] + 1)
        self.mask.fill_(self.masked)
        self.mask[:, 0, 0, :].masked_fill_(real, 0.0)
        self.cache.position.fill_(width)
        self.step_index.fill_(1)

    def _step(self) -> None:
        """One token for every row; advances every buffer in place (the captured body)."""
        # The new token's keys and values go to slot ``position``, which it attends to.
        self.mask.index_fill_(3, self.cache.position, 0.0)
        with self._packed_attention():
            logits = self._forward(self.tokens, self.mask, self.positions)
        self.finite.index_copy_(1, self.step_index, torch.isfinite(logits).all(-1, keepdim=True))
        next_tokens = logits.argmax(dim=-1, keepdim=True)
        self.generated.index_copy_(1, self.step_index, next_tokens)
        self.tokens.copy_(next_tokens)
        self.positions.add_(1)
        self.cache.position.add_(1)
        self.step_index.add_(1)

    def advance(self) -> None:
        """One decode step: a graph replay once captured, else the eager step."""
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.capture:
            self._step()
            return
        if self.eager_steps < WARMUP_STEPS:
            side = torch.cuda.Stream(device=self.tokens.device)
            side.wait_stream(torch.cuda.current_stream(self.tokens.device))
            with torch.cuda.stream(side):
                self._warm_up_step()
            torch.cuda.current_stream(self.tokens.device).wait_stream(side)
            self.eager_steps += 1
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self._step()  # recorded, not run
        self.graph = graph
        graph.replay()

    def _warm_up_step(self) -> None:
        """A step outside any graph; the first one compiles. A model Inductor cannot compile
        is decoded uncompiled (still one graph per step), with a warning."""
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the model still decodes
            if self._forward == self._model_logits:
                raise
            warnings.warn(
                f"torch.compile failed on the decode step, decoding uncompiled: {exc!r}"[:300],
                stacklevel=2,
            )
            self._forward = self._model_logits
            self._step()

    def close(self) -> None:
        self.graph = None
        self.cache.keys.clear()
        self.cache.values.clear()
