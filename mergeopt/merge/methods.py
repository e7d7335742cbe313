"""The fusion methods as tensor functions — the one place for the merge math.

Every task-vector method is mergekit's "generalized task arithmetic" (GTA), decomposed as

    sparsification (per expert)  x  sign consensus (across experts)  x  weighting

with one function for each factor (:func:`sparsify`, :func:`sign_consensus_mask`,
:func:`generalized_task_arithmetic`). Parameter names and defaults are mergekit 0.1.x's (see
``METHODS``); the order of floating-point operations follows mergekit's, so an fp32 merge is
bit-identical to ``mergekit-yaml`` and a bf16 merge differs only where magnitudes tie.

Papers: task arithmetic (Ilharco et al., 2023, arXiv 2212.04089); TIES (Yadav et al., 2023,
arXiv 2306.01708); DARE (Yu et al., 2024, arXiv 2311.03099); model breadcrumbs (Davari &
Belilovsky, 2024, arXiv 2312.06795); DELLA (Deep et al., 2024, arXiv 2406.11617); linear /
model soups (Wortsman et al., 2022, arXiv 2203.05482); SLERP (Shoemake, 1985).

Deliberate choices where mergekit has quirks (tested in tests/test_merge_methods.py):

- Exact magnitude top-k without sorting: the k-th largest |x| is found from a histogram of the
  magnitude's bit pattern (bf16/fp16: one 32,768-bin pass; fp32: a two-level radix histogram),
  ties at the threshold are kept in index order. mergekit's argsort keeps an unspecified subset
  of the ties, so bf16 merges may differ there (fp32 ties are practically absent).
- breadcrumbs keeps ``int(density·n)`` elements (no ``max(1, ·)`` as for TIES) and drops the top
  ``int(gamma·n)``: as in mergekit, a tensor with ``density·n < 1`` gets a zero delta, and one
  with ``gamma·n < 1`` (biases, norms) drops no outliers. Kept for oracle equality.
- Randomness (dare_*, della*) comes from an explicit ``torch.Generator`` (mergekit uses the
  global RNG), so a seed reproduces a merge on the same device; masks are Bernoulli(p) as in
  mergekit, and "rescale" is mergekit's L1-norm matching, not DARE's 1/p.
- della on a tensor with one column (ranks degenerate) keeps each element with p = density.
- ``int8_mask`` is accepted for mergekit compatibility and changes nothing (it only picks the
  dtype of mergekit's 0/1 sign mask). mergekit's ``count`` consensus is unreachable from its
  configs and is not offered; nuslerp, model_stock, karcher and the rest are not implemented.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

SPARSIFY_MAGNITUDE = "magnitude"
SPARSIFY_RANDOM = "random"
SPARSIFY_OUTLIERS = "magnitude_outliers"
SPARSIFY_DELLA = "della_magprune"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its factors and its mergekit parameters with defaults.

    Attributes:
        name: mergekit's ``merge_method`` name.
        kind: ``"gta"`` (base + task vectors), ``"linear"`` or ``"slerp"`` (raw models).
        sparsification: one of the ``SPARSIFY_*`` names, or None.
        consensus: ``"sum"`` (TIES sign election) or None.
        global_defaults: method-level parameters (mergekit's SHARED scope) and defaults.
        expert_defaults: per-expert parameters and defaults; None marks a required one.
    """

    name: str
    kind: str
    sparsification: str | None = None
    consensus: str | None = None
    global_defaults: Mapping[str, float | bool] = field(default_factory=dict)
    expert_defaults: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def randomized(self) -> bool:
        return self.sparsification in (SPARSIFY_RANDOM, SPARSIFY_DELLA)

    @property
    def uses_task_vectors(self) -> bool:
        return self.kind == "gta"


