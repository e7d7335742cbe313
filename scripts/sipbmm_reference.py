"""Benchmark baselines: the optimizer SIPBMM and AP-BMM released, re-implemented as Optuna samplers.

Not a product sampler: it exists so ``scripts/bench_samplers.py`` can measure mergeopt's samplers
against the optimizer the SIPBMM / AP-BMM authors actually ran (``saasbo_qnehvi_optimizer.py`` of
their 2026 repositories). What it reproduces, from reading that code:

- one MAP-fitted ``SingleTaskGP`` per objective (``ModelListGP``), Matern-5/2 ARD kernel with
  lengthscales constrained to [0.005, 10] under a ``ScaleKernel``; inputs normalized, outcomes
  standardized; their "SAAS" switch is a Gamma(1.1, 0.05) prior on the noise (not the fully
  Bayesian SAAS model; the Gamma(2, 0.15) output-scale prior their code assigns as a plain
  attribute is never registered with gpytorch, so it has no effect there and is left out here);
- the importance prior: before the fit, each dimension's lengthscale starts at 0.5 / 1 / 2 / 5 by
  the rank of its block's importance (top 15% / 40% / 70% / the rest), and only while fewer than
  24 evaluations exist (AP-BMM's ``importance_prior_cutoff_evals``);
- qLogNEHVI with 128 Sobol MC samples, optimized jointly for a batch of q points with 10 restarts
  and 512 raw samples (``batch_limit`` 5, ``maxiter`` 100);
- ``rerank=True`` is AP-BMM: pending-aware (running trials are the acquisition's ``X_pending``),
  and a pool of 3q candidates optimized sequentially is re-ranked greedily by normalized
  acquisition value + 0.25 x frontier-gap reward - 0.15 x proximity to pending and already chosen
  points (``_select_gap_aware_indices`` there).

Differences, on purpose: the first ``n_startup_trials`` points are Optuna's random sampling (as for
every model-based row of the benchmark) instead of their Sobol/LHS design of 10; no artificial
observation noise is added to the values (their scripts add N(0, 0.01^2) to every observation);
the hypervolume reference point is the worst observed value of each objective minus 10% of its
observed range (theirs is a fixed -1.1 on pre-normalized objectives).

Usage (what bench_samplers.py does)::

    sampler = SipbmmReferenceSampler(seed=0, n_startup_trials=4, batch_size=4)
    sampler = SipbmmReferenceSampler(seed=0, rerank=True)   # AP-BMM
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

IMPORTANCE_ATTR = "mergeopt:block_importance"  # the study user attr bench_samplers.py sets
_BLOCK = re.compile(r"^b(\d+)\.")


def lengthscales_by_rank(importance: Sequence[float]) -> np.ndarray:
    """Initial lengthscale per dimension: 0.5 / 1 / 2 / 5 by importance rank (most important first).

    Ties keep index order (a stable sort), as the released code does.
    """
    values = np.asarray(importance, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    rank = np.empty(len(values), dtype=np.float64)
    rank[order] = np.arange(len(values))
    ratio = rank / max(len(values) - 1, 1)
    return np.select([ratio <= 0.15, ratio <= 0.40, ratio <= 0.70], [0.5, 1.0, 2.0], default=5.0)


def frontier_gap_reward(candidate_means: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """How close each predicted point (n x m, maximized) lies to a large gap of the observed front.

    A Gaussian bump at the midpoint of each pair of neighbouring front points (sorted by the first
    objective), weighted by the gap's length relative to the largest gap; 0 when the front has
    fewer than two points.
    """
    front = observed[_non_dominated(observed)]
    if len(front) < 2 or len(candidate_means) == 0:
        return np.zeros(len(candidate_means))
    front = front[np.argsort(front[:, 0])]
    gaps = np.linalg.norm(front[1:] - front[:-1], axis=1)
    midpoints = 0.5 * (front[1:] + front[:-1])
    spread = np.maximum(front.max(axis=0) - front.min(axis=0), 1e-6)
    sigma = max(float(np.linalg.norm(spread)) / max(1, len(front) - 1), 1e-3)
    distances = np.linalg.norm(candidate_means[:, None, :] - midpoints[None, :, :], axis=2)
    weights = gaps / max(float(gaps.max()), 1e-8)
    return (np.exp(-0.5 * (distances / sigma) ** 2) * weights[None, :]).max(axis=1)


def select_gap_aware(
    candidates: np.ndarray,
    acquisition: np.ndarray,
    means: np.ndarray,
    observed: np.ndarray,
    q: int,
    pending: np.ndarray | None,
    *,
    gap_weight: float = 0.25,
    proximity_weight: float = 0.15,
) -> list[int]:
    """Indices of ``q`` of the pool's ``candidates`` (n x d, unit cube), chosen greedily by
    normalized acquisition + ``gap_weight`` x gap reward - ``proximity_weight`` x proximity to the
    pending and already chosen points (exp(-4 x nearest distance), normalized)."""
    base = _unit(acquisition)
    gap = _unit(frontier_gap_reward(means, observed))
    remaining = list(range(len(candidates)))
    chosen: list[int] = []
    for _ in range(min(q, len(candidates))):
        score = base[remaining] + gap_weight * gap[remaining]
        avoid = [p for p in (pending, candidates[chosen] if chosen else None) if p is not None]
        avoid = [p for p in avoid if len(p)]
        if avoid:
            points = np.concatenate(avoid)
            nearest = np.linalg.norm(
                candidates[remaining][:, None, :] - points[None, :, :], axis=2
            ).min(axis=1)
            score = score - proximity_weight * _unit(np.exp(-4.0 * nearest))
        chosen.append(remaining.pop(int(np.argmax(score))))
    return chosen


class SipbmmReferenceSampler(optuna.samplers.BaseSampler):
    """SIPBMM's released optimizer (``rerank=False``) or AP-BMM's (``rerank=True``); see the module.

    Args:
        seed: seeds the random startup points and the acquisition's MC samples and restarts.
        n_startup_trials: random points before the first model fit.
        batch_size: q, the points proposed together (handed out one per ``ask``).
        rerank: AP-BMM's pending-aware, frontier-gap re-ranked batches.
        importance_cutoff: evaluations after which the importance lengthscale init stops.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 4,
        batch_size: int = 4,
        rerank: bool = False,
        importance_cutoff: int = 24,
        num_restarts: int = 10,
        raw_samples: int = 512,
        mc_samples: int = 128,
    ) -> None:
        self._seed = 0 if seed is None else seed
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._n_startup = n_startup_trials
        self._batch_size = batch_size
        self._rerank = rerank
        self._cutoff = importance_cutoff
        self._restarts = num_restarts
        self._raw_samples = raw_samples
        self._mc_samples = mc_samples
        self._queue: list[dict[str, float]] = []
        self._queued_at = -1  # completed trials when the queue was proposed
        self._calls = 0

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        space = optuna.search_space.intersection_search_space(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        )
        return {n: d for n, d in sorted(space.items()) if isinstance(d, FloatDistribution)}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not search_space or len(complete) < self._n_startup:
            return {}
        # SIPBMM is synchronous: a batch is handed out whole. AP-BMM is asynchronous: a batch
        # proposed before the latest result is stale.
        if self._queue and (not self._rerank or self._queued_at == len(complete)):
            return self._queue.pop(0)
        running = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number != trial.number and set(search_space) <= set(t.params)
        ]
        q = max(1, self._batch_size - len(running)) if self._rerank else self._batch_size
        batch = self._propose(study, complete, running, search_space, q)
        self._queue, self._queued_at = batch[1:], len(complete)
        return batch[0]

    def _propose(
        self,
        study: optuna.Study,
        complete: list[FrozenTrial],
        running: list[FrozenTrial],
        space: dict[str, BaseDistribution],
        q: int,
    ) -> list[dict[str, float]]:
        import torch
        from botorch.acquisition.multi_objective.logei import (
            qLogNoisyExpectedHypervolumeImprovement,
        )
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms import Normalize, Standardize
        from botorch.optim import optimize_acqf
        from botorch.sampling.normal import SobolQMCNormalSampler
        from gpytorch.constraints import Interval
        from gpytorch.kernels import MaternKernel, ScaleKernel
        from gpytorch.mlls import SumMarginalLogLikelihood
        from gpytorch.priors import GammaPrior

        self._calls += 1
        torch.manual_seed(self._seed * 1000 + self._calls)
        names = list(space)
        dim = len(names)
        x = torch.tensor([_to_unit(t.params, space) for t in complete], dtype=torch.double)
        signs = np.array(
            [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
        )
        observed = np.array([t.values for t in complete], dtype=np.float64) * signs
        y = torch.tensor(observed, dtype=torch.double)
        importance = _dimension_importance(study, names)
        use_prior = importance is not None and len(complete) < self._cutoff
        models = []
        for i in range(y.shape[1]):
            kernel = ScaleKernel(
                MaternKernel(nu=2.5, ard_num_dims=dim, lengthscale_constraint=Interval(0.005, 10.0))
            )
            if use_prior:
                kernel.base_kernel.lengthscale = torch.tensor(
                    lengthscales_by_rank(importance), dtype=torch.double
                ).view(1, dim)
            model = SingleTaskGP(
                x,
                y[:, i : i + 1],
                covar_module=kernel,
                input_transform=Normalize(d=dim),
                outcome_transform=Standardize(m=1),
            )
            model.likelihood.noise_covar.register_prior(
                "noise_prior", GammaPrior(1.1, 0.05), "raw_noise"
            )
            models.append(model)
        model = ModelListGP(*models)
        fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
        low, high = observed.min(axis=0), observed.max(axis=0)
        ref_point = torch.tensor(low - 0.1 * np.maximum(high - low, 1e-9), dtype=torch.double)
        pending = (
            torch.tensor([_to_unit(t.params, space) for t in running], dtype=torch.double)
            if running and self._rerank
            else None
        )
        acquisition = qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref_point.tolist(),
            X_baseline=x,
            prune_baseline=True,
            sampler=SobolQMCNormalSampler(
                sample_shape=torch.Size([self._mc_samples]), seed=self._seed + self._calls
            ),
            X_pending=pending,
        )
        bounds = torch.stack([torch.zeros(dim), torch.ones(dim)]).double()
        pool = 3 * max(2, q) if self._rerank else q
        candidates, _ = optimize_acqf(
            acq_function=acquisition,
            bounds=bounds,
            q=pool,
            num_restarts=self._restarts,
            raw_samples=self._raw_samples,
            options={"batch_limit": 5, "maxiter": 100},
            sequential=self._rerank,
        )
        chosen = list(range(q))
        if self._rerank:
            with torch.no_grad():
                values = np.array([float(acquisition(c.view(1, 1, -1))) for c in candidates])
                means = model.posterior(candidates).mean.numpy()
            chosen = select_gap_aware(
                candidates.numpy(),
                values,
                means,
                observed,
                q,
                None if pending is None else pending.numpy(),
            )
        return [_from_unit(candidates[i].tolist(), space) for i in chosen]


