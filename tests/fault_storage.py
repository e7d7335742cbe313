"""Fault injection for the worker loop's unit tests: a study that needs no models, a runner that
merges nothing, and a wrapper that makes chosen calls of a real Optuna RDB storage lose their
database connection.

``FaultyStorage`` patches methods on the storage instance (as ``TrialHeartbeats.watch`` does),
so the storage stays an ``RDBStorage`` and the loop runs its real code paths. A fault raises a
SQLAlchemy ``OperationalError`` around a driver ``sqlite3.OperationalError``, which
``mergeopt.storage.is_connection_error`` takes for a lost connection; with ``reply_lost`` the
call is made first, so the database did what was asked and only the answer is lost.
"""

from __future__ import annotations

import datetime
import inspect
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
import pytest
import sqlalchemy.exc

from mergeopt import attrs
from mergeopt.genome import Genome
from mergeopt.spec import StudySpec
from mergeopt.storage import open_storage

GENOME = Genome(num_blocks=2, num_experts=2, searched={"weight": (0.0, 1.0)})


def connection_lost(method: str) -> sqlalchemy.exc.OperationalError:
    """What SQLAlchemy raises when the database goes away under a statement."""
    return sqlalchemy.exc.OperationalError(
        f"-- {method} (injected)", None, sqlite3.OperationalError("injected: connection lost")
    )


@dataclass
class Fault:
    """One rule: calls of ``method`` for which ``when(arguments)`` holds, at most ``times``
    of them (``None``: all), run ``effect`` before the call, or after it with ``reply_lost``."""

    method: str
    when: Callable[[Mapping[str, Any]], bool]
    times: int | None
    reply_lost: bool
    effect: Callable[[], None]
    injected: int = 0


@dataclass
class FaultyStorage:
    """Chosen methods of one storage instance, wrapped by fault rules (see the module doc)."""

    storage: Any
    faults: list[Fault] = field(default_factory=list)

    def inject(
        self,
        method: str,
        *,
        when: Callable[[Mapping[str, Any]], bool] = lambda call: True,
        times: int | None = 1,
        reply_lost: bool = False,
        effect: Callable[[], None] | None = None,
    ) -> Fault:
        """Add a rule; ``effect`` defaults to raising ``connection_lost(method)``."""

        def lose_connection() -> None:
            raise connection_lost(method)

        fault = Fault(method, when, times, reply_lost, effect or lose_connection)
        if not any(f.method == method for f in self.faults):
            self._wrap(method)
        self.faults.append(fault)
        return fault

    def _wrap(self, method: str) -> None:
        original = getattr(self.storage, method)
        signature = inspect.signature(original)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            fault = next(
                (
                    f
                    for f in self.faults
                    if f.method == method
                    and (f.times is None or f.injected < f.times)
                    and f.when(bound.arguments)
                ),
                None,
            )
            if fault is None:
                return original(*args, **kwargs)
            fault.injected += 1
            if not fault.reply_lost:
                fault.effect()
                return original(*args, **kwargs)
            result = original(*args, **kwargs)
            fault.effect()
            return result

        setattr(self.storage, method, wrapped)


def create_study(
    url: str,
    name: str = "loop",
    *,
    enqueue: list[dict[str, float]] | None = None,
    **worker: int,
) -> optuna.Study:
    """A two-objective study as ``create_study`` stores it (spec and genome in its user attrs),
    without models: the worker loop only reads them, the no-op runner never loads them."""
    spec = StudySpec.model_validate(
        {
            "name": name,
            "models": {"base": "/absent/base", "experts": ["/absent/e0", "/absent/e1"]},
            "merge": {"method": "task_arithmetic", "blocks": {"num_blocks": GENOME.num_blocks}},
            "objectives": [
                {"name": "accuracy", "task": "/absent/task.jsonl", "direction": "maximize"},
                {"name": "tokens", "task": "/absent/task.jsonl", "direction": "minimize"},
            ],
            "sampler": {"name": "random"},
            "worker": {"heartbeat_interval": 60, **worker},
        }
    )
    study = optuna.create_study(
        study_name=name, storage=open_storage(url), directions=["maximize", "minimize"]
    )
    study.set_user_attr(attrs.SPEC, spec.to_json())
    study.set_user_attr(attrs.GENOME, GENOME.to_dict())
    for index, params in enumerate(enqueue or []):
        study.enqueue_trial(params, user_attrs={attrs.PREFIX + "source": f"queued {index}"})
    return study


