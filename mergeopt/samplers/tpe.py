"""Optuna's TPE sampler, reading the study once per trial instead of once per parameter."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import optuna

from mergeopt.optuna_compat import StudyReadOnce, trial_id_of

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial


class TPESampler(optuna.samplers.TPESampler):
    """``optuna.samplers.TPESampler`` with the same options and the same proposals, whose
    independent sampling reads the study's trials once per trial.

    TPE samples each parameter on its own, and with ``constant_liar`` (Optuna 5's default) it
    reads every trial from the storage for each one: for a 37-block, 2-expert genome, 74 reads
    of the database in one ``study.ask`` (an ask of 0.39 s on the H200 machine's host against a
    0.28 s evaluation, ``docs/bench/study-h200.md``; 0.52 s on the 2-core dev machine, 0.17 s
    with one read). Here the first parameter of a trial reads the study (once for each set of
    states TPE asks for) and the others reuse that snapshot; other workers' trials started or
    finished meanwhile are seen from the next trial on."""

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        # Per thread: study.optimize's n_jobs threads ask different trials at once.
        snapshots = self.__dict__.setdefault("_snapshots", threading.local())
        trial_id = trial_id_of(trial)
        if getattr(snapshots, "trial_id", None) != trial_id:
            snapshots.trial_id = trial_id
            snapshots.cache = {}
        read_once = StudyReadOnce(study, snapshots.cache)
        return super().sample_independent(
            read_once,  # type: ignore[arg-type]  # a study for every read TPE makes
            trial,
            param_name,
            param_distribution,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_snapshots", None)  # thread-local, and only a cache
        return state