def _gta(
    name: str, sparsification: str | None, consensus: str | None, normalize: bool, rescale: bool
) -> MethodSpec:
    expert: dict[str, float | None] = {"weight": None, "density": 1.0}
    if sparsification == SPARSIFY_OUTLIERS:
        expert["gamma"] = 0.01
    if sparsification == SPARSIFY_DELLA:
        expert["epsilon"] = 0.15
    return MethodSpec(
        name=name,
        kind="gta",
        sparsification=sparsification,
        consensus=consensus,
        global_defaults={
            "normalize": normalize,
            "rescale": rescale,
            "lambda": 1.0,
            "int8_mask": False,
        },
        expert_defaults=expert,
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _gta("task_arithmetic", None, None, False, False),
        _gta("ties", SPARSIFY_MAGNITUDE, "sum", True, False),
        _gta("dare_ties", SPARSIFY_RANDOM, "sum", False, True),
        _gta("dare_linear", SPARSIFY_RANDOM, None, False, True),
        _gta("breadcrumbs", SPARSIFY_OUTLIERS, None, False, False),
        _gta("breadcrumbs_ties", SPARSIFY_OUTLIERS, "sum", False, False),
        _gta("della", SPARSIFY_DELLA, "sum", True, True),
        _gta("della_linear", SPARSIFY_DELLA, None, False, True),
        MethodSpec(
            name="linear",
            kind="linear",
            global_defaults={"normalize": True},
            expert_defaults={"weight": None},
        ),
        MethodSpec(name="slerp", kind="slerp", global_defaults={"t": 0.5}),
    )
}
"""mergekit's method names -> their specification (FACTS.md lists the same table)."""


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


# ---------------------------------------------------------------------------------------------
# Exact magnitude selection without sorting


