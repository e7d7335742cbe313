"""Sampler state kept as JSON in the study, and the batch protocol shared by several workers.

Workers are separate processes (possibly on several machines) that share one study in an RDB.
A sampler object is therefore created anew in every process and must keep nothing between
calls that another process would need: everything is re-read from the study, and everything
written there is JSON (Optuna's system attrs), never pickle — unpickling what a shared
database holds would let anyone who can write to it run code on every worker.

Batch protocol (used by ``saasbo-qnehvi`` and ``cmaes``; key prefix ``mergeopt:<sampler>:``):

1. A worker calls ``study.ask()``. If a candidate is queued (a WAITING trial made by
   ``study.enqueue_trial``), Optuna pops it atomically (``SELECT ... FOR UPDATE`` on
   PostgreSQL/MySQL) and the sampler is not consulted: its parameters are fixed.
2. Otherwise the new trial T reaches ``sample_relative``. If T's system attr ``assigned``
   holds parameters (put there by another worker's fit, step 4), T takes them.
3. T tries to become *the fitter* with a timed lock in the study system attr ``fit_lock``
   (Fischer's timed mutual exclusion, Lynch & Shavit 1992 / Lamport 1987): read the lock; if it
   is free or expired, write ``{"token": <uuid4>, "expires": now + lock_ttl, "trial_id": T}``,
   wait ``settle_seconds`` (longer than any competitor's read-to-write gap), re-read, and only
   the worker whose token is still there has the lock. The lock of a fitter that died is taken
   over when it expires, or as soon as its trial is failed as stale (after the heartbeat grace
   period), whichever comes first.
4. The fitter lists the RUNNING trials that are waiting (system attr ``waiting``, no
   ``assigned`` yet), asks the sampler for up to ``1 + len(waiting)`` candidates (more when
   the batch size is larger: SAASBO; CMA-ES hands out no more than asked), keeps the first for
   T (recorded in T's own ``assigned`` attr at once), writes one into each waiting trial's
   ``assigned`` attr, enqueues the rest with ``study.enqueue_trial`` and releases the lock.
   Each candidate thus goes to exactly one trial: to a trial id chosen by the one lock holder,
   or through Optuna's atomic pop of a WAITING trial. No two workers evaluate one candidate.
5. A worker that did not get the lock marks T ``waiting`` and polls every ``poll_seconds``
   for an assignment; a waiting worker therefore idles at most one fit. If the lock is
   released and T still has nothing (it started waiting after the fitter looked), it tries to
   take the lock itself and fits with the newest data.

A worker that dies while waiting leaves an assignment on a trial that the heartbeat later
marks FAIL; its ``RetryFailedTrialCallback`` copy has no parameters and is sampled afresh.

6. A waiting worker that finds a queued candidate (enqueued after its own trial was created,
   or a dead worker's trial re-enqueued by the heartbeat callback) takes it over: it pops the
   WAITING trial with Optuna's atomic WAITING -> RUNNING transition, copies its parameters and
   user attrs, and closes that trial as FAIL with ``mergeopt:taken_by`` = its own number.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from mergeopt import attrs
from mergeopt.optuna_compat import (
    clock_unbeaten_trials,
    fixed_params,
    set_study_system_attr,
    storage_of,
    study_system_attrs,
    trial_id_of,
    uses_in_memory_storage,
)

if TYPE_CHECKING:
    from optuna import Study
    from optuna.search_space import IntersectionSearchSpace

    from mergeopt.genome import SearchGenome

Candidate = tuple[dict[str, Any], dict[str, Any]]
"""``(params, user_attrs)`` of one candidate, parameters in Optuna's external representation."""


def numerical_space(search_space: Mapping[str, BaseDistribution]) -> dict[str, BaseDistribution]:
    """The part of a search space a continuous model can handle (non-degenerate numbers)."""
    return {
        name: dist
        for name, dist in search_space.items()
        if isinstance(dist, (FloatDistribution, IntDistribution)) and not dist.single()
    }


