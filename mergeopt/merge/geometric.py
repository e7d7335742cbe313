"""The geometric methods' math: the linear (Euclidean) weighted mean, SLERP between two
models, NuSLERP between two task vectors, Model Stock's interpolation towards the experts'
average by the angle between their task vectors, Multi-SLERP's barycentre of many task vectors
on the hypersphere, the Karcher mean of the models' directions, NearSwap's step of at most t
towards a model. Each follows mergekit 0.1.x's torch operations in order, so fp32 is
bit-identical; their entries in the method table (:mod:`mergeopt.merge.methods`) call them.

Papers: SLERP (Shoemake, 1985); Model Stock (Jang et al., 2024, arXiv 2403.19522).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    norm_a = slerp_norm(torch.linalg.vector_norm(a, dim=1, keepdim=True))
    norm_b = slerp_norm(torch.linalg.vector_norm(b, dim=1, keepdim=True))
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    coef_a, coef_b = slerp_coefficients(t, dot, dot_threshold=dot_threshold)
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


def slerp_norm(norm: torch.Tensor) -> torch.Tensor:
    """A tensor's norm as SLERP divides by it: 1 for a (nearly) zero tensor."""
    return torch.where(norm > 1e-8, norm, 1)


def slerp_coefficients(
    t: float | torch.Tensor, dot: torch.Tensor, *, dot_threshold: float = 0.9995
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's coefficients of ``v0`` and ``v1`` (shape of ``dot``, the cosine of the angle
    between them, clamped to [-1, 1]): the lerp's ``1 - t`` and ``t`` where nearly
    (anti)parallel. The fused GPU route computes the same from its own sums."""
    t_tensor = torch.as_tensor(t, dtype=dot.dtype, device=dot.device)
    nearly_parallel = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(nearly_parallel, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(
        nearly_parallel, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta
    )
    coef_b = torch.where(nearly_parallel, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    return coef_a, coef_b


def slerp_pair_coefficients(
    t: float, sums: torch.Tensor, *, dot_threshold: float = 0.9995
) -> torch.Tensor:
    """SLERP's T x 2 fp32 coefficients of ``v0`` and ``v1`` from their T x 3 fp64 sums
    (v0·v0, v1·v1, v0·v1; the fused route's): the cosine is v0·v1 / (|v0|·|v1|), not the
    normalized tensors' dot, so a result may differ from :func:`slerp`'s in the last place."""
    norm_a = slerp_norm(sums[:, 0].sqrt())
    norm_b = slerp_norm(sums[:, 1].sqrt())
    dot = (sums[:, 2] / (norm_a * norm_b)).float().clamp(-1, 1)
    coef_a, coef_b = slerp_coefficients(t, dot, dot_threshold=dot_threshold)
    return torch.stack([coef_a, coef_b], dim=1)


def pair_gram(sums: torch.Tensor) -> torch.Tensor:
    """The T x 2 x 2 Gram matrices of pairs from their T x 3 sums (x0·x0, x1·x1, x0·x1)."""
    aa, bb, ab = sums.unbind(1)
    return torch.stack([torch.stack([aa, ab], 1), torch.stack([ab, bb], 1)], 1)


def _gram_norms(gram: torch.Tensor) -> torch.Tensor:
    """The T x N norms of the tensors whose T x N x N Gram matrices these are."""
    return gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()


def _gram_length(coefficients: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The T x 1 norms of the combinations (T x N ``coefficients``) of tensors with these Gram
    matrices."""
    squared = torch.einsum("ti,tij,tj->t", coefficients, gram, coefficients)
    return squared.clamp(min=0).sqrt().unsqueeze(-1)


def karcher_coefficients(
    gram: torch.Tensor, alphas: Sequence[float], *, max_iter: int, tol: float
) -> torch.Tensor:
    """:func:`karcher` of N tensors as T x N coefficients on the tensors themselves, from their
    T x N x N Gram matrices (fp64), for T sets at once. Every iterate of the Karcher mean lies
    in the span of the tensors' directions, so the iteration runs on N coefficients, with
    mergekit's steps and stopping rules (per set: a set that stopped keeps its mean) until
    every set has stopped; only the result touches the tensors. In fp64, this is the exact
    algorithm that :func:`karcher` rounds to the tensors' dtype at every step. Meant for the
    host: each step is a few dozen tiny operations."""
    count = gram.shape[-1]
    norms = _gram_norms(gram)
    inverse = torch.where(norms > 0, 1 / norms, 0)
    units = gram * inverse.unsqueeze(-1) * inverse.unsqueeze(-2)  # the directions' Gram

    alpha = torch.tensor(list(alphas), dtype=gram.dtype, device=gram.device).expand_as(norms)
    valid = norms > tol
    weights = torch.where(valid, alpha, 0)
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, 1)
    first = torch.nn.functional.one_hot(valid.to(torch.int8).argmax(-1), count).to(gram.dtype)
    mean = weights
    mean_norm = _gram_length(mean, units)
    mean = torch.where(mean_norm < tol, first, mean / torch.where(mean_norm > 0, mean_norm, 1))
    stopped = torch.zeros_like(mean_norm, dtype=torch.bool)
    for _ in range(max_iter):
        dots = torch.einsum("tij,tj->ti", units, mean).clamp(-1, 1)
        theta = torch.arccos(dots)
        moving = valid & (theta >= tol)
        pull = torch.where(moving, weights * theta / torch.where(moving, torch.sin(theta), 1), 0)
        tangent = pull - (pull * dots).sum(-1, keepdim=True) * mean
        tangent_norm = _gram_length(tangent, units)
        stopped = stopped | (tangent_norm < tol)
        step = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (
            tangent / torch.where(tangent_norm > 0, tangent_norm, 1)
        )
        step_norm = _gram_length(step, units)
        step = torch.where(step_norm > tol, step / step_norm, step)
        mean = torch.where(stopped, mean, step)
        if bool(stopped.all()):
            break
    scale = (alpha * norms).sum(-1, keepdim=True)
    coefficients = torch.where(valid.any(-1, keepdim=True), scale * mean * inverse, 0)
    if count == 1:  # one tensor is returned as it is
        coefficients = torch.ones_like(coefficients)
    return coefficients