@functools.lru_cache(maxsize=256)
def _coefficients(
    values: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-expert coefficients as a device tensor, made once per distinct value tuple (a
    host-to-device copy per merged tensor would synchronize the stream every time). Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


def _magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like ``|x|`` (the float's bit pattern without the sign), flattened."""
    flat = x.reshape(-1)
    if x.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).bitwise_and(0x7FFF)
    if x.dtype == torch.float32:
        return flat.view(torch.int32).bitwise_and(0x7FFFFFFF)
    if x.dtype == torch.float64:
        return flat.view(torch.int64).bitwise_and(0x7FFFFFFFFFFFFFFF)
    raise TypeError(f"magnitude selection needs a floating tensor, got {x.dtype}")


def _kth_bin_from_top(
    counts: torch.Tensor, k: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the k-th largest item (k >= 1): its bin and how many items lie in higher bins, as
    0-d device tensors (no host synchronization)."""
    from_top = counts.flip(0).cumsum(0)
    if isinstance(k, torch.Tensor):
        position = torch.searchsorted(from_top, k.reshape(1))[0]
    else:
        position = torch.searchsorted(from_top, k)
    position = position.clamp(max=counts.numel() - 1)
    above = torch.where(position > 0, from_top[(position - 1).clamp(min=0)], 0)
    return counts.numel() - 1 - position, above


# Digit widths of the radix select, most significant first. One 32,768-bin level for 15-bit
# keys measured faster on an H100 than two 256-bin levels (each torch.bincount also reduces
# min/max and synchronizes, so fewer levels win; docs/bench/merge-h100.md, runs 1 and 2).
_RADIX_WIDTHS = {torch.int16: (15,), torch.int32: (15, 16)}


def _kth_largest_key(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th largest value (1-based) of non-negative integer ``keys`` (1-D), exactly, and
    the number of keys above it, as device tensors.

    A most-significant-digit radix select: one ``bincount`` per digit over the keys whose
    higher digits equal the prefix chosen so far (a spill bin takes the others): 15-bit
    bf16/fp16 magnitudes need one pass of 32,768 bins, 31-bit fp32 two (15 + 16 bits).
    64-bit keys (fp64) use kthvalue.
    """
    if keys.dtype == torch.int64:
        value = torch.kthvalue(keys, keys.numel() - k + 1).values
        return value, (keys > value).sum()
    widths = _RADIX_WIDTHS[keys.dtype]
    shift = sum(widths)
    prefix: torch.Tensor | None = None
    above: torch.Tensor | int = 0
    for width in widths:
        shift -= width
        digits = keys.bitwise_right_shift(shift).bitwise_and((1 << width) - 1)
        if prefix is None:
            counts = torch.bincount(digits, minlength=1 << width)
        else:
            matches = keys.bitwise_right_shift(shift + width) == prefix
            digits = torch.where(matches, digits + 1, 0)  # bin 0: keys of other prefixes
            counts = torch.bincount(digits, minlength=(1 << width) + 1)[1:]
        digit, more_above = _kth_bin_from_top(counts, k - above)
        above = above + more_above
        prefix = digit if prefix is None else prefix * (1 << width) + digit
    assert prefix is not None and isinstance(above, torch.Tensor)
    return prefix, above


_SORT_BELOW = 1 << 16


def top_magnitude_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of the ``k`` elements of largest magnitude.

    Exact: elements above the k-th largest magnitude, plus as many elements equal to it as
    needed, taken in index order. No sort: a histogram of the magnitudes' bit patterns.
    """
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    keys = _magnitude_keys(x)
    if n <= _SORT_BELOW:
        # Small tensors (norms, biases): one stable sort beats a 32,768-bin histogram.
        order = torch.sort(keys, descending=True, stable=True).indices
        mask = torch.zeros(n, dtype=torch.bool, device=x.device)
        mask[order[:k]] = True
        return mask.view(x.shape)
    threshold, above = _kth_largest_key(keys, k)
    mask = keys > threshold
    # Ties at the threshold: keep the first ``k - above`` of them (one host sync per call).
    equal_positions = torch.nonzero(keys == threshold).view(-1)
    missing = int(k - above.item())
    mask[equal_positions[:missing]] = True
    return mask.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Sparsification (one expert's delta at a time)


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescale: scale ``kept`` so its L1 norm equals ``delta``'s."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    # mergekit returns ``kept`` unchanged below eps; decided on the device (no host sync)
    scale = torch.where((before < eps) | (after < eps), 1, before / after)
    return kept * scale


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = torch.where(mask, delta, 0)
    return _rescale_l1(delta, kept) if rescale else kept


def _bernoulli_mask(
    shape: torch.Size, probability: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Bool mask with P(True) = probability per element (one byte written per element)."""
    mask = torch.empty(shape, dtype=torch.uint8, device=device)
    mask.bernoulli_(probability, generator=generator)
    return mask.view(torch.bool)


def sparsify(
    delta: torch.Tensor,
    *,
    method: str,
    density: float,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One expert's delta (any shape) with elements dropped; a new tensor of the same shape.

    ``magnitude``: keep the top ``max(1, int(density·n))`` by |x| (TIES).
    ``random``: keep each element with probability ``density`` (DARE).
    ``magnitude_outliers``: drop the top ``int(gamma·n)``, keep the next ``int(density·n)``
    (breadcrumbs). ``della_magprune``: per row, keep with p = density − ε + 2ε·rank/(cols−1)
    (DELLA). ``rescale`` matches the L1 norm of the kept delta to the original (mergekit).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if method == SPARSIFY_MAGNITUDE:
        if density <= 0 or n == 0:
            return torch.zeros_like(delta)
        mask = top_magnitude_mask(delta, max(1, int(density * n)))
        return _apply_mask(delta, mask, rescale)
    if method == SPARSIFY_OUTLIERS:
        target = int(density * n)
        dropped_top = min(int(gamma * n), n - target)
        mask = top_magnitude_mask(delta, dropped_top + target)
        if dropped_top > 0:
            mask &= ~top_magnitude_mask(delta, dropped_top)
        return _apply_mask(delta, mask, rescale)
    if method == SPARSIFY_RANDOM:
        mask = _bernoulli_mask(delta.shape, density, generator, delta.device)
        return _apply_mask(delta, mask, rescale)
    if method == SPARSIFY_DELLA:
        if density <= 0:
            return torch.zeros_like(delta)
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError("della: epsilon must keep density ± epsilon inside (0, 1)")
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
        mask = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
        columns = rows.shape[1]
        step = 2 * epsilon / (columns - 1) if columns > 1 else 0.0
        # Rows in chunks of about 2^24 elements bound the int64 rank scratch.
        chunk = max(1, (1 << 24) // max(1, columns))
        for start in range(0, rows.shape[0], chunk):
            part = rows[start : start + chunk]
            order = part.abs().argsort(dim=1)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(columns, device=delta.device).expand_as(order))
            probs = ranks.to(torch.float32).mul_(step).add_(density - epsilon)
            mask[start : start + chunk] = torch.bernoulli(probs, generator=generator).bool()
        mask = mask.view(delta.shape)
        return _apply_mask(delta, mask, rescale)
    raise ValueError(f"unknown sparsification {method!r}")


# ---------------------------------------------------------------------------------------------
# Sign consensus and weighting


def sign_consensus_mask(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election over experts: ``weighted_deltas`` is ``N x ...``; returns a bool
    ``N x ...`` mask of elements whose sign equals sign(Σ_i w_i·δ_i) (0 counts as +)."""
    majority_positive = weighted_deltas.sum(dim=0) >= 0
    majority_sign = majority_positive.to(weighted_deltas.dtype) * 2 - 1
    return weighted_deltas.sign() == majority_sign


def generalized_task_arithmetic(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    *,
    spec: MethodSpec,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merged tensor (shape of ``base``) from ``base`` and stacked ``task_vectors`` (N x shape).

    ``expert_params[i]`` holds expert i's ``weight`` (required), ``density``, ``gamma``,
    ``epsilon``; ``method_params`` the method-level ``normalize``, ``rescale``, ``lambda``.
    ``task_vectors`` is read, never modified.
    """
    params = {**spec.global_defaults, **method_params}
    expert = [{**spec.expert_defaults, **p} for p in expert_params]
    if spec.sparsification is not None:
        deltas = torch.empty_like(task_vectors)
        for index, values in enumerate(expert):
            deltas[index] = sparsify(
                task_vectors[index],
                method=spec.sparsification,
                density=float(values["density"]),  # type: ignore[arg-type]
                rescale=bool(params["rescale"]),
                gamma=float(values.get("gamma") or 0.0),
                epsilon=float(values.get("epsilon") or 0.0),
                generator=generator,
            )
    else:
        deltas = task_vectors
    weights = _coefficients(
        tuple(float(values["weight"]) for values in expert),  # type: ignore[arg-type]
        task_vectors.dtype,
        task_vectors.device,
    ).view(-1, *([1] * base.dim()))
    deltas = deltas * weights
    if spec.consensus == "sum":
        mask = sign_consensus_mask(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params["normalize"]:
        mixed /= divisor
    if float(params["lambda"]) != 1:
        mixed *= float(params["lambda"])
    return (base + mixed).to(base.dtype)


def linear(
    models: torch.Tensor,
    *,
    weights: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """Σ_i w_i·x_i (divided by Σ_i w_i when ``normalize``) of stacked ``models`` (N x shape),
    computed in fp32 (fp64 for fp64 inputs) as mergekit does; returns the input dtype."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(list(weights), dtype=dtype, device=models.device)
    result = torch.zeros_like(first, dtype=dtype)
    for index in range(models.shape[0]):
        result.addcmul_(models[index], coefficients[index])
    if normalize:
        result.div_(coefficients.sum())
    return result.to(first.dtype)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995
) -> torch.Tensor:
    """Spherical interpolation between ``v0`` (t = 0) and ``v1`` (t = 1), same shape, over the
    whole tensor; falls back to lerp when the normalized tensors are nearly (anti)parallel."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1).to(dtype)
    b = v1.reshape(1, -1).to(dtype)
    if a.shape[1] == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    nearly_parallel = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(nearly_parallel, 0, dot))
    sin_theta = torch.sin(theta)
    t_tensor = torch.tensor(t, dtype=dtype, device=v0.device)
    coef_a = torch.where(
        nearly_parallel, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta
    )
    coef_b = torch.where(nearly_parallel, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


def fused_weighted_sum(
    stack: torch.Tensor,
    coefficients: Sequence[float],
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + scale · Σ_i c_i·stack[i]`` (``base`` optional) in one pass over the inputs.

    ``stack`` is N x shape; the sum is a (1 x N)·(N x numel) matrix product (``addmm``) that
    reads each input once, accumulates in fp32 and rounds once — the engine's fast path for
    task_arithmetic and linear on GPUs (a bf16 result may differ from mergekit's op-by-op
    rounding by one unit in the last place). ``out`` (shape of one tensor) receives it.
    """
    count = stack.shape[0]
    matrix = stack.reshape(count, -1)
    row = _coefficients(tuple(coefficients), stack.dtype, stack.device).view(1, -1)
    shape = stack.shape[1:]
    target = out.view(1, -1) if out is not None else None
    if base is None:
        result = torch.mm(row, matrix, out=target) if scale == 1 else None
        if result is None:
            result = torch.addmm(matrix[:1], row, matrix, beta=0, alpha=scale, out=target)
    else:
        result = torch.addmm(base.reshape(1, -1), row, matrix, alpha=scale, out=target)
    return result.view(shape)


def fast_merge_tensor(
    spec: MethodSpec,
    *,
    base: torch.Tensor | None,
    stack: torch.Tensor,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One-pass merge for methods that are a weighted sum (task_arithmetic, linear);
    None for the others (use :func:`merge_tensor`)."""
    params = {**spec.global_defaults, **method_params}
    if spec.kind == "gta" and spec.sparsification is None and spec.consensus is None:
        assert base is not None
        weights = [float(p["weight"]) for p in expert_params]
        # the weights as mergekit rounds them (the tensor dtype), the divisor from those
        rounded = torch.tensor(weights, dtype=stack.dtype).to(torch.float64).tolist()
        divisor = sum(rounded)
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
        scale = float(params["lambda"]) / (divisor if params["normalize"] else 1.0)
        return fused_weighted_sum(stack, weights, scale=scale, base=base, out=out)
    if spec.kind == "linear":
        weights = [float(p["weight"]) for p in expert_params]
        scale = 1.0 / sum(weights) if params["normalize"] else 1.0
        return fused_weighted_sum(stack, weights, scale=scale, out=out)
    return None


def merge_tensor(
    spec: MethodSpec,
    *,
    base: torch.Tensor | None,
    stack: torch.Tensor,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch one tensor's merge. ``stack`` is N x shape: task vectors for GTA methods, raw
    expert tensors for linear/slerp (slerp: ``base`` is v0, ``stack[0]`` is v1)."""
    if spec.kind == "gta":
        assert base is not None
        return generalized_task_arithmetic(
            base,
            stack,
            spec=spec,
            expert_params=expert_params,
            method_params=method_params,
            generator=generator,
        )
    params = {**spec.global_defaults, **method_params}
    if spec.kind == "linear":
        return linear(
            stack,
            weights=[float(p["weight"]) for p in expert_params],
            normalize=bool(params["normalize"]),
        )
    if spec.kind == "slerp":
        assert base is not None
        t = float(expert_params[0].get("t", params["t"])) if expert_params else float(params["t"])
        return slerp(t, base, stack[0])
    raise ValueError(f"unknown method kind {spec.kind!r}")