class NoopRunner:
    """Stands in for ``TrialRunner``: scores a recipe by its mean weight, merges nothing.
    ``during_evaluation(call_index)`` runs inside each evaluation (another worker's doings)."""

    def __init__(
        self, study: optuna.Study, during_evaluation: Callable[[int], None] | None = None
    ) -> None:
        from mergeopt.study import stored_spec

        self.spec = stored_spec(study)
        self.during_evaluation = during_evaluation
        self.evaluated: list[dict[str, float]] = []
        self.closed = False

    def evaluate(
        self, params: Mapping[str, float], *, seed: int
    ) -> tuple[list[float], dict[str, Any]]:
        if self.during_evaluation is not None:
            self.during_evaluation(len(self.evaluated))
        self.evaluated.append(dict(params))
        mean = sum(params.values()) / len(params)
        return [mean, 1.0 - mean], {"mergeopt:seed_seen": seed}

    def close(self) -> None:
        self.closed = True


@dataclass
class Harness:
    """Runs ``run_worker`` on a study with a ``NoopRunner`` and faults on the worker's storage.

    ``faults(storage)`` is called on the worker's own storage (the one with heartbeats) before
    the loop wraps it; the probe storage ``run_worker`` opens first is left alone.
    """

    url: str
    monkeypatch: pytest.MonkeyPatch
    name: str = "loop"
    runners: list[NoopRunner] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)

    def run(
        self,
        n_trials: int,
        *,
        faults: Callable[[FaultyStorage], None] | None = None,
        during_evaluation: Callable[[int], None] | None = None,
        runner_type: type[NoopRunner] | None = None,
    ) -> int:
        from mergeopt import trial_loop

        real_open_storage = trial_loop.open_storage

        def open_faulty_storage(url: str, **options: Any) -> Any:
            storage = real_open_storage(url, **options)
            if options.get("heartbeat_interval") is not None and faults is not None:
                faults(FaultyStorage(storage))
            return storage

        def runner_factory(study: optuna.Study, device: str) -> NoopRunner:
            runner = (runner_type or NoopRunner)(study, during_evaluation)
            self.runners.append(runner)
            return runner

        self.monkeypatch.setattr(trial_loop, "open_storage", open_faulty_storage)
        return trial_loop.run_worker(
            self.name,
            self.url,
            n_trials=n_trials,
            on_trial_end=self.ended.append,
            runner_factory=runner_factory,
        )

    @property
    def runner(self) -> NoopRunner:
        assert len(self.runners) == 1
        return self.runners[0]

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """Every trial of the study, read afresh through a storage of its own."""
        study = optuna.load_study(study_name=self.name, storage=open_storage(self.url))
        return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def fail_running_trials_as_stale(url: str, name: str) -> list[int]:
    """What another worker does when a trial's heartbeat is past the grace period: its
    heartbeat is dated back, and Optuna's ``fail_stale_trials`` fails it and queues a retry copy
    (``RetryFailedTrialCallback``). Returns the numbers of the trials it failed."""
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    storage = open_storage(url, heartbeat_interval=60, grace_period=180, max_retry=3)
    study = optuna.load_study(study_name=name, storage=storage)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    long_ago = datetime.datetime(2000, 1, 1)
    with storage.engine.begin() as connection:
        connection.execute(
            sqlalchemy.update(models.TrialHeartbeatModel)
            .where(models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in running]))
            .values(heartbeat=long_ago)
        )
    optuna.storages.fail_stale_trials(study)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(failed & {t.number for t in running})
