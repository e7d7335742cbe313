"""The resident merge engine: base + task vectors on the device, block merges in place.

A study's worker builds one :class:`MergeEngine` (loading base and experts once, shard by
shard) and calls :meth:`MergeEngine.merge` for every trial with the trial's per-block
parameters; merged tensors go straight into a :class:`MergeTarget` — the scorer's module
(:class:`ModuleTarget`) or a callback such as vLLM's ``reload_weights`` (:class:`CallbackTarget`).
Only blocks whose parameters changed since the last merge into the same target are re-merged.
How a block is merged (which kernels, where masks come from) is the engine's
:class:`~mergeopt.merge.plan.MergePlan`, built with it.

Device memory (see :func:`required_bytes`): the engine keeps the base and N task vectors in the
engine dtype — ``(1 + N)·P`` elements for a model of P parameters (``N·P`` for ``linear``,
``2·P`` for ``slerp``) — plus, while merging, one block of merged tensors and the scratch of
its largest tensor (``(2N + 3)`` copies of it); TIES and breadcrumbs add a block's selection
scratch (``N·P_block·(b + 2t)`` bytes for t thresholds). The target model (P elements in its
own dtype) comes on top when it lives on the same device.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mergeopt.blocks import BlockLayout
from mergeopt.checkpoints import (
    Checkpoint,
    CheckpointReader,
    available_host_bytes,
    merge_shapes,
)
from mergeopt.errors import UserError
from mergeopt.merge.methods import MergeMethod, get_method
from mergeopt.merge.plan import BlockMerge, BlockTensor, MergePlan, NamedTensors

BlockParams = Sequence[Sequence[Mapping[str, float]]]
"""``block_params[block][expert]`` -> that expert's per-expert parameters in that block (what
``genome.Genome.block_params`` makes; merge sits below genome and names the shape itself)."""


@runtime_checkable
class MergeTarget(Protocol):
    """Receives merged tensors by Hugging Face name, one block at a time."""

    def write(self, tensors: NamedTensors) -> None: ...


def _destination(target: MergeTarget, name: str, like: torch.Tensor) -> torch.Tensor | None:
    """The target's own storage for ``name`` when the engine may write straight into it."""
    destination = getattr(target, "destination", None)
    if destination is None:
        return None
    slot = destination(name)
    if (
        slot is None
        or slot.shape != like.shape
        or slot.dtype != like.dtype
        or slot.device != like.device
        or not slot.is_contiguous()
    ):
        return None
    return slot


class ModuleTarget:
    """Writes merged tensors in place into a module's parameters and buffers by HF name.

    Tied embeddings need nothing special: when ``lm_head`` shares its Parameter with
    ``embed_tokens``, writing the embeddings updates both; an ``lm_head.weight`` that the
    checkpoint stores separately is written to the (shared or own) Parameter as well.
    """

    def __init__(self, *, module: torch.nn.Module) -> None:
        self.module = module
        self._slots: dict[str, torch.Tensor] = {
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }

    def destination(self, name: str) -> torch.Tensor | None:
        """The parameter's own storage (the engine writes there directly when it can)."""
        slot = self._slots.get(name)
        return None if slot is None else slot.data

    def write(self, tensors: NamedTensors) -> None:
        with torch.no_grad():
            for name, tensor in tensors:
                slot = self._slots.get(name)
                if slot is None:
                    raise UserError(f"the target model has no parameter {name}")
                if slot.data_ptr() != tensor.data_ptr():  # not already written in place
                    slot.copy_(tensor)


class CallbackTarget:
    """Calls ``fn([(hf_name, tensor), ...])`` once per merged block (e.g. vLLM's
    ``collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})``). The tensors
    are the engine's scratch: copy them if they must outlive the call."""

    def __init__(self, *, fn: Callable[[NamedTensors], None]) -> None:
        self.fn = fn

    def write(self, tensors: NamedTensors) -> None:
        self.fn(tensors)


@dataclass(frozen=True)
class MergeStats:
    blocks_merged: int
    tensors_written: int
    seconds: float


def bytes_per_element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def required_bytes(
    *,
    num_parameters: int,
    num_experts: int,
    dtype: torch.dtype,
    largest_block_parameters: int,
    largest_tensor_parameters: int,
    method: str = "ties",
) -> int:
    """Device bytes the engine needs: resident models + one block of output + tensor scratch
    (+ for TIES/breadcrumbs, a block's selection scratch, alive until the block's one host
    sync: per expert and element, the magnitude key and two bool masks per threshold)."""
    size = bytes_per_element(dtype)
    merge_method = get_method(method)
    resident_models = merge_method.resident_models(num_experts)
    scratch = largest_block_parameters + (2 * num_experts + 3) * largest_tensor_parameters
    thresholds = merge_method.selection_thresholds
    selection = (
        num_experts * largest_block_parameters * (size + 2 * thresholds) if thresholds else 0
    )
    return size * (resident_models * num_parameters + scratch) + selection


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_bytes()


