"""CMA-ES with Sakana's evolutionary-merge defaults, scalarized for several objectives.

Algorithm: CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) from the
``cmaes`` package, with the defaults of Sakana AI's evolutionary model merge (Akiba et al.,
arXiv:2403.13187): search in the unit cube, ``x0 = 0.5``, ``sigma0 = 1/6``, population size
``4 + floor(3 ln n)``. Several objectives are reduced to one (minimized) value per trial:

- ``scalarization: weighted`` (mergekit-evolve's weighted tasks): ``sum_i w_i m_i``;
- ``scalarization: chebyshev``: ``max_i w_i (m_i - z_i)`` with ``z`` the best value of each
  objective seen in the study (the ideal point), ``w`` the preference vector;

where ``m_i`` is objective ``i`` turned into minimization (maximized objectives negated).

Parallel evaluation and resume: a generation's ``popsize`` individuals are drawn when the
generation starts and kept in the study, with the optimizer state (generation, mean, sigma,
covariance C, evolution paths p_sigma and p_c), as JSON in the study system attrs
``mergeopt:cmaes:state`` (chunked), never pickled. Nothing is enqueued: each new trial that
reaches ``sample_relative`` is handed the lowest-indexed individual that no live or finished
trial holds, under the fit lock of :mod:`mergeopt.samplers._state`'s batch protocol (the lock
holder also serves the trials waiting for it), so K workers evaluate one generation together,
``study.optimize(n_trials=N)`` leaves exactly N trials and ``PartialFixedSampler`` works. A
trial holds its individual through its ``assigned`` system attr (written at once, under the
lock) and the user attrs ``mergeopt:cmaes:generation`` and ``mergeopt:cmaes:index``; a retry
copy or a requeued copy of it holds the same one. An individual whose trial was given back
(``mergeopt:given_back``: surplus, interrupted, taken over, lost ask) is handed out again; one
whose worker died comes back through Optuna's ``RetryFailedTrialCallback``. A killed run thus
resumes at the same generation. The generation is told to CMA-ES once, by the lock holder that
finds every individual finished, in index order.

Failed trials (FAIL/PRUNED, not given back, no retry pending) are told with a **penalty**: the
worst scalarized value of the generation plus the generation's range (so a failure ranks last
without distorting the scale). If every individual of a generation failed, the generation is
drawn again from the unchanged distribution (same generation number, the next draw's seed; its
trials carry ``mergeopt:cmaes:draw``).

Draws are reproducible through the ``cmaes`` package's public ``reseed_rng``: the individuals of
generation ``g`` (draw ``a``: 0, then 1, 2, ... when redrawn) use ``derive_seed(derive_seed(seed,
g), a)``, the ``k``-th extra draw (below) ``derive_seed(derive_seed(seed, g), -1 - k)``.

Extra trials: with a shared RDB storage, a worker that asks while every individual is held by a
live trial waits (at most one generation). In a single process with in-memory storage (plain
Optuna code that asks K trials before telling them), waiting would deadlock on its own trials,
so such a trial gets an extra draw from the current distribution (``mergeopt:cmaes:index`` =
-1), evaluated but not told to CMA-ES.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mergeopt import attrs
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

    from mergeopt.genome import SearchGenome

PREFIX = sampler_prefix("cmaes")
STATE_KEY = PREFIX + "state"
"""Study system attrs (chunked JSON, ``samplers._state.write_json_state``): the optimizer."""
GENERATION_ATTR: TrialUserAttr[int] = TrialUserAttr(PREFIX + "generation")
INDEX_ATTR: TrialUserAttr[int] = TrialUserAttr(PREFIX + "index")
"""The trial's individual in its generation (-1: an extra draw, not told to CMA-ES)."""
DRAW_ATTR: TrialUserAttr[int] = TrialUserAttr(PREFIX + "draw")
"""Set when the generation was drawn again (every individual failed): which draw, 1, 2, ..."""


