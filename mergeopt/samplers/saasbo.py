"""SAASBO + qLogNEHVI with a structural importance prior, as a batched, multi-worker sampler.

Algorithm:
    - Models: one GP per objective in a ``ModelListGP``, inputs in ``[0, 1]^d``, outputs
      standardized (``Standardize``), every objective turned into maximization.
      ``use_saas: true``: BoTorch's fully Bayesian SAAS GP fitted by NUTS (Eriksson & Jankowiak,
      "High-Dimensional Bayesian Optimization with Sparse Axis-Aligned Subspaces", UAI 2021;
      needs ``numpyro`` and ``jax``). ``use_saas: false`` (default, fast "MAP mode"): a Matérn-5/2
      ARD GP fitted by maximum a posteriori, with BoTorch's dimension-scaled log-normal
      lengthscale prior (Hvarfner et al., "Vanilla Bayesian Optimization Performs Great in High
      Dimensions", ICML 2024) shifted per dimension by the importance prior below, and the
      lengthscales initialized at the prior's median (SIPBMM's importance-initialized
      lengthscales).
    - Acquisition: ``qLogNoisyExpectedHypervolumeImprovement`` (Ament et al., "Unexpected
      Improvements to Expected Improvement", NeurIPS 2023; Daulton et al., qNEHVI, NeurIPS 2021)
      for several objectives, ``qLogNoisyExpectedImprovement`` for one; pruned baseline; the
      RUNNING and queued trials are pending points (asynchronous batches, as in AP-BMM).
    - Acquisition optimization: ``num_restarts=4, raw_samples=256`` by default, the q points
      optimized jointly, and the raw starting points include the Pareto set (best point for
      one objective) jittered ("warm starts").

Structural importance prior (``enable_importance_prior``): see
:mod:`mergeopt.samplers.saasbo_gp`.

Initial design: ``custom_initial_solutions`` first (``"0.55,0.8"`` = one value per searched
parameter in genome order — weight, density — broadcast to every block and expert); then, with
``expert_design`` (default) and a block genome, each expert alone as ``enqueue_experts`` makes
it (skipped when the study already enqueued it), on top of ``n_startup_trials``: a study
without enqueued experts then runs exactly as one with them; the experts are known trade-offs
at both ends of the front, and on the zoo they lifted the hypervolume from scratch by 4-5% at
24 and 48 evaluations (``docs/bench/samplers-2026-11-30-rows48.md``); then Sobol
(``startup_design: sobol``, scrambled, seeded) or Latin hypercube (``lhs``) points until
``n_startup_trials`` design points (custom solutions included) were handed out. The design
index of a trial is the number of earlier trials that were not enqueued, so workers need no
lock for it and never collide.

Parallel workers: after the design, fits are serialized by the batch protocol of
:mod:`mergeopt.samplers._state`: one worker fits and makes ``max(batch_size, 1 + waiting
workers)`` candidates, hands one to each waiting worker and enqueues the rest; everything is
re-read from the study, nothing pickled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mergeopt import attrs
from mergeopt.attrs import TrialUserAttr, sampler_prefix
from mergeopt.optuna_compat import fixed_params
from mergeopt.samplers._state import (
    Candidate,
    UnitCube,
    dimension_importance,
    genome_of,
    trial_unit_params,
)
from mergeopt.samplers.base import BatchedGenomeSampler, design_index
from mergeopt.samplers.saasbo_acquisition import propose_batch

if TYPE_CHECKING:
    from optuna import Study

    from mergeopt.genome import Genome

_logger = logging.getLogger(__name__)
PREFIX = sampler_prefix("saasbo")
FIT_SECONDS_ATTR: TrialUserAttr[float] = TrialUserAttr(PREFIX + "fit_seconds")
"""Model fit time of the trial's batch."""
ACQ_SECONDS_ATTR: TrialUserAttr[float] = TrialUserAttr(PREFIX + "acq_seconds")
"""Acquisition time of the trial's batch."""
_warned_uniform_importance = False
STOPPED_TRIALS = ("observe", "ignore")


def parse_initial_solutions(solutions: str | Sequence[str] | None) -> list[list[float]]:
    """``"0.55,0.8"`` or ``["0.55,0.8", "0.3,0.9"]`` -> ``[[0.55, 0.8], [0.3, 0.9]]``."""
    if solutions is None:
        return []
    items = [solutions] if isinstance(solutions, str) else list(solutions)
    parsed = []
    for item in items:
        try:
            parsed.append([float(v) for v in str(item).split(",")])
        except ValueError as exc:
            raise ValueError(
                f"custom_initial_solutions: {item!r} is not comma-separated numbers"
            ) from exc
    return parsed


