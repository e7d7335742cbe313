"""How a preference baseline weighs its task losses at each step: the Chebyshev scalarization
and Exact Pareto Optimal (EPO) search, one entry each in :data:`DESCENTS`.

A preference ``r`` (positive, summing to 1) names the trade-off a user wants: the ray on which
``r_1 l_1 = r_2 l_2 = ... = r_m l_m`` (a larger ``r_k`` asks for a smaller loss ``l_k``). Each
step a baseline minimizes ``sum_k w_k l_k`` for the weights ``w`` its descent returns:

- ``chebyshev``: the weighted Chebyshev scalarization ``max_k r_k l_k`` (ideal point 0), whose
  gradient is ``r_k`` times the gradient of the task with the largest weighted loss;
- ``epo``: EPO search (Mahapatra & Rajan, "Exact Pareto Optimal Search for Multi-Task Learning
  and Multi-Criteria Decision-Making", arXiv 2108.00597, and ICML 2020): a small linear
  program over the tasks' gradient inner products ``C = G G^T`` chooses the convex combination
  ``beta`` of the task gradients that moves the losses towards the preference ray while none
  of them rises (balance), or, once on the ray, descends on every loss while staying there
  (descent). The program is the authors' ``EPO_LP`` (github.com/dbmptr/EPOSearch), solved with
  SciPy's HiGHS instead of cvxpy's GLPK.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

EPO_BALANCE_TOLERANCE = 1e-4
"""The non-uniformity ``mu`` below which EPO counts the losses as on the preference ray
(the authors' ``eps``)."""


@dataclass(frozen=True)
class Step:
    """One step's loss weights, and which move chose them (EPO: ``balance``, ``descent``,
    ``relaxed`` when the descent program had no solution; Chebyshev: ``max``)."""

    weights: list[float]
    move: str


def chebyshev_step(
    losses: Sequence[float], preference: Sequence[float], gram: np.ndarray | None = None
) -> Step:
    """``r_k`` on the task with the largest ``r_k l_k`` (the first among equals), 0 elsewhere:
    the gradient of ``max_k r_k l_k``."""
    weighted = [r * loss for r, loss in zip(preference, losses, strict=True)]
    worst = max(range(len(weighted)), key=lambda k: (weighted[k], -k))
    return Step([preference[k] if k == worst else 0.0 for k in range(len(losses))], "max")


def non_uniformity(losses: Sequence[float], preference: Sequence[float]) -> float:
    """EPO's ``mu(r * l)``: the KL divergence of the normalized weighted losses
    ``l_hat = r l / sum(r l)`` from uniform; 0 exactly on the preference ray."""
    import numpy as np

    weighted = np.asarray(preference, dtype=float) * np.asarray(losses, dtype=float)
    normalized = weighted / weighted.sum()
    kept = normalized[normalized > np.finfo(float).eps]
    return float(np.sum(kept * np.log(kept * len(weighted))))


def epo_step(losses: Sequence[float], preference: Sequence[float], gram: np.ndarray) -> Step:
    """EPO search's weights ``m * beta`` for one step (``gram``: ``C = G G^T``, m x m).

    With ``a = r * (log(m l_hat) - mu)`` the direction that restores balance and ``Ca = C a``:

    - balance (``mu > eps``): maximize ``beta . Ca`` over the simplex, subject to
      ``(C beta)_j >= Ca_j`` for tasks that ``a`` does not push up (``Ca_j <= 0``; they may not
      rise faster than balance needs) and ``(C beta)_j >= 0`` for the tasks of largest
      ``r_j l_j`` (they must not rise);
    - descent (on the ray): maximize ``sum(C beta)`` (the descent of all losses together),
      subject to ``C beta >= 0`` (no loss rises) and ``beta . Ca >= min(max(Ca), 0)`` (no
      drift off the ray); without a solution, the same without the drift constraint.
    """
    import numpy as np

    count = len(losses)
    r = np.asarray(preference, dtype=float)
    weighted = r * np.asarray(losses, dtype=float)
    if not np.all(np.isfinite(weighted)) or weighted.sum() <= 0:
        raise ValueError(f"EPO needs positive finite losses, got {list(losses)}")
    normalized = np.maximum(weighted / weighted.sum(), np.finfo(float).eps)
    mu = non_uniformity(losses, preference)
    adjustment = r * (np.log(normalized * count) - mu)
    c = np.asarray(gram, dtype=float)
    ca = c @ adjustment
    if mu > EPO_BALANCE_TOLERANCE:
        pushed_up = ca > 0
        worst = weighted == weighted.max()
        if pushed_up.any():
            kept = ~pushed_up | worst
            bound = np.where(worst, 0.0, ca)
        else:
            kept = np.ones(count, dtype=bool)
            bound = np.zeros(count)
        beta = _simplex_lp(objective=ca, rows=c[kept], bounds=bound[kept])
        move = "balance"
        if beta is None:  # no balancing combination: the relaxed descent below
            beta, move = _descent(c, ca, relaxed=True), "relaxed"
    else:
        beta, move = _descent(c, ca, relaxed=False), "descent"
        if beta is None:
            beta, move = _descent(c, ca, relaxed=True), "relaxed"
    if beta is None:  # even C beta >= 0 is infeasible: the plain mean of the task gradients
        beta, move = np.full(count, 1.0 / count), "mean"
    return Step([float(count * b) for b in beta], move)


def _descent(c: np.ndarray, ca: np.ndarray, *, relaxed: bool) -> np.ndarray | None:
    import numpy as np

    rows, bounds = c, np.zeros(len(c))
    if not relaxed:
        rows = np.vstack([c, ca])
        bounds = np.append(bounds, min(float(ca.max()), 0.0))
    return _simplex_lp(objective=c.sum(axis=0), rows=rows, bounds=bounds)


def _simplex_lp(
    *, objective: np.ndarray, rows: np.ndarray, bounds: np.ndarray
) -> np.ndarray | None:
    """``argmax objective . beta`` over the simplex subject to ``rows @ beta >= bounds``; None
    when infeasible."""
    import numpy as np
    from scipy.optimize import linprog

    count = len(objective)
    result = linprog(
        -np.asarray(objective),
        A_ub=-rows if len(rows) else None,
        b_ub=-bounds if len(rows) else None,
        A_eq=np.ones((1, count)),
        b_eq=[1.0],
        bounds=[(0, None)] * count,
        method="highs",
    )
    if result.status != 0:
        return None
    beta: np.ndarray = np.clip(result.x, 0.0, None)
    return beta / beta.sum()


@dataclass(frozen=True)
class Descent:
    """A baseline's way to weigh the task losses each step."""

    step: Callable[..., Step]
    needs_gradients: bool
    """Whether ``step`` reads the gradients' inner products (one backward pass per task)."""
    summary: str


DESCENTS: dict[str, Descent] = {
    "chebyshev": Descent(
        step=chebyshev_step,
        needs_gradients=False,
        summary="minimize max_k r_k * loss_k (weighted Chebyshev, ideal point 0)",
    ),
    "epo": Descent(
        step=epo_step,
        needs_gradients=True,
        summary="EPO search (arXiv 2108.00597): an LP over the task gradients' inner products "
        "balances r_k * loss_k onto the preference ray, then descends along it",
    ),
}
"""Baseline name -> its descent (``mergeopt baseline NAME``)."""