def _unit(values: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1] (0.5 everywhere when flat); non-finite entries become 0.5."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, 0.5)
    finite = np.isfinite(values)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        if high - low > 1e-8:
            out[finite] = (values[finite] - low) / (high - low)
    return out


def _non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``points`` (maximized) that no other row dominates."""
    better_eq = np.all(points[:, None, :] >= points[None, :, :], axis=2)
    better = np.any(points[:, None, :] > points[None, :, :], axis=2)
    dominated_by = better_eq & better  # [j, i]: row j dominates row i
    return ~dominated_by.any(axis=0)


def _dimension_importance(study: optuna.Study, names: list[str]) -> list[float] | None:
    """Each parameter's block importance (``bNN.`` prefix), or None when the study has none."""
    blocks = study.user_attrs.get(IMPORTANCE_ATTR)
    if not blocks:
        return None
    result = []
    for name in names:
        match = _BLOCK.match(name)
        result.append(float(blocks[int(match.group(1))]) if match else 0.5)
    return result


def _to_unit(params: dict[str, Any], space: dict[str, BaseDistribution]) -> list[float]:
    out = []
    for name, dist in space.items():
        assert isinstance(dist, FloatDistribution)
        low, high, value = dist.low, dist.high, float(params[name])
        if dist.log:
            low, high, value = np.log(low), np.log(high), np.log(value)
        out.append((value - low) / (high - low) if high > low else 0.5)
    return out


def _from_unit(unit: list[float], space: dict[str, BaseDistribution]) -> dict[str, float]:
    out = {}
    for u, (name, dist) in zip(unit, space.items(), strict=True):
        assert isinstance(dist, FloatDistribution)
        low, high = (np.log(dist.low), np.log(dist.high)) if dist.log else (dist.low, dist.high)
        value = low + min(max(u, 0.0), 1.0) * (high - low)
        value = float(np.exp(value)) if dist.log else float(value)
        if dist.step is not None:
            value = dist.low + round((value - dist.low) / dist.step) * dist.step
        out[name] = min(max(value, dist.low), dist.high)
    return out
