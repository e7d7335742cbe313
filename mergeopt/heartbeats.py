"""Heartbeats of the trials a worker holds, so that a killed worker's trials go stale and are
retried (Optuna's heartbeat, extended to trials created or taken inside a blocking ``ask``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mergeopt.optuna_compat import (
    CreateTrial,
    SetTrialState,
    trial_id_of,
    wrap_trial_creation,
    wrap_trial_state_changes,
)

if TYPE_CHECKING:
    from optuna.storages import RDBStorage


class TrialHeartbeats:
    """Beats every trial this worker holds, from the moment the trial row exists.

    ``study.ask`` can block for a long time inside a batch sampler (a CMA-ES worker waits for
    its generation, a SAASBO worker for the fitter), and a worker killed there would leave a
    RUNNING trial with no heartbeat, which Optuna never considers stale. So ``watch`` wraps the
    storage's trial creation and ``set_trial_state_values``: a trial created RUNNING, or
    a queued trial this process moves to RUNNING, is held and beaten at once; a trial this
    process finishes is released. A daemon thread beats the held trials every ``interval``
    seconds; a failed beat is logged once per outage (the thread keeps trying), and the time
    of the last failure tells the worker not to fail other workers' trials as stale until
    their heartbeats had time to resume.
    """

    def __init__(
        self,
        storage: RDBStorage,
        interval: float,
        on_error: Callable[[BaseException], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self._storage = storage
        self._interval = interval
        self._on_error = on_error
        self._on_recovered = on_recovered
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing = False
        self.last_outage: float | None = None
        self._thread = threading.Thread(target=self._run, name="trial-heartbeats", daemon=True)

    def watch(self) -> TrialHeartbeats:
        """Wrap the storage's trial creation and state changes (see the class docstring)."""
        from optuna.trial import TrialState

        def holding_created(create_new_trial: CreateTrial) -> CreateTrial:
            def create_and_hold(study_id: int, template_trial: Any = None) -> Any:
                frozen = create_new_trial(study_id, template_trial)
                if frozen.state == TrialState.RUNNING:
                    self.hold(trial_id_of(frozen))
                return frozen

            return create_and_hold

        def tracking_states(set_trial_state_values: SetTrialState) -> SetTrialState:
            def set_state_and_track(trial_id: int, state: Any, values: Any = None) -> bool:
                changed = set_trial_state_values(trial_id, state, values)
                if state == TrialState.RUNNING and changed:
                    self.hold(trial_id)
                elif state.is_finished():
                    self.release(trial_id)
                return changed

            return set_state_and_track

        wrap_trial_creation(self._storage, holding_created)
        wrap_trial_state_changes(self._storage, tracking_states)
        return self

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self._held.add(trial_id)
        self._beat(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def note_outage(self) -> None:
        self.last_outage = time.monotonic()

    def outage_within(self, seconds: float) -> bool:
        return self.last_outage is not None and time.monotonic() - self.last_outage < seconds

    def __enter__(self) -> TrialHeartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self, trial_id: int) -> None:
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the trial
            self.note_outage()
            if not self._failing and self._on_error is not None:
                self._on_error(exc)
            self._failing = True
        else:
            if self._failing and self._on_recovered is not None:
                self._on_recovered()
            self._failing = False

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for trial_id in self.held():
                self._beat(trial_id)