def multislerp_coefficients(
    gram: torch.Tensor, weights: Sequence[float], *, normalize_weights: bool, eps: float
) -> torch.Tensor:
    """:func:`multislerp` of N task vectors as T x N coefficients on them, from their T x N x N
    Gram matrices (fp64), for T tensors at once: the result, like every step, lies in their
    span. Two task vectors whose unit vectors cancel are lerped (as :func:`multislerp`); for
    more, the caller takes the torch path, which refuses them."""
    w = torch.tensor(list(weights), dtype=gram.dtype, device=gram.device)
    if normalize_weights:
        w = w / w.sum()
    norms = _gram_norms(gram)
    inverse = 1 / (norms + eps)  # the units are the task vectors over (norm + eps)

    mean = w * inverse
    mean_norm = _gram_length(mean, gram)
    mean = mean / torch.where(mean_norm < eps, 1, mean_norm)
    dots = inverse * torch.einsum("tij,tj->ti", gram, mean)  # each unit vector's dot with mean
    tangent = w * inverse - (w * dots).sum(-1, keepdim=True) * mean
    tangent_norm = _gram_length(tangent, gram) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms * w).sum(-1, keepdim=True)
    return torch.where(mean_norm < eps, w.expand_as(result), result)


def model_stock_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """:func:`model_stock` (over whole tensors) of N task vectors as T x N coefficients on them,
    from their T x N x N Gram matrices (fp64): each is t/N, t from their mean pairwise cosine."""
    count = gram.shape[-1]
    norms = _gram_norms(gram)
    cosines = (gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp(min=1e-6)).clamp(-1, 1)
    pairs = torch.triu_indices(count, count, offset=1)
    cos_theta = cosines[:, pairs[0], pairs[1]].mean(-1, keepdim=True)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, count * cos_theta / torch.where(singular, 1, denominator))
    return (t / count).expand(-1, count)


def nearswap(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``v1`` where it is within ``t`` of ``v0``, else a step from ``v0`` towards ``v1`` of
    length ``t`` (the weight t / |v0 − v1|, clamped to [0, 1]; mergekit's ``nearswap``)."""
    weight = (t / torch.abs(v0 - v1).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * v1 + (1 - weight) * v0


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """Spherical interpolation of ``v0`` and ``v1`` (same shape) over the last dimension, over
    rows (``row_wise``: dimension 0) or the whole tensor (``flatten``), in the input dtype;
    lerp where the two are colinear (mergekit's ``nuslerp``)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= 1e-8**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def model_stock(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, filter_wise: bool
) -> torch.Tensor:
    """Model Stock: t·mean(experts) + (1 − t)·base with t = N·cosθ / (1 + (N − 1)·cosθ), cosθ
    the mean pairwise cosine of the task vectors, over the whole tensor or per row
    (``filter_wise``); the base where the denominator vanishes."""
    shape = base.shape
    w0, ws = base, list(experts)
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for index, a in enumerate(offsets):
        for b in offsets[index + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average: torch.Tensor = sum(ws) / count  # type: ignore[assignment]
    return (t * average + (1 - t) * w0).reshape(shape)


def multislerp(
    base: torch.Tensor | None,
    experts: torch.Tensor,
    weights: Sequence[float],
    *,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of the task vectors (``experts`` N x shape,
    minus ``base`` when given): their unit vectors' weighted mean, the weighted tangent
    vectors there mapped back by the exponential map, scaled to the weighted mean norm (mergekit's
    ``multislerp``). One expert is returned as it is; two that cancel are lerped."""
    if experts.shape[0] == 1:
        return experts[0]
    tensors = experts - base if base is not None else experts.clone()
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(list(weights), dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] != 2:
            raise ValueError("multislerp: the weighted sum of the task vectors is zero")
        result = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return result + base if base is not None else result
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return result + base if base is not None else result


def karcher(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the tensors' directions on the unit hypersphere by
    at most ``max_iter`` tangent steps (stopping under ``tol``), scaled by the weighted mean of
    their norms (mergekit's ``karcher``); norms at or under ``tol`` are left out of the mean."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
        for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)  # type: ignore[return-value]
    alpha_sum = sum(alphas[index] for index in valid)
    weights = [alphas[index] / alpha_sum for index in valid]
    points = [units[index] for index in valid]
    mean = torch.zeros_like(points[0])
    for alpha, unit in zip(weights, points, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        step = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        mean = step.to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean
