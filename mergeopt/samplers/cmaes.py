"""CMA-ES with Sakana's evolutionary-merge defaults, scalarized for several objectives.

Algorithm: CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) from the
``cmaes`` package, with the defaults of Sakana AI's evolutionary model merge (Akiba et al.,
arXiv:2403.13187): search in the unit cube, ``x0 = 0.5``, ``sigma0 = 1/6``, population size
``4 + floor(3 ln n)``. Several objectives are reduced to one (minimized) value per trial:

- ``scalarization: weighted`` (mergekit-evolve's weighted tasks): ``sum_i w_i m_i``;
- ``scalarization: chebyshev``: ``max_i w_i (m_i - z_i)`` with ``z`` the best value of each
  objective seen in the study (the ideal point), ``w`` the preference vector;

where ``m_i`` is objective ``i`` turned into minimization (maximized objectives negated).

Parallel evaluation and resume: each generation's ``popsize`` individuals are handed out by the
batch protocol of :mod:`mergeopt.samplers._state` (waiting workers get one each, the rest are
enqueued), so K workers evaluate one generation together. The optimizer state (generation,
mean, sigma, covariance C, evolution paths p_sigma and p_c, and the generation's individuals)
is JSON in the study system attrs ``mergeopt:cmaes:state`` (chunked), never pickled; each
trial carries ``mergeopt:cmaes:generation`` and ``mergeopt:cmaes:index`` user attrs. A run
killed mid-generation resumes at the same generation: its individuals are in the state, the
finished ones are in the study, a dead worker's trial comes back through Optuna's
``RetryFailedTrialCallback`` (same params and attrs), and an individual with no trial at all is
handed out again. The generation is told to CMA-ES once every individual has a finished trial.

Failed trials (FAIL/PRUNED, no retry pending) are told with a **penalty**: the worst scalarized
value of the generation plus the generation's range (so a failure ranks last without
distorting the scale). If every individual of a generation failed, the generation is sampled
again from the unchanged distribution (same generation number).

Extra trials: with a shared RDB storage, a worker that asks while the generation is still being
evaluated waits (at most one generation). In a single process with in-memory storage (plain
Optuna code that asks K trials before telling them), waiting would deadlock on its own trials,
so such a trial gets an extra draw from the current distribution (``mergeopt:cmaes:index`` =
-1), evaluated but not told to CMA-ES.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mergeopt.attrs import TrialUserAttr, sampler_prefix
from mergeopt.optuna_compat import uses_in_memory_storage
from mergeopt.samplers._state import (
    Candidate,
    UnitCube,
    read_json_state,
    write_json_state,
)
from mergeopt.samplers.base import BatchedGenomeSampler
from mergeopt.seeds import derive_seed

if TYPE_CHECKING:
    from optuna import Study

    from mergeopt.genome import Genome

PREFIX = sampler_prefix("cmaes")
STATE_KEY = PREFIX + "state"
"""Study system attrs (chunked JSON, ``samplers._state.write_json_state``): the optimizer."""
GENERATION_ATTR: TrialUserAttr[int] = TrialUserAttr(PREFIX + "generation")
INDEX_ATTR: TrialUserAttr[int] = TrialUserAttr(PREFIX + "index")
"""The trial's individual in its generation (-1: an extra draw, not told to CMA-ES)."""


class ScalarizedCmaEsSampler(BatchedGenomeSampler):
    """CMA-ES over the unit cube of a numerical search space, shared by many workers.

    Args:
        x0: initial mean in the unit cube (Sakana: 0.5).
        sigma0: initial step size in the unit cube (Sakana: 1/6).
        popsize: population size; default ``4 + floor(3 ln n)``.
        scalarization: ``"weighted"`` or ``"chebyshev"`` (several objectives).
        weights: one weight per objective (default: equal weights summing to 1).
        seed: seed; the generation's random draws use ``seed + generation``.
        genome: the study's genome (else ``mergeopt:genome`` from the study): fixes the search
            space from the first trial on.
        num_objectives: number of objectives (checked against ``weights``).
        lock_ttl_seconds, settle_seconds, poll_seconds: batch protocol timing (see
            :mod:`mergeopt.samplers._state`).

    Example::

        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=ScalarizedCmaEsSampler(weights=[0.7, 0.3], seed=0))
    """

    def __init__(
        self,
        *,
        x0: float = 0.5,
        sigma0: float = 1 / 6,
        popsize: int | None = None,
        scalarization: str = "weighted",
        weights: Sequence[float] | None = None,
        seed: int | None = None,
        genome: Genome | None = None,
        num_objectives: int | None = None,
        lock_ttl_seconds: float = 120.0,
        settle_seconds: float | None = None,
        poll_seconds: float = 0.2,
    ) -> None:
        if not 0.0 <= x0 <= 1.0:
            raise ValueError(f"x0 must be in [0, 1] (the unit cube), got {x0}")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be > 0, got {sigma0}")
        if popsize is not None and (not isinstance(popsize, int) or popsize < 2):
            raise ValueError(f"popsize must be an integer >= 2, got {popsize!r}")
        if scalarization not in ("weighted", "chebyshev"):
            raise ValueError(
                f"scalarization must be 'weighted' or 'chebyshev', got {scalarization!r}"
            )
        if weights is not None:
            if any(not float(w) >= 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
            if num_objectives is not None and len(weights) != num_objectives:
                raise ValueError(
                    f"weights needs one value per objective ({num_objectives}), got {len(weights)}"
                )
        self._x0 = float(x0)
        self._sigma0 = float(sigma0)
        self._popsize = popsize
        self._scalarization = scalarization
        self._weights = None if weights is None else [float(w) for w in weights]
        timing = (lock_ttl_seconds, settle_seconds, poll_seconds)
        super().__init__(PREFIX, seed=seed, genome=genome, timing=timing)

    def _sample_numerical(
        self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        cube = UnitCube(space)
        return self._coordinator.run(study, trial, lambda n: self._produce(study, cube, n))

    # -- state -------------------------------------------------------------------------------

    def _new_optimizer(self, dimension: int, generation: int) -> Any:
        import cmaes

        popsize = self._popsize or 4 + math.floor(3 * math.log(dimension))
        return cmaes.CMA(
            mean=np.full(dimension, self._x0),
            sigma=self._sigma0,
            bounds=np.array([[0.0, 1.0]] * dimension),
            seed=self._generation_seed(generation),
            population_size=popsize,
        )

    def _generation_seed(self, generation: int) -> int:
        return derive_seed(0 if self._seed is None else self._seed, generation, bits=32)

    def _restore(self, state: dict[str, Any]) -> Any:
        import cmaes

        optimizer = cmaes.CMA(
            mean=np.array(state["mean"]),
            sigma=float(state["sigma"]),
            bounds=np.array([[0.0, 1.0]] * len(state["mean"])),
            seed=self._generation_seed(int(state["generation"])),
            population_size=int(state["popsize"]),
            cov=np.array(state["C"]),
        )
        optimizer._p_sigma = np.array(state["p_sigma"])
        optimizer._pc = np.array(state["p_c"])
        optimizer._g = int(state["generation"])
        return optimizer

    @staticmethod
    def _snapshot(optimizer: Any, names: list[str], individuals: np.ndarray) -> dict[str, Any]:
        return {
            "version": 1,
            "param_names": names,
            "generation": int(optimizer._g),
            "popsize": int(optimizer.population_size),
            "mean": optimizer._mean.tolist(),
            "sigma": float(optimizer._sigma),
            "C": optimizer._C.tolist(),
            "p_sigma": optimizer._p_sigma.tolist(),
            "p_c": optimizer._pc.tolist(),
            "individuals": individuals.tolist(),
        }

    def _candidates(
        self,
        cube: UnitCube,
        generation: int,
        individuals: Sequence[Sequence[float]],
        indices: list[int],
    ) -> list[Candidate]:
        return [
            (
                cube.from_unit(np.array(individuals[i])),
                {GENERATION_ATTR: generation, INDEX_ATTR: i},
            )
            for i in indices
        ]

    def _new_generation(self, study: Study, cube: UnitCube, optimizer: Any) -> list[Candidate]:
        individuals = np.array([optimizer.ask() for _ in range(optimizer.population_size)])
        state = self._snapshot(optimizer, cube.names, individuals)
        write_json_state(study, STATE_KEY, state)
        return self._candidates(
            cube, state["generation"], state["individuals"], list(range(len(individuals)))
        )

    def _produce(self, study: Study, cube: UnitCube, needed: int) -> list[Candidate]:
        state = read_json_state(study, STATE_KEY)
        if state is None or state["param_names"] != cube.names:
            optimizer = self._new_optimizer(cube.dimension, generation=0)
            return self._new_generation(study, cube, optimizer)
        generation = int(state["generation"])
        popsize = int(state["popsize"])
        done: dict[int, FrozenTrial] = {}
        pending: set[int] = set()
        failed: set[int] = set()
        for t in study.get_trials(deepcopy=False):
            attrs = t.user_attrs
            if GENERATION_ATTR not in attrs:
                assigned = t.system_attrs.get(self._coordinator.assigned_key) or {}
                attrs = assigned.get("user_attrs", {})
            if attrs.get(GENERATION_ATTR) != generation:
                continue
            index = int(attrs[INDEX_ATTR])
            if index < 0:  # an extra draw (see below), not a member of the generation
                continue
            if t.state == TrialState.COMPLETE:
                done[index] = t
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                pending.add(index)
            else:
                failed.add(index)
        pending -= set(done)
        failed -= set(done) | pending
        missing = [
            i for i in range(popsize) if i not in done and i not in pending and i not in failed
        ]
        if missing:  # e.g. a fitter died between writing the state and handing out
            return self._candidates(cube, generation, state["individuals"], missing)
        if pending:
            if not uses_in_memory_storage(study):
                return []  # other workers are evaluating this generation: wait for them
            # One process asks several trials before telling them (ask-K-then-tell-K): waiting
            # would deadlock on its own trials, so it gets an extra draw of this generation,
            # evaluated but not told to CMA-ES (index -1).
            extra = self._restore(state)
            extra._rng = np.random.RandomState(
                self._generation_seed(generation) + 7919 * (1 + len(done) + len(pending))
            )
            return [(cube.from_unit(extra.ask()), {GENERATION_ATTR: generation, INDEX_ATTR: -1})]
        optimizer = self._restore(state)
        if not done:  # every individual failed: sample this generation again
            return self._new_generation(study, cube, optimizer)
        values = self._scalarize(study, [done[i] for i in sorted(done)])
        by_index = dict(zip(sorted(done), values, strict=True))
        worst, best = max(values), min(values)
        penalty = worst + max(worst - best, 1e-12)
        solutions = [
            (np.array(state["individuals"][i]), float(by_index.get(i, penalty)))
            for i in range(popsize)
        ]
        optimizer.tell(solutions)
        return self._new_generation(study, cube, optimizer)

    def _scalarize(self, study: Study, trials: list[FrozenTrial]) -> list[float]:
        directions = study.directions
        signs = np.array([1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in directions])
        weights = (
            np.full(len(directions), 1.0 / len(directions))
            if self._weights is None
            else np.array(self._weights)
        )
        if len(weights) != len(directions):
            raise ValueError(
                f"cmaes weights has {len(weights)} values but the study has "
                f"{len(directions)} objectives"
            )
        values = np.array([t.values for t in trials], dtype=float) * signs
        values = np.where(np.isfinite(values), values, np.nan)
        worst = np.nanmax(values, axis=0) if np.isfinite(values).any() else np.zeros(len(signs))
        values = np.where(np.isnan(values), worst, values)
        if self._scalarization == "weighted":
            return (values @ weights).tolist()
        everything = [
            t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]
        all_values = np.array(everything, dtype=float) * signs
        ideal = np.nanmin(np.where(np.isfinite(all_values), all_values, np.nan), axis=0)
        return np.max(weights * (values - ideal), axis=1).tolist()


__all__ = ["ScalarizedCmaEsSampler", "STATE_KEY", "GENERATION_ATTR", "INDEX_ATTR"]
