"""The route of a merge, decided once: :class:`MergePlan`.

A plan is built for one method, device and dtype (the engine builds one when it is made and
when its method changes; a mergekit config's run builds one per dtype). It decides, from the
method's facts, the device, Triton's presence and the environment switches (read once, here; see
:mod:`mergeopt.merge.backend`):

- the weighted-sum fast path (task_arithmetic, linear; not ``exact``): one rounding, written
  into the target, one Triton launch per block (``block_launch``) or one per tensor, or
  ``addmm`` without Triton;
- the fused GTA kernel (every task-vector method on CUDA): masks, L1 norms, consensus and
  weights in one pass, rounding where mergekit's torch operations round;
- the fused pair passes (slerp, and Karcher, Multi-SLERP and Model Stock of two models, on
  CUDA, not ``exact``): a block's sums in one launch, the method's coefficients from them,
  its results in another launch (a value may differ from the torch path's: slerp and Model
  Stock in the last place, Karcher and Multi-SLERP closer to the exact merge than mergekit's
  operations in the tensors' dtype);
- SCE (``select_topk`` 1, CUDA, not ``exact``) in the fused GTA kernel, its weights computed
  from the task vectors on the device (no host sync);
- where masks come from: a block's magnitude top-k together, one host sync per block (by the
  Triton passes for 16-bit tensors on CUDA: ``select``), DARE's drawn inside the kernels
  (``draws``), others by torch;
- otherwise the method's reference math (``MergeMethod.math``).

The engine calls :meth:`MergePlan.merge_block` once per block and :meth:`BlockMerge.check`
when the block's top-k windows are to be checked; a mergekit config's run calls
:meth:`MergePlan.merge_tensor`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from mergeopt.merge.backend import Switches, triton_on
from mergeopt.merge.methods import MergeMethod, TensorMerge
from mergeopt.merge.selection import PendingTopMasks, start_top_magnitude_masks
from mergeopt.merge.sparsification import (
    SPARSIFY_RANDOM,
    _coefficients,
    _stack_masks,
    expert_masks,
    magnitude_requests,
)
from mergeopt.merge.weighted_sum import ExpertParams, MethodParams, WeightedSum

NamedTensors = list[tuple[str, torch.Tensor]]

BlockTensor = tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""One tensor of a block: (name, base, stack, out). ``base`` is None for methods without one;
``stack`` (N x shape) is None for a non-floating buffer, whose ``base`` value is the result;
``out`` is the target's own storage the result may be written into, or None."""

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed for one tensor: the trial seed plus a stable offset of its name.

    Not ``seeds.derive_seed``: its multiplier differs, so switching would change the masks of
    every random merge (dare_*, della*) of existing studies and exported ``--seed`` replays."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def _kernel_seed(generator: torch.Generator | None) -> int:
    """The Philox seed of in-kernel draws: the generator's seed (the plan seeds one per
    tensor from the trial), else a fresh one from torch's default generator."""
    if generator is not None:
        return generator.initial_seed() & (2**63 - 1)
    return int(torch.randint(0, 2**62, (1,)).item())


def _select_kernels(
    device: torch.device, dtype: torch.dtype, switches: Switches
) -> ModuleType | None:
    """The Triton top-k passes when they take this device's tensors (CUDA, 16-bit floats,
    ``MERGEOPT_FUSED_SELECT`` on); the kernel tests replace this to run them on the CPU."""
    if not switches.select or dtype not in _SIXTEEN_BIT:
        return None
    return triton_on(device, switches, dtype)


def fused_weighted_sum(
    stack: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kernels: ModuleType | None = None,
) -> torch.Tensor:
    """``base + scale · Σ_i c_i·stack[i]`` (``base`` optional) in one pass over the inputs.

    ``stack`` is N x shape, ``coefficients`` N values in its dtype on its device. With
    ``kernels`` one Triton pass; else a (1 x N)·(N x numel) matrix product (``addmm``). Both
    read each input once, accumulate in fp32 and round once — the engine's fast path for
    task_arithmetic and linear (a bf16 result may differ from mergekit's op-by-op rounding by
    one unit in the last place). ``out`` (shape of one tensor) receives it.
    """
    count = stack.shape[0]
    shape = stack.shape[1:]
    if kernels is not None:
        target_tensor = (
            out if out is not None else torch.empty(shape, dtype=stack.dtype, device=stack.device)
        )
        return kernels.weighted_sum(
            stack, coefficients, scale=scale, base=base, out=target_tensor
        ).view(shape)
    matrix = stack.reshape(count, -1)
    row = coefficients.view(1, -1)
    target = out.view(1, -1) if out is not None else None
    if base is None:
        result = torch.mm(row, matrix, out=target) if scale == 1 else None
        if result is None:
            result = torch.addmm(matrix[:1], row, matrix, beta=0, alpha=scale, out=target)
    else:
        result = torch.addmm(base.reshape(1, -1), row, matrix, alpha=scale, out=target)
    return result.view(shape)


@dataclass(frozen=True)
class _BlockMasks:
    """A block's magnitude masks, started together: the weights' names, each item's
    request (None: keeps all; items are name-major, expert-minor) and the pending top-k."""

    names: list[str]
    slots: list[int | None]
    pending: PendingTopMasks

    def by_name(self, count: int) -> dict[str, list[torch.Tensor | None]]:
        found = [None if slot is None else self.pending.masks[slot][0] for slot in self.slots]
        return {name: found[i * count : (i + 1) * count] for i, name in enumerate(self.names)}


@dataclass(frozen=True, eq=False)
class MergePlan:
    """How merges of one method run on one device in one dtype (see the module docstring).

    Build it with :meth:`build`; the fields say what it decided.

    Attributes:
        method: the merge method.
        device, dtype: of the resident tensors and the merge arithmetic.
        weighted_sum: the method's weighted-sum form when the one-rounding fast path runs it
            (not ``exact``), else None.
        kernels: the Triton kernels module for this device and dtype, or None (torch).
        block_launch: a weighted-sum block in one Triton launch.
        gta: the Triton module when the fused GTA kernel merges this method, else None.
        pair: the Triton module when the fused pair passes merge this method, else None.
        data_weighted: the Triton module when the fused GTA kernel merges this method with
            weights from the task vectors (SCE), else None.
        fused: the Triton module when the method's own fused route (``fused_math``) merges
            it, else None.
        select: the Triton module when magnitude top-k runs in its passes, else None.
        block_masks: magnitude masks are made per block, with one host sync.
        mask_rows: those masks are written into one N x shape tensor per weight (CUDA), which
            the fused kernel reads without a copy.
        draws: DARE's masks are drawn inside the kernels, never stored.
        fused_l1: the rescale's L1 norms in one Triton pass, without a masked copy.
        in_place: results may be written straight into the target's storage.
        randomized, uses_base, expert_defaults, global_defaults: the method's facts, copied
            here so that a block merge reads fields instead of calling into the method.
    """

    method: MergeMethod
    device: torch.device
    dtype: torch.dtype
    weighted_sum: WeightedSum | None
    kernels: ModuleType | None
    block_launch: bool
    gta: ModuleType | None
    pair: ModuleType | None
    data_weighted: ModuleType | None
    fused: ModuleType | None
    select: ModuleType | None
    block_masks: bool
    mask_rows: bool
    draws: bool
    fused_l1: bool
    in_place: bool
    randomized: bool
    uses_base: bool
    expert_defaults: Mapping[str, float | None]
    global_defaults: Mapping[str, float | bool]

    @classmethod
    def build(
        cls,
        method: MergeMethod,
        *,
        device: torch.device,
        dtype: torch.dtype,
        exact: bool,
        switches: Switches | None = None,
    ) -> MergePlan:
        """The plan for ``method`` on ``device`` in ``dtype``. ``exact``: mergekit's
        operation order for weighted sums too (bit-identical; no one-rounding fast path).
        ``switches``: default :meth:`Switches.from_env` (read now, once)."""
        switches = Switches.from_env() if switches is None else switches
        kernels = triton_on(device, switches, dtype)
        weighted_sum = None if exact else method.weighted_sum
        magnitude = method.selection_thresholds > 0
        return cls(
            method=method,
            device=device,
            dtype=dtype,
            weighted_sum=weighted_sum,
            kernels=kernels,
            block_launch=weighted_sum is not None and kernels is not None and switches.block,
            gta=kernels if method.fused_gta else None,
            pair=kernels if method.fused_pair is not None and not exact else None,
            data_weighted=kernels if method.fused_data_weighted is not None and not exact else None,
            fused=kernels if method.fused_math is not None and not exact else None,
            select=_select_kernels(device, dtype, switches) if magnitude else None,
            block_masks=magnitude,
            mask_rows=device.type == "cuda",
            draws=kernels is not None
            and switches.draws
            and method.sparsification == SPARSIFY_RANDOM,
            fused_l1=switches.l1,
            in_place=not exact,
            randomized=method.randomized,
            uses_base=method.base_input,
            expert_defaults=dict(method.expert_defaults),
            global_defaults=dict(method.global_defaults),
        )

    def _with_defaults(
        self, expert_params: ExpertParams, method_params: MethodParams
    ) -> tuple[list[dict[str, float]], dict[str, float | bool]]:
        experts = [{**self.expert_defaults, **values} for values in expert_params]
        return experts, {**self.global_defaults, **method_params}  # type: ignore[return-value]

    # -- one block (the engine) ------------------------------------------------------------

    def merge_block(
        self,
        tensors: Sequence[BlockTensor],
        expert_params: ExpertParams,
        method_params: MethodParams,
        *,
        seed: int,
    ) -> BlockMerge:
        """One block's merge, launched: its tensors in the order given (the target's own
        storage where a result went there). Magnitude masks whose host sync is still to
        come (the Triton path's) are checked by :meth:`BlockMerge.check`."""
        experts, params = self._with_defaults(expert_params, method_params)
        if self.weighted_sum is not None:
            return BlockMerge(self._weighted_sums(tensors, experts, params))
        if self.pair is not None:
            return BlockMerge(self._pairs(tensors, experts, params))
        masks = self._start_masks(tensors, experts) if self.block_masks else None
        deferred = masks is not None and masks.pending.ready
        if masks is not None and not deferred:
            masks.pending.finish()  # the torch path's masks need the sync first
        merged = self._merge_tensors(tensors, experts, params, seed, masks)
        if not deferred:
            return BlockMerge(merged)
        assert masks is not None
        return BlockMerge(merged, (self, tensors, experts, params, seed, masks))

    def _weighted_sums(
        self,
        tensors: Sequence[BlockTensor],
        experts: ExpertParams,
        params: MethodParams,
    ) -> NamedTensors:
        assert self.weighted_sum is not None
        coefficients, scale = self.weighted_sum(experts, params, self.dtype, self.device)
        floating = [(base, stack, out) for _, base, stack, out in tensors if stack is not None]
        if self.block_launch and floating:
            assert self.kernels is not None
            merged = [out if out is not None else torch.empty_like(s[0]) for _, s, out in floating]
            self.kernels.weighted_sum_many(
                [
                    (base if self.uses_base else None, stack, result)
                    for (base, stack, _), result in zip(floating, merged, strict=True)
                ],
                coefficients,
                scale=scale,
            )
        else:
            merged = [
                self._fused_sum(base, stack, coefficients, scale, out)
                for base, stack, out in floating
            ]
        found = iter(merged)
        named: NamedTensors = []
        for name, base, stack, _ in tensors:
            if stack is None:
                assert base is not None
                named.append((name, base))
            else:
                named.append((name, next(found)))
        return named

    def _pairs(
        self, tensors: Sequence[BlockTensor], experts: ExpertParams, params: MethodParams
    ) -> NamedTensors:
        """A block's pair merges (``MergeMethod.fused_pair``) in the fused passes: the sums of
        all its tensors in one launch, the coefficients by the method's rule, the results in
        another launch; an empty or strided tensor, or not two models, by the torch path."""
        kernels, pair = self.pair, self.method.fused_pair
        assert kernels is not None and pair is not None
        named: NamedTensors = []
        fused: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        applies = pair.applies(params)
        for name, base, stack, out in tensors:
            if stack is None:  # a non-floating buffer: the base's value
                assert base is not None
                named.append((name, base))
                continue
            if pair.around_base:  # the models around the base (none: around zero)
                operands, around = list(stack), base
            elif self.uses_base:
                assert base is not None
                operands, around = [base, stack[0]], None
            else:
                operands, around = list(stack), None
            read = operands if around is None else [*operands, around]
            if (
                not applies
                or len(operands) != 2
                or operands[0].numel() == 0
                or not kernels.supported([*read, out])
                or (bool(fused) and (fused[0][3] is None) != (around is None))  # one launch
            ):
                merged = self.method.math(self.method, TensorMerge(base, stack, experts, params))
                named.append((name, merged))
                continue
            result = out if out is not None else torch.empty_like(operands[0])
            fused.append((operands[0], operands[1], result, around))
            named.append((name, result))
        if fused:
            kernels.pair_combine(
                fused, pair.coefficients(kernels.pair_sums(fused), experts, params)
            )
        return named

    def _start_masks(self, tensors: Sequence[BlockTensor], experts: ExpertParams) -> _BlockMasks:
        """Every expert's magnitude mask (TIES, breadcrumbs) of every weight of the block,
        started together: one host sync for the block instead of one per tensor."""
        assert self.method.sparsification is not None
        names = [name for name, _, stack, _ in tensors if stack is not None]
        stacks = [stack for _, _, stack, _ in tensors if stack is not None]
        items = [
            (stack[index], float(p["density"]), float(p.get("gamma") or 0.0))
            for stack in stacks
            for index, p in enumerate(experts)
        ]
        outs: list[torch.Tensor | None] | None = None
        if self.mask_rows:
            # each expert's mask goes into a row of one N x shape tensor per weight, which
            # the fused merge then reads as it is (no stacking copy)
            rows = [torch.empty(s.shape, dtype=torch.bool, device=self.device) for s in stacks]
            outs = [row[index] for row in rows for index in range(len(experts))]
        requests, request_outs, slots, band = magnitude_requests(
            self.method.sparsification, items, outs
        )
        pending = start_top_magnitude_masks(
            requests, band=band, outs=request_outs, select=self.select
        )
        return _BlockMasks(names, slots, pending)

    def _merge_tensors(
        self,
        tensors: Sequence[BlockTensor],
        experts: ExpertParams,
        params: MethodParams,
        seed: int,
        masks: _BlockMasks | None,
    ) -> NamedTensors:
        block_masks = masks.by_name(len(experts)) if masks is not None else {}
        merged: NamedTensors = []
        for name, base, stack, out in tensors:
            if stack is None:  # a non-floating buffer: the base's value
                assert base is not None
                merged.append((name, base))
                continue
            generator = None
            if self.randomized:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(tensor_seed(seed, name))
            merged.append(
                (
                    name,
                    self._merge(
                        TensorMerge(base, stack, experts, params, generator, block_masks.get(name)),
                        out,
                    ),
                )
            )
        return merged

    # -- one tensor --------------------------------------------------------------------------

    def merge_tensor(
        self,
        base: torch.Tensor | None,
        stack: torch.Tensor,
        expert_params: ExpertParams,
        method_params: MethodParams,
        *,
        generator: torch.Generator | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One tensor's merge by this plan's route. ``stack`` is N x shape: task vectors or
        raw expert tensors (``method.task_vectors``; slerp: ``base`` is v0, ``stack[0]`` v1);
        ``masks``: sparsification masks made already; ``out``: where a fused result may go."""
        experts, params = self._with_defaults(expert_params, method_params)
        if self.weighted_sum is not None:
            coefficients, scale = self.weighted_sum(experts, params, self.dtype, self.device)
            return self._fused_sum(base, stack, coefficients, scale, out)
        if self.pair is not None:
            return self._pairs([("", base, stack, out)], experts, params)[0][1]
        return self._merge(TensorMerge(base, stack, experts, params, generator, masks), out)

    def _fused_sum(
        self,
        base: torch.Tensor | None,
        stack: torch.Tensor,
        coefficients: torch.Tensor,
        scale: float,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        base = base if self.uses_base else None
        return fused_weighted_sum(
            stack, coefficients, scale=scale, base=base, out=out, kernels=self.kernels
        )

    def _merge(self, inputs: TensorMerge, out: torch.Tensor | None) -> torch.Tensor:
        if self.gta is not None:
            return self._fused_gta(inputs, out)
        if self.fused is not None:
            assert self.method.fused_math is not None
            merged = self.method.fused_math(self.fused, inputs, out)
            if merged is not None:
                return merged
        rule = self.method.fused_data_weighted
        if (
            self.data_weighted is not None
            and rule is not None
            and rule.applies(inputs.method_params)
        ):
            return self._fused_data_weighted(inputs, out)
        return self.method.math(self.method, inputs)

    def _fused_data_weighted(self, inputs: TensorMerge, out: torch.Tensor | None) -> torch.Tensor:
        """SCE in the fused GTA kernel: the weights from the task vectors on the device, the
        sign elected on their unweighted sum, every element kept, the divisor floored; a
        tensor the kernel does not take (strided, empty) by the torch path."""
        kernels, rule = self.data_weighted, self.method.fused_data_weighted
        assert kernels is not None and rule is not None and inputs.base is not None
        base, task_vectors = inputs.base, inputs.stack
        if base.numel() == 0 or not kernels.supported([base, task_vectors, out]):
            return self.method.math(self.method, inputs)
        return kernels.gta_combine(
            base,
            task_vectors,
            None,
            None,
            rule.weights(task_vectors),
            consensus=True,
            normalize=True,
            lam=1.0,
            out=out,
            sign_of_sum=True,
            floor=rule.floor,
        )

    def _fused_gta(self, inputs: TensorMerge, out: torch.Tensor | None) -> torch.Tensor:
        """``methods.generalized_task_arithmetic`` in one Triton pass: masks made here unless
        given, then one kernel rounding where the torch path rounds. ``out``: where the kernel
        may write the result (the target's parameter, saving a copy)."""
        kernels = self.gta
        assert kernels is not None and inputs.base is not None
        base, task_vectors, masks = inputs.base, inputs.stack, inputs.masks
        experts, params, generator = inputs.expert_params, inputs.method_params, inputs.generator
        method = self.method
        count = len(experts)
        weights = _coefficients(
            tuple(float(values["weight"]) for values in experts),
            task_vectors.dtype,
            task_vectors.device,
        )
        draws = None
        if masks is not None:
            masks = list(masks)
        elif self.draws and all(0 < float(values["density"]) < 1 for values in experts):
            # DARE on the GPU: the kernels draw the masks themselves (no mask in memory, no
            # Bernoulli launches); the same seed on the same device gives the same merge
            densities = tuple(float(values["density"]) for values in experts)
            draws = kernels.DrawnMasks(
                seed=_kernel_seed(generator),
                densities=_coefficients(densities, torch.float32, base.device),
            )
            masks = [None] * count
        elif method.sparsification is not None:
            masks = expert_masks(
                method.sparsification, task_vectors, experts, generator, select=self.select
            )
        else:
            masks = [None] * count
        stacked = None if draws is not None else _stack_masks(masks, base)
        norms = None
        if bool(params["rescale"]) and (draws is not None or any(m is not None for m in masks)):
            # mergekit's L1 norms before and after masking, all experts at once; an expert
            # without a mask has equal norms, hence the factor 1 (exactly)
            if draws is not None or self.fused_l1:
                # one Triton pass over task vectors and masks, no masked copy
                norms = kernels.l1_norms(task_vectors, stacked, draws=draws)
            else:
                assert stacked is not None
                rows = task_vectors.view(count, -1)
                norms = torch.stack(
                    [
                        torch.linalg.vector_norm(rows, 1, dim=1),
                        torch.linalg.vector_norm(
                            torch.where(stacked.view(count, -1), rows, 0), 1, dim=1
                        ),
                    ]
                )
        return kernels.gta_combine(
            base,
            task_vectors,
            stacked,
            norms,
            weights,
            consensus=method.consensus == "sum",
            normalize=bool(params["normalize"]),
            lam=float(params["lambda"]),
            out=out,
            draws=draws,
        )


_Redo = tuple[MergePlan, Sequence[BlockTensor], ExpertParams, MethodParams, int, _BlockMasks]


class BlockMerge:
    """A block's merged tensors, and what re-merging it needs if its top-k windows missed.

    ``tensors``: the merged (name, tensor) pairs. ``checked``: nothing left to check.
    """

    def __init__(self, tensors: NamedTensors, redo: _Redo | None = None) -> None:
        self.tensors = tensors
        self._redo = redo
        self.checked = redo is None

    def check(self) -> NamedTensors | None:
        """The block's one host sync for its Triton top-k windows (called after the next
        block is launched, so the GPU never waits for the host): the block merged again with
        the redone masks when a window missed (rare), else None."""
        if self._redo is None:
            return None
        plan, tensors, experts, params, seed, masks = self._redo
        self._redo = None
        self.checked = True
        if not masks.pending.finish():
            return None
        return plan._merge_tensors(tensors, experts, params, seed, masks)
