"""The resident merge engine: base + task vectors on the device, block merges in place.

A study's worker builds one :class:`MergeEngine` (loading base and experts once, shard by
shard) and calls :meth:`MergeEngine.merge` for every trial with the trial's per-block
parameters; merged tensors go straight into a :class:`MergeTarget` — the scorer's module
(:class:`ModuleTarget`) or a callback such as vLLM's ``reload_weights`` (:class:`CallbackTarget`).
Only blocks whose parameters changed since the last merge into the same target are re-merged.

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
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from mergeopt.blocks import BlockLayout
from mergeopt.checkpoints import (
    Checkpoint,
    CheckpointReader,
    available_host_bytes,
    check_mergeable,
    iter_shards,
)
from mergeopt.errors import UserError
from mergeopt.merge.methods import (
    SPARSIFY_MAGNITUDE,
    SPARSIFY_OUTLIERS,
    MethodSpec,
    PendingMagnitudeMasks,
    fast_merge_block,
    fast_merge_tensor,
    get_method,
    merge_tensor,
    start_magnitude_masks,
)

if TYPE_CHECKING:
    from mergeopt.genome import BlockParams  # genome imports optuna: type-only here

NamedTensors = list[tuple[str, torch.Tensor]]


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


_StartedMasks = tuple[list[str], PendingMagnitudeMasks]
"""A block's weight names and their experts' magnitude masks, started together."""


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
    spec = get_method(method)
    resident_models = {"gta": 1 + num_experts, "linear": num_experts, "slerp": 2}[spec.kind]
    scratch = largest_block_parameters + (2 * num_experts + 3) * largest_tensor_parameters
    thresholds = {SPARSIFY_MAGNITUDE: 1, SPARSIFY_OUTLIERS: 2}.get(spec.sparsification or "", 0)
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


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed for one tensor: the trial seed plus a stable offset of its name."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


class MergeEngine:
    """Base and experts resident on a device; merges per block into targets.

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
        try:
            self.spec: MethodSpec = get_method(method)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.method_params = dict(method_params or {})
        unknown = sorted(set(self.method_params) - set(self.spec.global_defaults))
        if unknown:
            raise UserError(
                f"merge method {method}: unknown parameter {unknown[0]!r} "
                f"(method-level parameters: {', '.join(self.spec.global_defaults) or 'none'})"
            )
        if not experts:
            raise UserError("a merge needs at least one expert model")
        if self.spec.kind == "slerp" and len(experts) != 1:
            raise UserError(f"slerp merges the base with exactly one expert, got {len(experts)}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.exact = self.device.type == "cpu" if exact is None else exact
        self.layout = layout
        self.base_checkpoint = Checkpoint(path=Path(base))
        self.expert_checkpoints = [Checkpoint(path=Path(p)) for p in experts]
        names = check_mergeable(self.base_checkpoint, self.expert_checkpoints)
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

    # -- loading ---------------------------------------------------------------------------

    def _numel(self, name: str) -> int:
        count = 1
        for size in self.base_checkpoint.shapes[name]:
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
            method=self.spec.name,
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
        """Read every tensor once, shard by shard; one tensor per model in host RAM at a time."""
        started = time.perf_counter()
        checkpoints = [self.base_checkpoint, *self.expert_checkpoints]
        with CheckpointReader(checkpoints) as reader:
            for shard, shard_names in iter_shards(self.base_checkpoint):
                for name in shard_names:
                    base = reader.read(0, name, dtype=self.dtype, device=self.device)
                    if not base.is_floating_point():
                        self._base[name] = base
                        continue
                    stack = torch.empty(
                        (self.num_experts, *base.shape), dtype=self.dtype, device=self.device
                    )
                    for index in range(self.num_experts):
                        stack[index] = reader.read(
                            index + 1, name, dtype=self.dtype, device=self.device
                        )
                    if self.spec.kind == "gta":
                        stack -= base
                    if self.spec.kind != "linear":
                        self._base[name] = base
                    self._stack[name] = stack
                if progress:
                    print(
                        f"mergeopt: loaded {shard.name} ({time.perf_counter() - started:.1f} s)",
                        file=sys.stderr,
                    )

    # -- merging ---------------------------------------------------------------------------

    def set_method(
        self, method: str, method_params: Mapping[str, float | bool] | None = None
    ) -> None:
        """Switch to another method that uses the same resident tensors (any two of the
        task-vector methods) without reloading; the next merge rewrites every block."""
        try:
            spec = get_method(method)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if spec.kind != self.spec.kind:
            raise UserError(
                f"merge method {method} needs {spec.kind} inputs, this engine holds "
                f"{self.spec.kind} inputs; build a new engine"
            )
        params = dict(method_params or {})
        unknown = sorted(set(params) - set(spec.global_defaults))
        if unknown:
            raise UserError(f"merge method {method}: unknown parameter {unknown[0]!r}")
        self.spec = spec
        self.method_params = params
        self._merged.clear()

    def _validate(self, block_params: BlockParams) -> None:
        if len(block_params) != self.layout.num_blocks:
            raise ValueError(
                f"expected parameters for {self.layout.num_blocks} blocks, got {len(block_params)}"
            )
        allowed = set(self.spec.expert_defaults) | ({"t"} if self.spec.kind == "slerp" else set())
        for block, experts in enumerate(block_params):
            if len(experts) != self.num_experts:
                raise ValueError(
                    f"block {block}: expected {self.num_experts} experts, got {len(experts)}"
                )
            for expert, values in enumerate(experts):
                unknown = set(values) - allowed
                if unknown:
                    raise ValueError(
                        f"block {block} expert {expert}: {self.spec.name} has no per-expert "
                        f"parameter {sorted(unknown)[0]!r}"
                    )
                for name, default in self.spec.expert_defaults.items():
                    if default is None and name not in values:
                        raise ValueError(f"block {block} expert {expert}: {name!r} is required")

    def _block_magnitude_masks(
        self, block: int, experts: Sequence[Mapping[str, float]]
    ) -> _StartedMasks | None:
        """Every expert's magnitude mask (TIES, breadcrumbs) of every tensor of ``block``,
        started together: one host sync for the block instead of one per tensor (see
        :class:`PendingMagnitudeMasks`). None for other methods (their masks need no host
        value)."""
        method = self.spec.sparsification
        if method not in (SPARSIFY_MAGNITUDE, SPARSIFY_OUTLIERS):
            return None
        params = [{**self.spec.expert_defaults, **values} for values in experts]
        names = [name for name in self.block_names[block] if name in self._stack]
        items = [
            (self._stack[name][index], float(p["density"]), float(p.get("gamma") or 0.0))  # type: ignore[arg-type]
            for name in names
            for index, p in enumerate(params)
        ]
        outs = None
        if self.device.type == "cuda":
            # the fused path writes each expert's mask into a row of one N x shape tensor per
            # weight, which the fused merge then reads as it is (no stacking copy)
            stacked = {
                name: torch.empty(self._stack[name].shape, dtype=torch.bool, device=self.device)
                for name in names
            }
            outs = [stacked[name][index] for name in names for index in range(len(params))]
        return names, start_magnitude_masks(method, items, outs=outs)

    @staticmethod
    def _masks_by_name(
        started: _StartedMasks | None, count: int
    ) -> dict[str, list[torch.Tensor | None]]:
        if started is None:
            return {}
        names, pending = started
        found = pending.masks()
        return {name: found[i * count : (i + 1) * count] for i, name in enumerate(names)}

    def _fast_block(
        self, block: int, experts: Sequence[Mapping[str, float]], target: MergeTarget | None
    ) -> NamedTensors | None:
        """A weighted-sum block in one kernel launch, straight into the target's storage
        where it allows; None where that path does not apply."""
        names = self.block_names[block]
        items = []
        for name in names:
            stack = self._stack.get(name)
            if stack is None:
                continue
            out = _destination(target, name, stack[0]) if target is not None else None
            items.append((self._base.get(name), stack, out))
        merged = fast_merge_block(
            self.spec, items=items, expert_params=experts, method_params=self.method_params
        )
        if merged is None:
            return None
        found = iter(merged)
        return [(name, next(found) if name in self._stack else self._base[name]) for name in names]

    def merge_block_tensors(
        self,
        block: int,
        experts: Sequence[Mapping[str, float]],
        *,
        seed: int = 0,
        target: MergeTarget | None = None,
    ) -> NamedTensors:
        """The merged tensors of one block: new tensors on the engine's device, or the
        target's own storage where the fast path wrote into it directly."""
        merged, started = self._merge_block(block, experts, seed=seed, target=target)
        if started is not None and started[1].finish():
            merged = self._merge_block_with(block, experts, seed, target, started)
        return merged

    def _merge_block(
        self,
        block: int,
        experts: Sequence[Mapping[str, float]],
        *,
        seed: int,
        target: MergeTarget | None,
    ) -> tuple[NamedTensors, _StartedMasks | None]:
        """One block's merge, launched, and the block's magnitude masks (their host sync may
        still be to come: a miss found by it means merging again with the redone masks)."""
        if not self.exact:
            fast_block = self._fast_block(block, experts, target)
            if fast_block is not None:
                return fast_block, None
        started = self._block_magnitude_masks(block, experts)
        if started is None:
            return self._merge_block_with(block, experts, seed, target, None), None
        if not started[1].ready:
            started[1].finish()  # the torch path's masks need the sync first
        return self._merge_block_with(block, experts, seed, target, started), started

    def _merge_block_with(
        self,
        block: int,
        experts: Sequence[Mapping[str, float]],
        seed: int,
        target: MergeTarget | None,
        started: _StartedMasks | None,
    ) -> NamedTensors:
        block_masks = self._masks_by_name(started, len(experts))
        merged: NamedTensors = []
        for name in self.block_names[block]:
            stack = self._stack.get(name)
            if stack is None:  # a non-floating buffer: the base's value
                merged.append((name, self._base[name]))
                continue
            out = None
            if not self.exact:
                out = _destination(target, name, stack[0]) if target is not None else None
                fast = fast_merge_tensor(
                    self.spec,
                    base=self._base.get(name),
                    stack=stack,
                    expert_params=experts,
                    method_params=self.method_params,
                    out=out,
                )
                if fast is not None:
                    merged.append((name, fast))
                    continue
            generator = None
            if self.spec.randomized:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(tensor_seed(seed, name))
            merged.append(
                (
                    name,
                    merge_tensor(
                        self.spec,
                        base=self._base.get(name),
                        stack=stack,
                        expert_params=experts,
                        method_params=self.method_params,
                        generator=generator,
                        masks=block_masks.get(name),
                        out=out,
                    ),
                )
            )
        return merged

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
        # A block's top-k windows are checked (one host sync) after the next block is
        # launched, so the GPU never waits for the host; a window that missed (rare) merges
        # its block again with the redone masks. At most two blocks of masks are alive.
        unchecked: tuple[int, Sequence[Mapping[str, float]], _StartedMasks] | None = None
        for block, experts in enumerate(block_params):
            key: object = (_params_key(experts), seed if self.spec.randomized else None)
            current.append(key)
            if previous[block] == key:
                continue
            tensors, masks = self._merge_block(block, experts, seed=seed, target=target)
            target.write(tensors)
            if unchecked is not None:
                self._check_block(*unchecked, seed=seed, target=target)
            unchecked = (block, experts, masks) if masks is not None else None
            blocks_merged += 1
            tensors_written += len(tensors)
        if unchecked is not None:
            self._check_block(*unchecked, seed=seed, target=target)
        self._merged[target] = current
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MergeStats(
            blocks_merged=blocks_merged,
            tensors_written=tensors_written,
            seconds=time.perf_counter() - started,
        )

    def _check_block(
        self,
        block: int,
        experts: Sequence[Mapping[str, float]],
        started: _StartedMasks,
        *,
        seed: int,
        target: MergeTarget,
    ) -> None:
        if started[1].finish():
            target.write(self._merge_block_with(block, experts, seed, target, started))

    def forget(self, target: MergeTarget) -> None:
        """Make the next merge into ``target`` write every block (e.g. after it was reloaded)."""
        self._merged.pop(target, None)
