"""The merge methods: the table ``METHODS`` (each method's facts and parameter checks) and the
reference math as torch tensor functions.

Every task-vector method is mergekit's "generalized task arithmetic" (GTA), decomposed as

    sparsification (per expert)  x  sign consensus (across experts)  x  weighting

(:mod:`mergeopt.merge.sparsification`, :func:`sign_consensus_mask`,
:func:`generalized_task_arithmetic`). Parameter names and defaults are mergekit 0.1.x's; the
order of floating-point operations follows mergekit's, so an fp32 merge is bit-identical to
``mergekit-yaml`` and a bf16 merge differs only where magnitudes tie
(:mod:`mergeopt.merge.selection`). The fast routes (fused Triton kernels, one-pass weighted
sums) are chosen by :class:`mergeopt.merge.plan.MergePlan`, not here.

Papers: task arithmetic (Ilharco et al., 2023, arXiv 2212.04089); TIES (Yadav et al., 2023,
arXiv 2306.01708); DARE (Yu et al., 2024, arXiv 2311.03099); model breadcrumbs (Davari &
Belilovsky, 2024, arXiv 2312.06795); DELLA (Deep et al., 2024, arXiv 2406.11617); linear /
model soups (Wortsman et al., 2022, arXiv 2203.05482); SLERP (Shoemake, 1985). ``passthrough``
copies its one input per tensor (times ``scale``): with slices, the frankenmerge.

``int8_mask`` is accepted for mergekit compatibility and changes nothing (it only picks the
dtype of mergekit's 0/1 sign mask). mergekit's ``count`` consensus is unreachable from its
configs and is not offered. The TIES sign election and SCE are in
:mod:`mergeopt.merge.sparsification`; linear, slerp, nearswap, nuslerp, model_stock, multislerp
and karcher in :mod:`mergeopt.merge.geometric`; ram, ramplus_tl and arcee_fusion in
:mod:`mergeopt.merge.selective`.

A new method is one entry in ``METHODS``: its math (a :data:`MergeMath`), its facts (what the
engine keeps resident, expert limits), its parameters with defaults; ``weighted_sum`` and
``fused_gta`` opt it into the fast routes that compute it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

from mergeopt.errors import UserError
from mergeopt.merge.geometric import (
    karcher,
    karcher_coefficients,
    linear,
    model_stock,
    model_stock_coefficients,
    multislerp,
    multislerp_coefficients,
    nearswap,
    nuslerp,
    pair_gram,
    slerp,
    slerp_pair_coefficients,
)
from mergeopt.merge.selective import arcee_fusion, fused_arcee_fusion, fused_ram, ram
from mergeopt.merge.sparsification import (
    MAGNITUDE_THRESHOLDS,
    SPARSIFY_DELLA,
    SPARSIFY_MAGNITUDE,
    SPARSIFY_OUTLIERS,
    SPARSIFY_RANDOM,
    _coefficients,
    _l1_scale,
    della_values_problem,
    expert_masks,
    sce,
    sign_consensus_mask,
)
from mergeopt.merge.weighted_sum import (
    ExpertParams,
    MethodParams,
    WeightedSum,
    linear_scale,
    task_arithmetic_scale,
    weights_times,
)


@dataclass(frozen=True)
class TensorMerge:
    """One tensor's merge inputs, parameters with the method's defaults filled in. ``stack`` is
    N x shape: task vectors or raw expert tensors (``MergeMethod.task_vectors``; slerp:
    ``base`` is v0, ``stack[0]`` v1); ``base`` is None when the method takes no base
    (``MergeMethod.base_input``); ``masks``: sparsification masks made already."""

    base: torch.Tensor | None
    stack: torch.Tensor
    expert_params: ExpertParams
    method_params: MethodParams
    generator: torch.Generator | None = None
    masks: Sequence[torch.Tensor | None] | None = None

    @property
    def base_tensor(self) -> torch.Tensor:
        """``base``, for the methods that take one."""
        assert self.base is not None
        return self.base


MergeMath = Callable[["MergeMethod", TensorMerge], torch.Tensor]
"""One tensor's merge by a method's reference math: ``(method, inputs)``."""

PairRule = Callable[[torch.Tensor, ExpertParams, MethodParams], torch.Tensor]
"""A pair method's T x 2 coefficients from the T x 3 fp64 sums (x0·x0, x1·x1, x0·x1) of T
tensors: ``(sums, expert_params, method_params)``; fp32 to combine as torch's fp32 operations
round (SLERP), fp64 to combine in fp64 (``triton_kernels.pair_combine``)."""


@dataclass(frozen=True)
class FusedPair:
    """A method whose result is c0·x0 + c1·x1 for a tensor's two operands, the coefficients
    computed from the operands' sums alone (so the fused passes read each tensor twice: once
    for the sums, once for the result).

    Attributes:
        coefficients: the rule.
        around_base: the operands are the two models minus the base, and the base is added
            back (Multi-SLERP, Model Stock); else the base and the model when the method takes
            a base (SLERP), or the two models (Karcher).
        applies: whether the rule covers these method parameters (else the torch path).
    """

    coefficients: PairRule
    around_base: bool = False
    applies: Callable[[MethodParams], bool] = lambda params: True


@dataclass(frozen=True)
class DataWeighted:
    """A task-vector method that the fused GTA kernel computes with expert weights derived from
    the task vectors themselves (SCE), the sign elected on their unweighted sum, and the
    normalizing divisor floored at ``floor``.

    Attributes:
        weights: N x shape task vectors -> their N weights in the same dtype, on the device
            (no host sync).
        floor: the divisor's floor.
        applies: whether this covers these method parameters (else the torch path).
    """

    weights: Callable[[torch.Tensor], torch.Tensor]
    floor: float
    applies: Callable[[MethodParams], bool]


FusedMath = Callable[[ModuleType, TensorMerge, torch.Tensor | None], torch.Tensor | None]
"""A method's own route through the Triton kernels: ``(kernels, inputs, out)`` -> the merged
tensor (in ``out`` when given), or None where the kernels do not take these inputs."""


class MethodParamError(UserError, ValueError):
    """A merge method or one of its parameters that does not exist, is missing, or does not
    fit (a one-line :class:`UserError`; a ``ValueError`` for callers of the engine)."""


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its math, its facts and its mergekit parameters with defaults.

    Attributes:
        name: mergekit's ``merge_method`` name.
        math: the reference math of one tensor (:data:`MergeMath`).
        task_vectors: experts enter the math as differences from the base.
        base_input: the base is an input of the math (resident in the engine); False: every
            model is an expert (linear), and a mergekit config's base must be one of them.
        base_optional: a mergekit config without ``base_model`` merges its models without one
            (as raw tensors, not task vectors).
        sparsification: one of the ``SPARSIFY_*`` names, or None.
        consensus: ``"sum"`` (TIES sign election) or None.
        global_defaults: method-level parameters (mergekit's SHARED scope) and defaults.
        expert_defaults: per-expert parameters and defaults; None marks a required one.
        expert_overrides: method-level parameters that may also arrive with an expert's
            values (per tensor: slerp's ``t``, which a mergekit config may give as a gradient).
        max_experts: the most experts the method merges (None: any number).
        min_experts: the fewest (model_stock and nuslerp need two besides the base).
        weighted_sum: the method as a weighted sum (the one-pass fast path may compute it).
        fused_gta: the fused GTA kernel computes it (task vectors, masks, consensus, weights).
        fused_pair: the method is c0·x0 + c1·x1 of each tensor's two operands, by a rule
            from their sums; on CUDA (not ``exact``) the fused pair passes compute it, no
            longer in mergekit's order of operations.
        fused_data_weighted: on CUDA (not ``exact``) the fused GTA kernel computes the method
            with weights from the task vectors (:class:`DataWeighted`).
        fused_math: on CUDA (not ``exact``) the method's own route through the Triton kernels
            (:data:`FusedMath`; RAM, Arcee Fusion), else None.
        value_check: what is wrong with one expert's values for one tensor (defaults filled
            in), or None; mergekit refuses these values when it merges (DELLA's epsilon).
        samples: the math draws from the generator other than for masks (Arcee Fusion).
    """

    name: str
    math: MergeMath
    task_vectors: bool = True
    base_input: bool = True
    base_optional: bool = False
    sparsification: str | None = None
    consensus: str | None = None
    global_defaults: Mapping[str, float | bool] = field(default_factory=dict)
    expert_defaults: Mapping[str, float | None] = field(default_factory=dict)
    expert_overrides: tuple[str, ...] = ()
    max_experts: int | None = None
    min_experts: int = 1
    weighted_sum: WeightedSum | None = None
    fused_gta: bool = False
    fused_pair: FusedPair | None = None
    fused_data_weighted: DataWeighted | None = None
    fused_math: FusedMath | None = None
    value_check: Callable[[Mapping[str, float | None]], str | None] | None = None
    samples: bool = False

    @property
    def randomized(self) -> bool:
        return self.samples or self.sparsification in (SPARSIFY_RANDOM, SPARSIFY_DELLA)

    @property
    def resident(self) -> tuple[bool, bool]:
        """What the engine keeps per model: (task vectors, base); methods that agree share
        an engine's resident tensors."""
        return self.task_vectors, self.base_input

    def resident_models(self, num_experts: int) -> int:
        """Model-sized tensors the engine keeps on the device for this method."""
        return num_experts + (1 if self.base_input else 0)

    @property
    def selection_thresholds(self) -> int:
        """Top-k thresholds per expert and tensor (magnitude sparsification), else 0."""
        return MAGNITUDE_THRESHOLDS.get(self.sparsification or "", 0)

    # -- parameter checks: the one place; study creation, the engine and mergekit configs call

    def check_method_params(
        self, names: Iterable[str], where: str, *, shared: bool = False
    ) -> None:
        """Every name is a method-level parameter (``shared``: a mergekit config's global or slice
        scope, which may also set per-expert defaults)."""
        allowed = set(self.global_defaults) | (set(self.expert_defaults) if shared else set())
        self._check_known(names, allowed, where, "")

    def check_expert_params(
        self, names: Iterable[str], where: str, *, required: bool = True, overrides: bool = True
    ) -> None:
        """Every name is a per-expert parameter (``overrides``: or one of
        ``expert_overrides``); ``required``: every required one is there."""
        names = set(names)
        allowed = set(self.expert_defaults) | (set(self.expert_overrides) if overrides else set())
        self._check_known(names, allowed, where, "per-expert ")
        if required:
            self.check_required(names, where)

    def check_required(
        self, names: Iterable[str], where: str, *, overrides: bool = False, hint: str = ""
    ) -> None:
        """Every required per-expert parameter is among ``names`` (``overrides``: the
        ``expert_overrides`` too, as a mergekit config must give them per tensor)."""
        given = set(names)
        required = [name for name, default in self.expert_defaults.items() if default is None]
        for name in [*required, *(self.expert_overrides if overrides else ())]:
            if name not in given:
                suffix = f" ({hint})" if hint else ""
                raise MethodParamError(f"{where}: {name!r} is required by {self.name}{suffix}")

    def check_values(self, values: Mapping[str, float], where: str) -> None:
        """One expert's values for one tensor fit the method (``value_check``)."""
        if self.value_check is not None:
            problem = self.value_check({**self.expert_defaults, **values})
            if problem:
                raise MethodParamError(f"{where}: {problem}")

    def check_experts(self, count: int, where: str) -> None:
        """The method merges ``count`` experts (besides the base, when it takes one)."""
        if count < self.min_experts:
            raise MethodParamError(
                f"{where}: {self.name} merges at least {self.min_experts} expert model(s), "
                f"got {count}"
            )
        if self.max_experts is not None and count > self.max_experts:
            raise MethodParamError(
                f"{where}: {self.name} merges at most {self.max_experts} expert model(s) "
                f"{'with the base' if self.base_input else ''}, got {count}"
            )

    def _check_known(self, names: Iterable[str], allowed: set[str], where: str, what: str) -> None:
        for name in sorted(set(names) - allowed):
            known = ", ".join(sorted(allowed)) or "none"
            raise MethodParamError(
                f"{where}.{name}: unknown {what}parameter {name!r} of {self.name} (it has: {known})"
            )


