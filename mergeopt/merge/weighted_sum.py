"""The weighted-sum form of the methods that are one (``linear``, ``task_arithmetic``):
``[base +] scale · Σ c_i·stack[i]``, its coefficients and scale from the experts' weights and
the method's parameters, rounded as mergekit rounds them; the one-pass fast path of
:class:`mergeopt.merge.plan.MergePlan` computes it. Also the parameter mappings' types."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from mergeopt.merge.sparsification import _coefficients, _rounded_sum

ExpertParams = Sequence[Mapping[str, float]]
MethodParams = Mapping[str, float | bool]

WeightedSum = Callable[
    [ExpertParams, MethodParams, torch.dtype, torch.device], tuple[torch.Tensor, float]
]
"""``(coefficients, scale)`` of a method that is ``[base +] scale · Σ c_i·stack[i]``: the
coefficients as a device tensor of ``dtype`` (read-only), for the one-pass fast path."""
ScaleRule = Callable[[tuple[float, ...], MethodParams, torch.dtype], float]
"""``scale`` of a weighted-sum method from the experts' weights, its parameters and the dtype."""


def weights_times(scale_rule: ScaleRule) -> WeightedSum:
    """The :data:`WeightedSum` with the experts' weights as coefficients, scaled by the rule."""

    def weighted_sum(
        experts: ExpertParams, params: MethodParams, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, float]:
        weights = tuple(float(p["weight"]) for p in experts)
        return _coefficients(weights, dtype, device), scale_rule(weights, params, dtype)

    return weighted_sum


def task_arithmetic_scale(w: tuple[float, ...], params: MethodParams, dtype: torch.dtype) -> float:
    """task_arithmetic's divisor sums the weights ``w`` as mergekit rounds them (to ``dtype``)."""
    divisor = _rounded_sum(w, dtype)
    divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    return float(params["lambda"]) / (divisor if params["normalize"] else 1.0)


def linear_scale(weights: tuple[float, ...], params: MethodParams, dtype: torch.dtype) -> float:
    return 1.0 / sum(weights) if params["normalize"] else 1.0