class ScalarizedCmaEsSampler(BatchedGenomeSampler):
    """CMA-ES over the unit cube of a numerical search space, shared by many workers.

    Args:
        x0: initial mean in the unit cube (Sakana: 0.5).
        sigma0: initial step size in the unit cube (Sakana: 1/6).
        popsize: population size; default ``4 + floor(3 ln n)``.
        scalarization: ``"weighted"`` or ``"chebyshev"`` (several objectives).
        weights: one weight per objective (default: equal weights summing to 1).
        seed: seed of the generations' draws (module docstring) and of the random fallback.
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
        genome: SearchGenome | None = None,
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
        super().__init__(PREFIX, seed=seed, genome=genome, timing=timing, enqueue_rest=False)
        self._hand_out_lock = threading.Lock()

    def _sample_numerical(
        self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        cube = UnitCube(space)
        # Threads of one process (``study.optimize(n_jobs=2)``) hand out one at a time: on
        # in-memory storage the fit lock has no settle time to separate them.
        with self._hand_out_lock:
            return self._coordinator.run(study, trial, lambda n: self._produce(study, cube, n))

    # -- state -------------------------------------------------------------------------------

    def _new_optimizer(self, dimension: int) -> Any:
        import cmaes

        popsize = self._popsize or 4 + math.floor(3 * math.log(dimension))
        return cmaes.CMA(
            mean=np.full(dimension, self._x0),
            sigma=self._sigma0,
            bounds=np.array([[0.0, 1.0]] * dimension),
            population_size=popsize,
        )

    def _draw_seed(self, generation: int, draw: int) -> int:
        """The seed of one draw from generation ``generation``'s distribution (module doc)."""
        base = derive_seed(0 if self._seed is None else self._seed, generation, bits=32)
        return derive_seed(base, draw, bits=32)

    def _draw(self, optimizer: Any, count: int, seed: int) -> np.ndarray:
        optimizer.reseed_rng(seed)  # the cmaes package's public way to seed its draws
        return np.array([optimizer.ask() for _ in range(count)])

    @staticmethod
    def _restore(state: dict[str, Any]) -> Any:
        import cmaes

        optimizer = cmaes.CMA(
            mean=np.array(state["mean"]),
            sigma=float(state["sigma"]),
            bounds=np.array([[0.0, 1.0]] * len(state["mean"])),
            population_size=int(state["popsize"]),
            cov=np.array(state["C"]),
        )
        optimizer._p_sigma = np.array(state["p_sigma"])
        optimizer._pc = np.array(state["p_c"])
        optimizer._g = int(state["generation"])
        return optimizer

    @staticmethod
    def _snapshot(
        optimizer: Any, names: list[str], individuals: np.ndarray, draw: int
    ) -> dict[str, Any]:
        return {
            "version": 1,
            "param_names": names,
            "generation": int(optimizer.generation),
            "draw": draw,
            "popsize": int(optimizer.population_size),
            "mean": optimizer.mean.tolist(),
            "sigma": float(optimizer._sigma),
            "C": optimizer._C.tolist(),
            "p_sigma": optimizer._p_sigma.tolist(),
            "p_c": optimizer._pc.tolist(),
            "individuals": individuals.tolist(),
        }

    def _start_generation(
        self, study: Study, cube: UnitCube, optimizer: Any, draw: int
    ) -> dict[str, Any]:
        """Draw the generation's individuals and store them with the optimizer."""
        seed = self._draw_seed(optimizer.generation, draw)
        individuals = self._draw(optimizer, optimizer.population_size, seed)
        state = self._snapshot(optimizer, cube.names, individuals, draw)
        write_json_state(study, STATE_KEY, state)
        return state

    def _member(self, trial: FrozenTrial) -> tuple[int, int, int] | None:
        """The (generation, draw, index) a trial holds: its user attrs, else its assignment."""
        held = trial.user_attrs
        if GENERATION_ATTR not in held:
            assigned = trial.system_attrs.get(self._coordinator.assigned_key) or {}
            held = assigned.get("user_attrs", {})
        if GENERATION_ATTR not in held:
            return None
        return int(held[GENERATION_ATTR]), int(held.get(DRAW_ATTR, 0)), int(held[INDEX_ATTR])

    def _census(
        self, study: Study, generation: int, draw: int
    ) -> tuple[dict[int, FrozenTrial], set[int], set[int], int]:
        """The generation's individuals that are done (first COMPLETE trial of each), held by a
        live trial (RUNNING, WAITING), failed (no such trial, one FAIL/PRUNED not given back),
        and how many extra draws it had."""
        done: dict[int, FrozenTrial] = {}
        live: set[int] = set()
        failed: set[int] = set()
        extras = 0
        for t in study.get_trials(deepcopy=False):
            member = self._member(t)
            if member is None or member[:2] != (generation, draw):
                continue
            index = member[2]
            if index < 0:  # an extra draw, not a member of the generation
                extras += 1
            elif t.state == TrialState.COMPLETE:
                done.setdefault(index, t)
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                live.add(index)
            elif not attrs.GIVEN_BACK.get(t):  # a given-back individual is handed out again
                failed.add(index)
        live -= set(done)
        failed -= set(done) | live
        return done, live, failed, extras

    def _produce(self, study: Study, cube: UnitCube, needed: int) -> list[Candidate]:
        """Up to ``needed`` individuals no trial holds (the lock holder's hand-out)."""
        state = read_json_state(study, STATE_KEY)
        if state is None or state["param_names"] != cube.names:
            state = self._start_generation(study, cube, self._new_optimizer(cube.dimension), 0)
        generation, popsize = int(state["generation"]), int(state["popsize"])
        done, live, failed, extras = self._census(study, generation, int(state.get("draw", 0)))
        free = [i for i in range(popsize) if i not in done and i not in live and i not in failed]
        if not free and not live:  # every individual finished: tell, or draw again
            state = self._finish_generation(study, cube, state, done)
            generation, free = int(state["generation"]), list(range(popsize))
        marks: dict[str, Any] = {DRAW_ATTR: state["draw"]} if state.get("draw") else {}
        if free:
            return [
                (
                    cube.from_unit(np.array(state["individuals"][i])),
                    {GENERATION_ATTR: generation, INDEX_ATTR: i, **marks},
                )
                for i in free[:needed]
            ]
        if not uses_in_memory_storage(study):
            return []  # other workers are evaluating this generation: wait for them
        # One process asks several trials before telling them (ask-K-then-tell-K): waiting
        # would deadlock on its own trials, so it gets an extra draw of this generation,
        # evaluated but not told to CMA-ES (index -1).
        extra = self._draw(self._restore(state), 1, self._draw_seed(generation, -1 - extras))
        return [(cube.from_unit(extra[0]), {GENERATION_ATTR: generation, INDEX_ATTR: -1, **marks})]

    def _finish_generation(
        self, study: Study, cube: UnitCube, state: dict[str, Any], done: dict[int, FrozenTrial]
    ) -> dict[str, Any]:
        """Tell the finished generation (failures with the penalty) and start the next; if
        every individual failed, draw this generation again."""
        optimizer = self._restore(state)
        if not done:
            return self._start_generation(study, cube, optimizer, int(state.get("draw", 0)) + 1)
        values = self._scalarize(study, [done[i] for i in sorted(done)])
        by_index = dict(zip(sorted(done), values, strict=True))
        worst, best = max(values), min(values)
        penalty = worst + max(worst - best, 1e-12)
        optimizer.tell(
            [
                (np.array(individual), float(by_index.get(i, penalty)))
                for i, individual in enumerate(state["individuals"])
            ]
        )
        return self._start_generation(study, cube, optimizer, 0)

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


__all__ = ["ScalarizedCmaEsSampler", "STATE_KEY", "GENERATION_ATTR", "INDEX_ATTR", "DRAW_ATTR"]
