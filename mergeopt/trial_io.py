"""Cheap trial I/O for the worker loop: counts by state in one query, one trial's state alone,
a trial's parameters and user attrs written in one transaction, user attrs on finished trials.

Optuna commits every parameter and every user attr in a transaction of its own, and answers
"how many trials are COMPLETE" by reading every trial. The worker loop does both on every
trial; on a 2-core machine with 4 workers that made the storage, not the objective, the
bottleneck (scripts/bench_storage.py, docs/bench/storage-*.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mergeopt.optuna_compat import (
    SetTrialState,
    can_write_trial_rows,
    count_trial_states,
    rdb_backend,
    read_trial_state,
    redirect_trial_writes,
    storage_of,
    study_id_of,
    trial_state_changes_wrapped,
    write_finished_trial_user_attrs,
    write_trial_rows,
)

if TYPE_CHECKING:
    import optuna


def count_trials(study: optuna.Study, *, below_number: int | None = None) -> dict[str, int]:
    """Trials of ``study`` per state name (``COMPLETE``, ``RUNNING``, ...), optionally only those
    numbered below ``below_number``: one ``COUNT ... GROUP BY`` on an RDB storage."""
    from optuna.trial import TrialState

    counts = {state.name: 0 for state in TrialState}
    backend = rdb_backend(storage_of(study))
    if backend is None:
        for trial in study.get_trials(deepcopy=False):
            if below_number is None or trial.number < below_number:
                counts[trial.state.name] += 1
        return counts
    for state, count in count_trial_states(
        backend, study_id_of(study), below_number=below_number
    ).items():
        counts[state.name] += count
    return counts


def trial_state(storage: Any, trial_id: int) -> optuna.trial.TrialState:
    """The state of one trial, read alone (``get_trial`` also loads its params and attrs)."""

    backend = rdb_backend(storage)
    if backend is None:
        return storage.get_trial(trial_id).state
    return read_trial_state(backend, trial_id)


@contextlib.contextmanager
def batched_trial_writes(storage: Any) -> Iterator[None]:
    """Write the trial parameters and user attrs set inside the block in one transaction.

    ``study.ask(distributions)`` stores each parameter with its own commit (148 for a 37-block,
    2-expert, 2-parameter genome) and ``trial.set_user_attr`` does the same per key; inside
    this block those calls on ``storage`` (``optuna_compat.storage_of(study)``) are collected
    and written together when the block ends without an exception. If it raises, nothing
    collected is written: the trial stays RUNNING without parameters and is failed like any
    abandoned trial. A trial ended inside the block (a batch sampler closes a queued trial it
    takes over) gets its collected writes first, while it can still take them. Storages other
    than Optuna's RDB storage are written to directly.
    """
    backend = rdb_backend(storage)
    if backend is None or not can_write_trial_rows(backend):
        yield
        return
    params: list[tuple[int, str, float, Any]] = []
    user_attrs: list[tuple[int, str, Any]] = []

    def write(trial_ids: set[int] | None = None) -> None:
        """Write the collected writes (of ``trial_ids`` only, when given) in one transaction."""
        chosen_params = [p for p in params if trial_ids is None or p[0] in trial_ids]
        chosen_attrs = [a for a in user_attrs if trial_ids is None or a[0] in trial_ids]
        params[:] = [p for p in params if trial_ids is not None and p[0] not in trial_ids]
        user_attrs[:] = [a for a in user_attrs if trial_ids is not None and a[0] not in trial_ids]
        if chosen_params or chosen_attrs:
            write_trial_rows(backend, chosen_params, chosen_attrs)

    def writing_first(set_state: SetTrialState) -> SetTrialState:
        def write_then_set_state(trial_id: int, state: Any, values: Any = None) -> bool:
            if state.is_finished():
                write({trial_id})
            return set_state(trial_id, state, values)

        return write_then_set_state

    with (
        redirect_trial_writes(
            storage,
            set_trial_param=lambda trial_id, name, value, distribution: params.append(
                (trial_id, name, value, distribution)
            ),
            set_trial_user_attr=lambda trial_id, key, value: user_attrs.append(
                (trial_id, key, value)
            ),
        ),
        trial_state_changes_wrapped(storage, writing_first),
    ):
        yield
    write()


def set_finished_trial_user_attrs(
    study: optuna.Study, trial_id: int, values: dict[str, Any]
) -> None:
    """Write user attrs onto a finished trial, in one transaction (insert or overwrite each key).

    Optuna refuses ``set_trial_user_attr`` once a trial is finished; what is learnt about a
    COMPLETE trial afterwards (its held-out values) is written here, straight into Optuna's
    ``trial_user_attributes`` table. Writing the same values again changes nothing. This
    process's cached copy of the trial is stale afterwards: load the study again to read them.
    """
    backend = rdb_backend(storage_of(study))
    if backend is None:
        raise TypeError("attrs of finished trials can only be written to an RDB storage")
    write_finished_trial_user_attrs(backend, trial_id, values)