class SaasQnehviSampler(BatchedGenomeSampler):
    """Batched multi-objective BO (SAAS or MAP GPs + qLogNEHVI) shared by many workers.

    Args:
        use_saas: fully Bayesian SAAS GPs fitted by NUTS (slow, needs numpyro/jax) instead of
            MAP Matérn GPs.
        warmup_steps, num_samples, thinning: NUTS settings (``use_saas`` only).
        batch_size: q, candidates per fit.
        num_restarts, raw_samples, maxiter: acquisition optimization effort.
        sequential: optimize the q points one after another (BoTorch's sequential greedy)
            instead of jointly.
        mc_samples: quasi-Monte-Carlo samples of the acquisition.
        ref_point: hypervolume reference point in the objectives' own units and directions;
            default: derived from the data by ``ref_point_rule``.
        ref_point_rule: how the default reference point is derived, per objective (in
            maximization form): ``"observed-worst"`` (default): the worst observed value minus
            10% of the observed range; ``"pareto-nadir"`` (BoTorch's ``infer_reference_point``,
            as Ax does): the worst value on the current Pareto front minus 10% of the front's
            range.
        prune_baseline: prune baseline points unlikely to be on the Pareto front.
        n_startup_trials: design points before the first fit.
        startup_design: ``"sobol"`` or ``"lhs"``.
        custom_initial_solutions: see the module docstring.
        expert_design: each expert alone first in the design (module docstring); ``False``
            for a design of only ``custom_initial_solutions`` and Sobol/LHS points.
        stopped_trials: trials stopped early by fidelity rungs (PRUNED, with their estimated
            values in ``mergeopt:stopped_values``): ``"observe"`` (default) fits them as
            observations like COMPLETE trials, so the model learns where hopeless merges lie;
            ``"ignore"`` leaves them out (``docs/bench/fidelity-*.md`` compares the two).
        enable_importance_prior, importance_strength, lengthscale_prior_scale: the structural
            prior (:mod:`mergeopt.samplers.saasbo_gp`); ``enable_importance_prior=False`` for
            ablations.
        seed: seed of the design and of the acquisition optimization.
        genome: the study's genome (else ``mergeopt:genome`` from the study).
        num_objectives: number of objectives (checked against ``ref_point``).
        num_threads: torch threads during fit and acquisition (restored afterwards); set 1
            when several workers share the CPU cores (OpenMP threads spin on oversubscribed
            cores).
        lock_ttl_seconds, settle_seconds, poll_seconds: batch protocol timing.

    Example::

        sampler = SaasQnehviSampler(batch_size=4, n_startup_trials=8, seed=0)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    """

    def __init__(
        self,
        *,
        use_saas: bool = False,
        warmup_steps: int = 256,
        num_samples: int = 128,
        thinning: int = 16,
        batch_size: int = 4,
        num_restarts: int = 4,
        raw_samples: int = 256,
        maxiter: int = 100,
        sequential: bool = False,
        mc_samples: int = 128,
        ref_point: Sequence[float] | None = None,
        prune_baseline: bool = True,
        ref_point_rule: str = "observed-worst",
        n_startup_trials: int = 10,
        startup_design: str = "sobol",
        custom_initial_solutions: str | Sequence[str] | None = None,
        expert_design: bool = True,
        stopped_trials: str = "observe",
        enable_importance_prior: bool = True,
        importance_strength: float = 2.0,
        lengthscale_prior_scale: float = math.sqrt(3.0),
        seed: int | None = None,
        genome: Genome | None = None,
        num_objectives: int | None = None,
        num_threads: int | None = None,
        lock_ttl_seconds: float = 900.0,
        settle_seconds: float | None = None,
        poll_seconds: float = 0.2,
    ) -> None:
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.num_threads = num_threads
        for name, value, minimum in (
            ("warmup_steps", warmup_steps, 1),
            ("num_samples", num_samples, 1),
            ("thinning", thinning, 1),
            ("batch_size", batch_size, 1),
            ("num_restarts", num_restarts, 1),
            ("raw_samples", raw_samples, 1),
            ("maxiter", maxiter, 1),
            ("mc_samples", mc_samples, 1),
            ("n_startup_trials", n_startup_trials, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if ref_point_rule not in ("pareto-nadir", "observed-worst"):
            raise ValueError(
                f"ref_point_rule must be 'pareto-nadir' or 'observed-worst', got {ref_point_rule!r}"
            )
        if stopped_trials not in STOPPED_TRIALS:
            raise ValueError(
                f"stopped_trials must be 'observe' or 'ignore', got {stopped_trials!r}"
            )
        for name, value in (
            ("use_saas", use_saas),
            ("sequential", sequential),
            ("prune_baseline", prune_baseline),
            ("expert_design", expert_design),
            ("enable_importance_prior", enable_importance_prior),
        ):
            # bool("false") is True: a quoted YAML value would silently mean the opposite
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if startup_design not in ("sobol", "lhs"):
            raise ValueError(f"startup_design must be 'sobol' or 'lhs', got {startup_design!r}")
        if not importance_strength >= 0:
            raise ValueError(f"importance_strength must be >= 0, got {importance_strength}")
        if not lengthscale_prior_scale > 0:
            raise ValueError(f"lengthscale_prior_scale must be > 0, got {lengthscale_prior_scale}")
        if (
            ref_point is not None
            and num_objectives is not None
            and len(ref_point) != num_objectives
        ):
            raise ValueError(
                f"ref_point needs one value per objective ({num_objectives}), got {len(ref_point)}"
            )
        self._initial_solutions = parse_initial_solutions(custom_initial_solutions)
        if genome is not None:
            for solution in self._initial_solutions:
                if len(solution) != len(genome.searched):
                    raise ValueError(
                        f"custom_initial_solutions: {solution} needs one value per searched "
                        f"parameter ({', '.join(genome.searched)})"
                    )
        self.expert_design = bool(expert_design)
        self.use_saas = bool(use_saas)
        self.nuts = {"warmup_steps": warmup_steps, "num_samples": num_samples, "thinning": thinning}
        self.batch_size = batch_size
        self.num_restarts = num_restarts
        self.raw_samples = raw_samples
        self.maxiter = maxiter
        self.sequential = bool(sequential)
        self.mc_samples = mc_samples
        self.ref_point = None if ref_point is None else [float(v) for v in ref_point]
        self.prune_baseline = bool(prune_baseline)
        self.ref_point_rule = ref_point_rule
        self.n_startup_trials = n_startup_trials
        self.startup_design = startup_design
        self.stopped_trials = stopped_trials
        self.enable_importance_prior = bool(enable_importance_prior)
        self.importance_strength = float(importance_strength)
        self.lengthscale_prior_scale = float(lengthscale_prior_scale)
        timing = (lock_ttl_seconds, settle_seconds, poll_seconds)
        super().__init__(PREFIX, seed=seed, genome=genome, timing=timing)
        self.last_fit_seconds = 0.0
        self.last_acquisition_seconds = 0.0

    def _sample_numerical(
        self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        cube = UnitCube(space)
        index = design_index(study, trial)
        n_complete = sum(1 for _ in self._complete(study, cube))
        experts = self._expert_points(study, cube)
        if index < len(experts) + self.n_startup_trials or n_complete < 2:
            return self._design_point(study, cube, index, experts)
        return self._coordinator.run(study, trial, lambda n: self._propose(study, cube, n))

    # -- initial design ----------------------------------------------------------------------

    def _design_point(
        self, study: Study, cube: UnitCube, index: int, experts: list[dict[str, Any]]
    ) -> dict[str, Any]:
        if index < len(self._initial_solutions):
            solution = self._initial_solutions[index]
            from mergeopt.genome import Genome

            genome = genome_of(study, self._genome)
            if isinstance(genome, Genome) and len(solution) == len(genome.searched):
                values = dict(zip(genome.searched, solution, strict=True))
                per_expert = [values] * genome.num_experts
                broadcast = genome.broadcast(per_expert)
                if all(name in broadcast for name in cube.names):
                    return {name: broadcast[name] for name in cube.names}
            if len(solution) == 1:
                return cube.from_unit(cube.to_unit({n: solution[0] for n in cube.names}))
            _logger.warning("custom initial solution %s does not fit this search space", solution)
        index -= len(self._initial_solutions)
        if index < len(experts):
            return experts[index]
        index -= len(experts)
        from scipy.stats import qmc

        seed = 0 if self._seed is None else self._seed
        if self.startup_design == "sobol":
            sobol = qmc.Sobol(cube.dimension, scramble=True, seed=seed)
            if index:
                sobol.fast_forward(index)
            point = sobol.random(1)[0]
        else:
            # One Latin hypercube of n_startup_trials points per seed; index picks its row.
            size = max(self.n_startup_trials, index + 1)
            point = qmc.LatinHypercube(cube.dimension, seed=seed).random(size)[index]
        return cube.from_unit(point)

    def _expert_points(self, study: Study, cube: UnitCube) -> list[dict[str, Any]]:
        """Each expert alone (``expert_design``), less the experts the study enqueued.

        Every worker derives the same list (the enqueued trials exist before any design point
        is asked for), so design indices keep meaning the same point everywhere."""
        from mergeopt.genome import Genome

        genome = genome_of(study, self._genome)
        if not self.expert_design or not isinstance(genome, Genome):
            return []
        candidates = [genome.expert_alone(e) for e in range(genome.num_experts)]
        enqueued = [p for t in study.get_trials(deepcopy=False) if (p := fixed_params(t))]
        points: list[dict[str, Any]] = []
        for point in candidates:
            if not all(name in point for name in cube.names):
                return []  # the space is not the genome's: no expert is expressible in it
            params = {name: point[name] for name in cube.names}
            # without a searched weight every expert's point is the same one: evaluate it once
            if not any(all(p.get(n) == v for n, v in params.items()) for p in enqueued + points):
                points.append(params)
        return points

    # -- data ------------------------------------------------------------------------------

    def _complete(self, study: Study, cube: UnitCube) -> list[tuple[np.ndarray, list[float]]]:
        """Observations: COMPLETE trials, and stopped ones with their estimated values when
        ``stopped_trials`` is ``"observe"``."""
        states: tuple[TrialState, ...] = (TrialState.COMPLETE, TrialState.PRUNED)
        if self.stopped_trials == "ignore":
            states = (TrialState.COMPLETE,)
        data = []
        for t in study.get_trials(deepcopy=False, states=states):
            values = t.values if t.state == TrialState.COMPLETE else attrs.STOPPED_VALUES.get(t)
            x = trial_unit_params(t, cube)
            if x is not None and values is not None and all(map(math.isfinite, values)):
                data.append((x, list(values)))
        return data

    def _pending(self, study: Study, cube: UnitCube) -> list[np.ndarray]:
        pending = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            x = trial_unit_params(t, cube)
            if x is None:
                assigned = t.system_attrs.get(self._coordinator.assigned_key)
                if assigned and all(n in assigned["params"] for n in cube.names):
                    x = cube.to_unit(assigned["params"])
            if x is not None:
                pending.append(x)
        return pending

    def _importance(self, study: Study, names: list[str]) -> np.ndarray | None:
        global _warned_uniform_importance
        if not self.enable_importance_prior:
            return None
        importance = dimension_importance(names, attrs.BLOCK_IMPORTANCE.get(study))
        if (
            importance is None
            and genome_of(study, self._genome) is not None
            and not _warned_uniform_importance
        ):
            _logger.warning(
                "study has no %s: the importance prior is uniform", attrs.BLOCK_IMPORTANCE
            )
            _warned_uniform_importance = True
        return importance

    # -- model and acquisition ---------------------------------------------------------------

    def _propose(self, study: Study, cube: UnitCube, needed: int) -> list[Candidate]:
        data = self._complete(study, cube)
        signs = np.array([1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in study.directions])
        train_x = np.array([x for x, _ in data])
        train_y = np.array([y for _, y in data]) * signs  # every objective maximized
        importance = self._importance(study, cube.names)
        pending = self._pending(study, cube)
        q = max(self.batch_size, needed)
        ref_point = None
        if self.ref_point is not None:
            if len(self.ref_point) != len(signs):
                raise ValueError(
                    f"ref_point has {len(self.ref_point)} values, the study {len(signs)} objectives"
                )
            ref_point = np.array(self.ref_point) * signs
        points, fit_seconds, acq_seconds = propose_batch(
            train_x=train_x,
            train_y=train_y,
            pending_x=np.array(pending) if pending else None,
            q=q,
            importance=importance,
            ref_point=ref_point,
            sampler=self,
            seed=(0 if self._seed is None else self._seed) + len(data),
        )
        self.last_fit_seconds, self.last_acquisition_seconds = fit_seconds, acq_seconds
        timings: dict[str, Any] = {
            FIT_SECONDS_ATTR: round(fit_seconds, 3),
            ACQ_SECONDS_ATTR: round(acq_seconds, 3),
        }
        return [(cube.from_unit(point), dict(timings)) for point in points]


__all__ = ["ACQ_SECONDS_ATTR", "FIT_SECONDS_ATTR", "SaasQnehviSampler", "parse_initial_solutions"]