class UnitCube:
    """Maps parameters of a numerical search space to ``[0, 1]^d`` and back.

    Log distributions are searched in log space; stepped and integer ones are rounded on the way
    back. ``to_unit``: dict -> array of shape ``(d,)``; ``from_unit``: ``(d,)`` -> dict.
    """

    def __init__(self, search_space: Mapping[str, BaseDistribution]) -> None:
        self.names = list(search_space)
        self.distributions: dict[str, FloatDistribution | IntDistribution] = {}
        lows, highs = [], []
        for name, dist in search_space.items():
            assert isinstance(dist, (FloatDistribution, IntDistribution))
            self.distributions[name] = dist
            low, high = float(dist.low), float(dist.high)
            if dist.log:
                low, high = math.log(low), math.log(high)
            lows.append(low)
            highs.append(high)
        self._low = np.array(lows)
        self._high = np.array(highs)

    @property
    def dimension(self) -> int:
        return len(self.names)

    def to_unit(self, params: Mapping[str, Any]) -> np.ndarray:
        values = []
        for name in self.names:
            value = float(params[name])
            if self.distributions[name].log:
                value = math.log(value)
            values.append(value)
        return np.clip((np.array(values) - self._low) / (self._high - self._low), 0.0, 1.0)

    def from_unit(self, unit: np.ndarray) -> dict[str, Any]:
        raw = self._low + np.clip(np.asarray(unit, dtype=float), 0.0, 1.0) * (
            self._high - self._low
        )
        params: dict[str, Any] = {}
        for name, value in zip(self.names, raw.tolist(), strict=True):
            dist = self.distributions[name]
            if dist.log:
                value = math.exp(value)
            if dist.step is not None:
                value = dist.low + round((value - dist.low) / dist.step) * dist.step
            value = min(max(value, dist.low), dist.high)
            params[name] = int(round(value)) if isinstance(dist, IntDistribution) else float(value)
        return params


def snap(distribution: BaseDistribution, value: float) -> Any:
    """``value`` clipped to a numerical distribution, on its step grid, as int or float."""
    assert isinstance(distribution, (FloatDistribution, IntDistribution))
    if distribution.step is not None:
        steps = round((value - distribution.low) / distribution.step)
        value = distribution.low + steps * distribution.step
    value = min(max(value, distribution.low), distribution.high)
    if isinstance(distribution, IntDistribution):
        return int(round(value))
    return float(value)


def dimension_importance(
    names: Sequence[str], block_importance: Sequence[float] | None
) -> np.ndarray | None:
    """Importance in ``[0, 1]`` of each parameter, from the importance of its genome block.

    Returns None when the names are not genome names (plain Optuna use) or no importance is
    known. Importances are divided by their maximum, so the most important block gets 1.
    """
    from mergeopt.genome import parse_param_name

    if block_importance is None or len(block_importance) == 0:
        return None
    scale = max(float(v) for v in block_importance)
    if not scale > 0:
        return None
    values = []
    for name in names:
        try:
            block, _, _ = parse_param_name(name)
        except ValueError:
            return None
        if block >= len(block_importance):
            return None
        values.append(max(float(block_importance[block]), 0.0) / scale)
    return np.array(values)


def genome_of(study: Study, genome: SearchGenome | None) -> SearchGenome | None:
    """The genome given to the sampler, else the one stored in the study (``mergeopt:genome``;
    parameter space or data-flow space)."""
    from mergeopt.genome import genome_from_dict

    if genome is not None:
        return genome
    data = attrs.GENOME.get(study)
    return genome_from_dict(data) if data else None


def relative_search_space(
    study: Study, genome: SearchGenome | None, intersection: IntersectionSearchSpace
) -> dict[str, BaseDistribution]:
    """The space a relative sampler models: the genome's whole space when there is one (fixed,
    so even the first trial is sampled jointly), else the numerical part of the parameters
    every trial so far shared (plain Optuna use)."""
    genome = genome_of(study, genome)
    if genome is not None:
        return dict(genome.distributions())
    return numerical_space(intersection.calculate(study))


def trial_unit_params(trial: FrozenTrial, cube: UnitCube) -> np.ndarray | None:
    """The trial's point in the unit cube: its params, else its enqueued/assigned params."""
    for params in (trial.params, fixed_params(trial) or {}):
        if all(name in params for name in cube.names):
            return cube.to_unit(params)
    return None