def get_method(name: str, where: str = "") -> MergeMethod:
    """The method called ``name``; ``where`` (a field or file) prefixes the error."""
    try:
        return METHODS[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise MethodParamError(
            f"{prefix}unknown merge method {name!r}; known: {', '.join(METHODS)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# The reference math


_CPU_CHUNK = 1 << 17
"""Elements per pass of the GTA combination on the CPU: its dozen elementwise steps run on one
chunk of every expert at a time, which stays in the L2 cache (2 experts x 512 KiB in fp32)
instead of streaming N x shape temporaries through memory once per step. Elementwise steps
and sums over the experts give the same bits chunk by chunk."""


def generalized_task_arithmetic(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    *,
    method: MergeMethod,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    generator: torch.Generator | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Merged tensor (shape of ``base``) from ``base`` and stacked ``task_vectors`` (N x shape),
    by mergekit's torch operations (the fused kernel of ``MergePlan`` rounds where these do).

    ``expert_params[i]`` holds expert i's ``weight`` (required), ``density``, ``gamma``,
    ``epsilon``; ``method_params`` the method-level ``normalize``, ``rescale``, ``lambda``.
    ``task_vectors`` is read, never modified. ``masks``: the sparsification masks when the
    caller made them already (the engine makes a block's magnitude masks together, one host
    sync per block). Returns a new tensor. On the CPU the combination after the rescale's
    norms runs in chunks (:data:`_CPU_CHUNK`), the same operations on each.
    """
    params = {**method.global_defaults, **method_params}
    expert = [{**method.expert_defaults, **p} for p in expert_params]
    count = task_vectors.shape[0]
    weights = _coefficients(
        tuple(float(values["weight"]) for values in expert),  # type: ignore[arg-type]
        task_vectors.dtype,
        task_vectors.device,
    )
    if masks is None and method.sparsification is not None:
        masks = expert_masks(method.sparsification, task_vectors, expert, generator)
    rows = task_vectors.reshape(count, -1)
    flat_masks = None
    if masks is not None and method.sparsification is not None:
        flat_masks = [None if mask is None else mask.reshape(-1) for mask in masks]
    # mergekit's rescale: each kept delta times ||delta||_1 / ||kept||_1, norms of the whole
    # tensor (a sum's bits depend on its extent), so the kept deltas are made whole first
    kept = None
    scales: list[torch.Tensor | None] = [None] * count
    if flat_masks is not None and bool(params["rescale"]):
        kept = _masked(rows, flat_masks)
        for index, mask in enumerate(flat_masks):
            if mask is not None:
                scales[index] = _l1_scale(rows[index], kept[index])
    flat_base = base.reshape(-1)
    result = torch.empty(flat_base.shape, dtype=base.dtype, device=base.device)
    total = flat_base.numel()
    chunk = _CPU_CHUNK if base.device.type == "cpu" else max(total, 1)
    for start in range(0, total, chunk):
        part = slice(start, start + chunk)
        deltas = None
        if kept is not None:
            deltas = kept[:, part]  # ours: changed in place
        elif flat_masks is not None:
            deltas = _masked(rows[:, part], [None if m is None else m[part] for m in flat_masks])
        _combine(
            deltas,
            rows[:, part],
            scales,
            weights,
            flat_base[part],
            result[part],
            consensus=method.consensus == "sum",
            normalize=bool(params["normalize"]),
            lam=float(params["lambda"]),
        )
    return result.view(base.shape)


def _masked(rows: torch.Tensor, masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The rows (N x n) with each row's dropped elements +0, as masked_fill's (a new tensor;
    a row without a mask is copied)."""
    deltas = torch.empty_like(rows)
    zero = rows.new_zeros(())
    for index, mask in enumerate(masks):
        if mask is None:
            deltas[index] = rows[index]
        else:  # one pass, no inverted mask
            torch.where(mask, rows[index], zero, out=deltas[index])
    return deltas


def _combine(
    deltas: torch.Tensor | None,
    task_vectors: torch.Tensor,
    scales: Sequence[torch.Tensor | None],
    weights: torch.Tensor,
    base: torch.Tensor,
    out: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> None:
    """mergekit's GTA after sparsification, for one chunk (1-D ``base``, ``out``; N x chunk
    ``deltas``, the kept task vectors, changed in place; None: no sparsification, the task
    vectors are used): rescale, weigh, sign election, sum, normalize, lambda, add the base."""
    column = weights.view(-1, 1)
    if deltas is None:
        deltas = task_vectors * column
    else:
        for index, scale in enumerate(scales):
            if scale is not None:
                deltas[index] *= scale
        deltas.mul_(column)
    if consensus:
        mask = sign_consensus_mask(deltas)
        # deltas is ours: multiplied in place (the values of deltas * mask, no N x chunk copy)
        mixed = deltas.mul_(mask).sum(dim=0)
        if normalize:  # the divisor only matters then
            divisor = (column * mask).sum(dim=0)
            divisor.masked_fill_(divisor == 0, 1)  # no boolean indexing: it synchronizes
            mixed /= divisor
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = column.sum(dim=0)
            divisor.masked_fill_(divisor.abs() < 1e-8, 1)
            mixed /= divisor
    if lam != 1:
        mixed *= lam
    if mixed.dtype == base.dtype:
        torch.add(mixed, base, out=out)  # base + mixed (IEEE addition commutes)
    else:
        out.copy_(base + mixed)


# ---------------------------------------------------------------------------------------------
# The table: each method's math as a MergeMath, and its weighted-sum form where it has one


def _gta_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    return generalized_task_arithmetic(
        inputs.base_tensor,
        inputs.stack,
        method=method,
        expert_params=inputs.expert_params,
        method_params=inputs.method_params,
        generator=inputs.generator,
        masks=inputs.masks,
    )


def _linear_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    weights = [float(p["weight"]) for p in inputs.expert_params]
    return linear(inputs.stack, weights=weights, normalize=bool(inputs.method_params["normalize"]))


def t_value(expert_params: ExpertParams, method_params: MethodParams) -> float:
    """The ``t`` of a method between two models: the model's own value, else the method's."""
    default = method_params["t"]
    return float(expert_params[0].get("t", default)) if expert_params else float(default)


def _at_t(
    name: str, between: Callable[..., torch.Tensor], *, fused_pair: FusedPair | None = None
) -> MergeMethod:
    """A method between the base (t = 0) and one model (t = 1) at ``t``, which a mergekit config
    must give, per tensor as a gradient or filters if it likes (the table's 0.5 only types it)."""

    def math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
        t = t_value(inputs.expert_params, inputs.method_params)
        return between(t, inputs.base_tensor, inputs.stack[0])  # v0 and v1

    return MergeMethod(
        name=name,
        math=math,
        task_vectors=False,
        global_defaults={"t": 0.5},
        expert_overrides=("t",),
        max_experts=1,
        fused_pair=fused_pair,
    )


def _nuslerp_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    """base + nuslerp of the two task vectors at t = w1 / (w0 + w1) (0.5 if they cancel);
    without a base, nuslerp of the two models."""
    weights = [float(p["weight"]) for p in inputs.expert_params]
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    p = inputs.method_params
    row_wise, flatten = bool(p["nuslerp_row_wise"]), bool(p["nuslerp_flatten"])
    merged = nuslerp(t, *inputs.stack[:2], row_wise=row_wise, flatten=flatten)
    return merged if inputs.base is None else inputs.base + merged


def _model_stock_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    filter_wise = bool(inputs.method_params["filter_wise"])
    return model_stock(inputs.base_tensor, inputs.stack.unbind(0), filter_wise=filter_wise)


def _multislerp_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    params, weights = inputs.method_params, [float(p["weight"]) for p in inputs.expert_params]
    normalize, eps = bool(params["normalize_weights"]), float(params["eps"])
    return multislerp(inputs.base, inputs.stack, weights, normalize_weights=normalize, eps=eps)


def _karcher_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:  # equal weights
    models, params = inputs.stack.unbind(0), inputs.method_params
    alphas = [1.0 / len(models)] * len(models)
    return karcher(models, alphas, max_iter=int(params["max_iter"]), tol=float(params["tol"]))


def _karcher_pair(
    sums: torch.Tensor, expert_params: ExpertParams, method_params: MethodParams
) -> torch.Tensor:
    """Karcher's coefficients of two models (equal weights) from their sums, in fp64 on the
    host (one sync per block; on the GPU each of the iteration's tiny operations would be a
    launch): closer to the exact mean than mergekit's iteration in the tensors' dtype."""
    coefficients = karcher_coefficients(
        pair_gram(sums.cpu()),
        [0.5, 0.5],
        max_iter=int(method_params["max_iter"]),
        tol=float(method_params["tol"]),
    )
    return coefficients.to(sums.device)


def _slerp_pair(
    sums: torch.Tensor, expert_params: ExpertParams, method_params: MethodParams
) -> torch.Tensor:
    return slerp_pair_coefficients(t_value(expert_params, method_params), sums)


def _multislerp_pair(
    sums: torch.Tensor, expert_params: ExpertParams, method_params: MethodParams
) -> torch.Tensor:
    return multislerp_coefficients(
        pair_gram(sums),
        [float(p["weight"]) for p in expert_params],
        normalize_weights=bool(method_params["normalize_weights"]),
        eps=float(method_params["eps"]),
    )


def _model_stock_pair(
    sums: torch.Tensor, expert_params: ExpertParams, method_params: MethodParams
) -> torch.Tensor:
    return model_stock_coefficients(pair_gram(sums))


def _sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """SCE's expert weights on the device: each expert's mean squared task vector over their
    sum (equal weights when that is under 1e-6), in the task vectors' dtype. The squares are
    summed exactly in fp32 without a copy, where mergekit rounds each to the dtype first, so a
    weight may differ from mergekit's in its last place."""
    rows = task_vectors.reshape(task_vectors.shape[0], -1)
    squares = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()
    means = (squares / rows.shape[1]).to(task_vectors.dtype)
    total = means.sum()
    equal = torch.full_like(means, 1 / len(means))
    return torch.where(total.abs() < 1e-6, equal, means / total)


def _sce_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    return sce(inputs.base_tensor, inputs.stack, float(inputs.method_params["select_topk"]))


def _ram_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:  # ram, ramplus_tl
    params = {name: float(value) for name, value in inputs.method_params.items()}
    return ram(inputs.base_tensor, inputs.stack, **params)


def _fused_ram(
    kernels: ModuleType, inputs: TensorMerge, out: torch.Tensor | None
) -> torch.Tensor | None:
    params = {name: float(value) for name, value in inputs.method_params.items()}
    return fused_ram(kernels, inputs.base_tensor, inputs.stack, **params, out=out)


def _fused_arcee_fusion(
    kernels: ModuleType, inputs: TensorMerge, out: torch.Tensor | None
) -> torch.Tensor | None:
    return fused_arcee_fusion(
        kernels, inputs.base_tensor, inputs.stack[0], inputs.generator, out=out
    )


def _passthrough_math(method: MergeMethod, inputs: TensorMerge) -> torch.Tensor:
    """The one input as it is, times its ``scale`` (mergekit multiplies in its dtype)."""
    experts = inputs.expert_params
    scale = float(experts[0].get("scale", 1.0)) if experts else 1.0
    return inputs.stack[0].clone() if scale == 1 else inputs.stack[0] * scale


def _gta(
    name: str, sparsification: str | None, consensus: str | None, normalize: bool, rescale: bool
) -> MergeMethod:
    expert: dict[str, float | None] = {"weight": None, "density": 1.0}
    if sparsification == SPARSIFY_OUTLIERS:
        expert["gamma"] = 0.01
    if sparsification == SPARSIFY_DELLA:
        expert["epsilon"] = 0.15
    plain = sparsification is None and consensus is None
    return MergeMethod(
        name=name,
        math=_gta_math,
        sparsification=sparsification,
        consensus=consensus,
        global_defaults={
            "normalize": normalize,
            "rescale": rescale,
            "lambda": 1.0,
            "int8_mask": False,
        },
        expert_defaults=expert,
        weighted_sum=weights_times(task_arithmetic_scale) if plain else None,
        fused_gta=True,
        value_check=della_values_problem if sparsification == SPARSIFY_DELLA else None,
    )


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        _gta("task_arithmetic", None, None, False, False),
        _gta("ties", SPARSIFY_MAGNITUDE, "sum", True, False),
        _gta("dare_ties", SPARSIFY_RANDOM, "sum", False, True),
        _gta("dare_linear", SPARSIFY_RANDOM, None, False, True),
        _gta("breadcrumbs", SPARSIFY_OUTLIERS, None, False, False),
        _gta("breadcrumbs_ties", SPARSIFY_OUTLIERS, "sum", False, False),
        _gta("della", SPARSIFY_DELLA, "sum", True, True),
        _gta("della_linear", SPARSIFY_DELLA, None, False, True),
        MergeMethod(
            name="linear",
            math=_linear_math,
            task_vectors=False,
            base_input=False,
            global_defaults={"normalize": True},
            expert_defaults={"weight": None},
            weighted_sum=weights_times(linear_scale),
        ),
        MergeMethod(
            name="passthrough",
            math=_passthrough_math,
            task_vectors=False,
            base_input=False,
            expert_defaults={"scale": 1.0},
            max_experts=1,
        ),
        MergeMethod(
            name="nuslerp",
            math=_nuslerp_math,
            base_optional=True,
            global_defaults={"nuslerp_row_wise": False, "nuslerp_flatten": True},
            expert_defaults={"weight": None},
            min_experts=2,
            max_experts=2,
        ),
        MergeMethod(
            name="model_stock",
            math=_model_stock_math,
            task_vectors=False,
            global_defaults={"filter_wise": False},
            min_experts=2,
            fused_pair=FusedPair(
                _model_stock_pair,
                around_base=True,
                applies=lambda params: not params["filter_wise"],
            ),
        ),
        MergeMethod(
            name="multislerp",
            math=_multislerp_math,
            task_vectors=False,
            base_optional=True,
            global_defaults={"normalize_weights": True, "eps": 1e-8},
            expert_defaults={"weight": None},
            fused_pair=FusedPair(_multislerp_pair, around_base=True),
        ),
        MergeMethod(
            name="karcher",
            math=_karcher_math,
            task_vectors=False,
            base_input=False,
            global_defaults={"max_iter": 10, "tol": 1e-5},
            fused_pair=FusedPair(_karcher_pair),
        ),
        MergeMethod(
            name="sce",
            math=_sce_math,
            global_defaults={"select_topk": 1.0, "int8_mask": False},
            fused_data_weighted=DataWeighted(
                _sce_weights, floor=1e-6, applies=lambda params: params["select_topk"] >= 1
            ),
        ),
        _at_t("slerp", slerp, fused_pair=FusedPair(_slerp_pair)),
        _at_t("nearswap", nearswap),
        MergeMethod(
            name="ram",
            math=_ram_math,
            global_defaults={"epsilon": 1e-5},
            fused_math=_fused_ram,
        ),
        MergeMethod(
            name="ramplus_tl",
            math=_ram_math,
            global_defaults={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
            fused_math=_fused_ram,
        ),
        MergeMethod(
            name="arcee_fusion",
            math=lambda _, x: arcee_fusion(x.base_tensor, x.stack[0], x.generator),
            fused_math=_fused_arcee_fusion,
            task_vectors=False,
            max_experts=1,
            samples=True,
        ),
    )
}
"""mergekit's method names -> their specification (FACTS.md lists the same table)."""