def _params_key(block: Sequence[Mapping[str, float | bool]]) -> tuple[object, ...]:
    return tuple(tuple(sorted((k, float(v)) for k, v in expert.items())) for expert in block)


class MergeEngine:
    """Base and experts resident on a device; merges per block into targets.

    At construction (and :meth:`set_method`) the engine builds its :class:`MergePlan`: the
    route every block merge of this method on this device takes (see
    :mod:`mergeopt.merge.plan`); :meth:`merge` calls it once per changed block.

    Args:
        base: the base model folder (safetensors).
        experts: fine-tuned model folders with the base's architecture.
        layout: which layers form which block (the last block: embeddings, norm, head).
        method: a mergekit method name (``mergeopt.merge.methods.METHODS``).
        method_params: method-level parameters (normalize, rescale, lambda, int8_mask, t).
        device: where base and task vectors live and merges run.
        dtype: the dtype of the resident tensors and of the merge arithmetic.
        progress: print loading progress to stderr.
        exact: follow mergekit's operation order for task_arithmetic and linear (bit-identical
            results); False uses one fused pass written straight into the target (GPU speed;
            bf16 results within one unit in the last place). Default: exact on the CPU only.

    Raises:
        UserError: models do not fit together, the layout does not fit the model, a method
            parameter is unknown, or the device lacks memory (the message gives the figure).
    """

    def __init__(
        self,
        *,
        base: Path,
        experts: Sequence[Path],
        layout: BlockLayout,
        method: str,
        method_params: Mapping[str, float | bool] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        exact: bool | None = None,
    ) -> None:
        self.merge_method: MergeMethod = get_method(method, "method")
        self.method_params = dict(method_params or {})
        self.merge_method.check_method_params(self.method_params, "method_params")
        self.merge_method.check_experts(len(experts), "experts")
        self.device = torch.device(device)
        self.dtype = dtype
        self.plan = MergePlan.build(
            self.merge_method,
            device=self.device,
            dtype=dtype,
            exact=self.device.type == "cpu" if exact is None else exact,
        )
        self.layout = layout
        self.base_checkpoint = Checkpoint(path=Path(base))
        self.expert_checkpoints = [Checkpoint(path=Path(p)) for p in experts]
        self.shapes = merge_shapes(self.base_checkpoint, self.expert_checkpoints)
        names = list(self.shapes)
        if self.base_checkpoint.num_layers != layout.num_layers:
            raise UserError(
                f"block layout has {layout.num_layers} layers, model "
                f"{self.base_checkpoint.path} has {self.base_checkpoint.num_layers}"
            )
        self.block_names: list[list[str]] = [[] for _ in range(layout.num_blocks)]
        for name in names:
            self.block_names[layout.block_of_tensor(name)].append(name)
        self.num_experts = len(experts)
        self._check_memory(names)
        self._base: dict[str, torch.Tensor] = {}
        self._stack: dict[str, torch.Tensor] = {}
        self._load(progress)
        self._merged: weakref.WeakKeyDictionary[object, list[object]] = weakref.WeakKeyDictionary()

    @property
    def exact(self) -> bool:
        """Whether weighted sums follow mergekit's operation order (see the class)."""
        return not self.plan.in_place

    # -- loading ---------------------------------------------------------------------------

    def _numel(self, name: str) -> int:
        count = 1
        for size in self.shapes[name]:
            count *= size
        return count

    def _check_memory(self, names: list[str]) -> None:
        block_sizes = [sum(self._numel(n) for n in block) for block in self.block_names]
        needed = required_bytes(
            num_parameters=sum(self._numel(n) for n in names),
            num_experts=self.num_experts,
            dtype=self.dtype,
            largest_block_parameters=max(block_sizes),
            largest_tensor_parameters=max(self._numel(n) for n in names),
            method=self.merge_method.name,
        )
        self.required_bytes = needed
        free = _free_bytes(self.device)
        if needed > free:
            raise UserError(
                f"merge engine needs {_gib(needed)} on {self.device} (base + "
                f"{self.num_experts} task vectors in {str(self.dtype).removeprefix('torch.')} "
                f"+ one block of scratch), only {_gib(free)} is free"
            )

    def _load(self, progress: bool) -> None:
        """Read every tensor once, shard by shard of the base (tensors it lacks last: a
        classifier's head); one tensor per model in host RAM at a time."""
        started = time.perf_counter()
        checkpoints = [self.base_checkpoint, *self.expert_checkpoints]
        groups: dict[str, list[str]] = {}
        for name in self.shapes:
            shard = self.base_checkpoint.shard_of.get(name)
            groups.setdefault(shard.name if shard else "the experts' own tensors", []).append(name)
        with CheckpointReader(checkpoints) as reader:
            for group, group_names in groups.items():
                for name in group_names:
                    shape = self.shapes[name]
                    base = reader.read_fitted(0, name, shape, dtype=self.dtype, device=self.device)
                    if not base.is_floating_point():
                        self._base[name] = base
                        continue
                    stack = torch.empty(
                        (self.num_experts, *base.shape), dtype=self.dtype, device=self.device
                    )
                    for index in range(self.num_experts):
                        stack[index] = reader.read_fitted(
                            index + 1, name, shape, dtype=self.dtype, device=self.device
                        )
                    if self.merge_method.task_vectors:
                        stack -= base
                    if self.merge_method.base_input:
                        self._base[name] = base
                    self._stack[name] = stack
                if progress:
                    print(
                        f"mergeopt: loaded {group} ({time.perf_counter() - started:.1f} s)",
                        file=sys.stderr,
                    )

    # -- merging ---------------------------------------------------------------------------

    def set_method(
        self,
        method: str,
        method_params: Mapping[str, float | bool] | None = None,
        *,
        exact: bool | None = None,
    ) -> None:
        """Switch to another method that uses the same resident tensors (any two of the
        task-vector methods) without reloading, and plan it anew (reading the environment
        switches again; ``exact``: None keeps the current choice); the next merge rewrites
        every block."""
        merge_method = get_method(method, "method")
        if merge_method.resident != self.merge_method.resident:
            raise UserError(
                f"merge method {method} needs other resident inputs than {self.merge_method.name} "
                f"(task vectors, base: {merge_method.resident} vs {self.merge_method.resident}); "
                "build a new engine"
            )
        params = dict(method_params or {})
        merge_method.check_method_params(params, "method_params")
        self.merge_method = merge_method
        self.method_params = params
        self.plan = MergePlan.build(
            merge_method,
            device=self.device,
            dtype=self.dtype,
            exact=self.exact if exact is None else exact,
        )
        self._merged.clear()

    def _validate(self, block_params: BlockParams) -> None:
        if len(block_params) != self.layout.num_blocks:
            raise ValueError(
                f"expected parameters for {self.layout.num_blocks} blocks, got {len(block_params)}"
            )
        for block, experts in enumerate(block_params):
            if len(experts) != self.num_experts:
                raise ValueError(
                    f"block {block}: expected {self.num_experts} experts, got {len(experts)}"
                )
            for expert, values in enumerate(experts):
                self.merge_method.check_expert_params(values, f"block {block} expert {expert}")

    def _inputs(self, block: int, target: MergeTarget | None) -> list[BlockTensor]:
        """The block's tensors as the plan takes them, with the target's own storage where
        the plan may write results in place."""
        in_place = target is not None and self.plan.in_place
        inputs: list[BlockTensor] = []
        for name in self.block_names[block]:
            stack = self._stack.get(name)
            out = None
            if in_place and stack is not None:
                assert target is not None
                out = _destination(target, name, stack[0])
            inputs.append((name, self._base.get(name), stack, out))
        return inputs

    def merge(self, block_params: BlockParams, *, target: MergeTarget, seed: int = 0) -> MergeStats:
        """Merge every block whose parameters (or, for random methods, seed) changed since the
        last merge into ``target``, and write its tensors there.

        Args:
            block_params: ``block_params[block][expert]`` -> ``{"weight": .., "density": ..}``.
            target: where merged tensors go.
            seed: seeds the masks of randomized methods (same seed, same device -> same merge).
        """
        self._validate(block_params)
        started = time.perf_counter()
        previous = self._merged.get(target) or [None] * self.layout.num_blocks
        current: list[object] = []
        blocks_merged = tensors_written = 0
        randomized = self.plan.randomized
        # A block's top-k windows are checked (one host sync) after the next block is
        # launched, so the GPU never waits for the host; a window that missed (rare) merges
        # its block again with the redone masks. At most two blocks of masks are alive.
        unchecked: BlockMerge | None = None
        for block, experts in enumerate(block_params):
            key: object = (_params_key(experts), seed if randomized else None)
            current.append(key)
            if previous[block] == key:
                continue
            merged = self.plan.merge_block(
                self._inputs(block, target), experts, self.method_params, seed=seed
            )
            target.write(merged.tensors)
            if unchecked is not None:
                _write_checked(unchecked, target)
            unchecked = None if merged.checked else merged
            blocks_merged += 1
            tensors_written += len(merged.tensors)
        if unchecked is not None:
            _write_checked(unchecked, target)
        self._merged[target] = current
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MergeStats(
            blocks_merged=blocks_merged,
            tensors_written=tensors_written,
            seconds=time.perf_counter() - started,
        )

    def forget(self, target: MergeTarget) -> None:
        """Make the next merge into ``target`` write every block (e.g. after it was reloaded)."""
        self._merged.pop(target, None)


def _write_checked(merged: BlockMerge, target: MergeTarget) -> None:
    """A block's deferred top-k check; the block again into ``target`` where it missed."""
    redone = merged.check()
    if redone is not None:
        target.write(redone)