class BatchCoordinator:
    """The fit lock and candidate hand-out of the module docstring's batch protocol.

    ``enqueue_rest=False`` (CMA-ES) drops the candidates no trial took instead of enqueuing
    them: the sampler keeps them in its own state and hands them out again.
    """

    def __init__(
        self,
        *,
        prefix: str,
        lock_ttl_seconds: float,
        settle_seconds: float | None,
        poll_seconds: float,
        enqueue_rest: bool = True,
    ) -> None:
        self.prefix = prefix
        self.lock_key = prefix + "fit_lock"
        self.waiting_key = prefix + "waiting"
        self.assigned_key = prefix + attrs.ASSIGNED
        self.lock_ttl_seconds = lock_ttl_seconds
        self.settle_seconds = settle_seconds
        self.poll_seconds = poll_seconds
        self.enqueue_rest = enqueue_rest

    def _settle(self, study: Study) -> float:
        if self.settle_seconds is not None:
            return self.settle_seconds
        # In one process the in-memory storage is guarded by a lock: no race to wait out.
        return 0.0 if uses_in_memory_storage(study) else 0.25

    def _try_lock(self, study: Study, trial_id: int | None = None) -> str | None:
        current = study_system_attrs(study).get(self.lock_key)
        now = time.time()
        if (
            current
            and current.get("token")
            and current.get("expires", 0.0) > now
            and not self._holder_is_dead(study, current.get("trial_id"))
        ):
            return None
        token = uuid.uuid4().hex
        set_study_system_attr(
            study,
            self.lock_key,
            {"token": token, "expires": now + self.lock_ttl_seconds, "trial_id": trial_id},
        )
        settle = self._settle(study)
        if settle > 0:
            time.sleep(settle)
        current = study_system_attrs(study).get(self.lock_key)
        return token if current and current.get("token") == token else None

    @staticmethod
    def _holder_is_dead(study: Study, holder_trial_id: int | None) -> bool:
        """The lock holder's trial is finished: it was failed as stale, so its worker died
        holding the lock (a live fitter's trial is RUNNING and heartbeaten while it fits).
        Taking the lock over then costs the grace period, not the whole ``lock_ttl``."""
        if holder_trial_id is None:
            return False
        try:
            return storage_of(study).get_trial(holder_trial_id).state.is_finished()
        except KeyError:
            return True

    def _release(self, study: Study, token: str) -> None:
        current = study_system_attrs(study).get(self.lock_key)
        if current and current.get("token") == token:
            set_study_system_attr(study, self.lock_key, {"token": None})

    def lock_holder(self, study: Study) -> str | None:
        current = study_system_attrs(study).get(self.lock_key)
        if current and current.get("token") and current.get("expires", 0.0) > time.time():
            return str(current["token"])
        return None

    def run(
        self,
        study: Study,
        trial: FrozenTrial,
        produce: Callable[[int], list[Candidate]],
    ) -> dict[str, Any]:
        """Parameters for ``trial``: assigned by another fitter, or fitted here.

        ``produce(n)`` is called only while holding the lock; it returns at least ``n``
        candidates, or an empty list when none can be made yet (e.g. a CMA-ES generation that
        is still being evaluated), in which case the trial waits.
        """
        storage = storage_of(study)
        registered = False
        while True:
            frozen = storage.get_trial(trial_id_of(trial))
            assigned = frozen.system_attrs.get(self.assigned_key)
            if assigned is not None:
                self._set_user_attrs(study, trial, assigned.get("user_attrs", {}))
                return dict(assigned["params"])
            token = self._try_lock(study, trial_id_of(trial))
            if token is not None:
                try:
                    frozen = storage.get_trial(trial_id_of(trial))
                    assigned = frozen.system_attrs.get(self.assigned_key)
                    if assigned is not None:
                        self._set_user_attrs(study, trial, assigned.get("user_attrs", {}))
                        return dict(assigned["params"])
                    waiting = [
                        t
                        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if trial_id_of(t) != trial_id_of(trial)
                        and t.system_attrs.get(self.waiting_key)
                        and self.assigned_key not in t.system_attrs
                        and not t.params
                    ]
                    candidates = produce(1 + len(waiting))
                    if candidates:
                        return self._hand_out(study, trial, waiting, candidates)
                finally:
                    self._release(study, token)
            if not registered:
                storage.set_trial_system_attr(trial_id_of(trial), self.waiting_key, True)
                registered = True
            taken = self._take_queued(study, trial)
            if taken is not None:
                return taken
            time.sleep(self.poll_seconds)

    def _take_queued(self, study: Study, trial: FrozenTrial) -> dict[str, Any] | None:
        """Take over a queued candidate while waiting (step 6 of the protocol).

        A candidate can be queued while this trial waits (it was enqueued after this trial was
        created, or a dead worker's trial was re-enqueued by the heartbeat callback: its
        parameters fixed, or sampled and copied, or only assigned). Only an ``ask`` could pop
        it, and this worker is inside one, so it pops the queued trial itself with Optuna's
        atomic WAITING -> RUNNING transition, copies its parameters and user attrs, and closes
        the popped trial as FAIL with ``mergeopt:taken_by``. Stale trials
        are failed first (``optuna.storages.fail_stale_trials``), so a lone worker restarted
        after a crash does not wait for the trial of its dead predecessor, and a trial that
        never beat gets its clock started (``optuna_compat.clock_unbeaten_trials``).
        """
        import optuna

        storage = storage_of(study)
        with contextlib.suppress(Exception):  # needs heartbeats; a no-op without them
            clock_unbeaten_trials(study)
            optuna.storages.fail_stale_trials(study)
        for queued in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            assigned = queued.system_attrs.get(self.assigned_key) or {}
            params = fixed_params(queued) or queued.params or assigned.get("params")
            if not params:
                continue
            user_attrs = {**assigned.get("user_attrs", {}), **queued.user_attrs}
            try:
                won = storage.set_trial_state_values(trial_id_of(queued), state=TrialState.RUNNING)
            except Exception:  # noqa: BLE001 - finished or gone meanwhile
                won = False
            if not won:
                continue
            # Marked taken first: should this worker die before the queued trial is closed,
            # the queued trial is failed as stale, and the retry callback re-enqueues it only
            # if this trial holds no claim yet (``storage.RetryUnlessTakenOver``). The claim is
            # written at once (this trial's user attrs may be batched until its ask ends), and
            # before the queued trial is closed, so the candidate is always held by a trial.
            attrs.TAKEN_BY.set_on(study, queued, trial.number)
            storage.set_trial_system_attr(
                trial_id_of(trial),
                self.assigned_key,
                {"params": dict(params), "user_attrs": user_attrs},
            )
            attrs.FAIL_REASON.set_on(
                study, queued, f"candidate taken over by waiting trial {trial.number}"
            )
            attrs.GIVEN_BACK.set_on(study, queued, True)
            storage.set_trial_state_values(trial_id_of(queued), state=TrialState.FAIL)
            self._set_user_attrs(study, trial, user_attrs)
            return dict(params)
        return None

    def _hand_out(
        self,
        study: Study,
        trial: FrozenTrial,
        waiting: list[FrozenTrial],
        candidates: list[Candidate],
    ) -> dict[str, Any]:
        """Keep the first candidate for ``trial``, assign one to each waiting trial and queue
        the rest (``enqueue_rest``). A waiting trial failed as stale during the fit (its worker
        died) cannot take one: its candidate is queued instead (assigning it crashed the
        fitter)."""
        from optuna.exceptions import UpdateFinishedTrialError

        storage = storage_of(study)
        own_params, own_attrs = candidates[0]
        # Recorded in T's own ``assigned`` attr too, written at once: T's params and user attrs
        # may reach the database only when its ask ends (``trial_io.batched_trial_writes``), and
        # the next fitter must see this candidate taken. A retry copy of T inherits it.
        storage.set_trial_system_attr(
            trial_id_of(trial), self.assigned_key, {"params": own_params, "user_attrs": own_attrs}
        )
        self._set_user_attrs(study, trial, own_attrs)
        rest = candidates[1:]
        unassigned = list(rest[len(waiting) :])
        for other, (params, user_attrs) in zip(waiting, rest, strict=False):
            try:
                storage.set_trial_system_attr(
                    trial_id_of(other),
                    self.assigned_key,
                    {"params": params, "user_attrs": user_attrs},
                )
            except UpdateFinishedTrialError:
                unassigned.append((params, user_attrs))
        for params, user_attrs in unassigned if self.enqueue_rest else ():
            study.enqueue_trial(params, user_attrs=user_attrs)
        return dict(own_params)

    @staticmethod
    def _set_user_attrs(study: Study, trial: FrozenTrial, user_attrs: Mapping[str, Any]) -> None:
        for key, value in user_attrs.items():
            storage_of(study).set_trial_user_attr(trial_id_of(trial), key, value)


_CHUNK_CHARS = 30_000  # MySQL/MariaDB keep attr values in TEXT columns (64 KiB)


def write_json_state(study: Study, key: str, state: Mapping[str, Any]) -> None:
    """Store ``state`` as JSON text in study system attrs, split into chunks under ``key:i``.

    Written by the lock holder only; the chunk count under ``key`` is written last, so a
    reader never sees a state longer than what was written.
    """
    import json

    text = json.dumps(state, separators=(",", ":"))
    chunks = [text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)] or [""]
    for index, chunk in enumerate(chunks):
        set_study_system_attr(study, f"{key}:{index}", chunk)
    set_study_system_attr(study, key, len(chunks))


def read_json_state(study: Study, key: str) -> dict[str, Any] | None:
    """The state stored by :func:`write_json_state`, or None."""
    import json

    attrs = study_system_attrs(study)
    count = attrs.get(key)
    if not count:
        return None
    return json.loads("".join(attrs[f"{key}:{index}"] for index in range(int(count))))
