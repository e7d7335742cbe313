"""Experiment trackers: every finished trial logged to MLflow or Weights & Biases.

The spec's ``tracking:`` section names trackers and their options (off when absent)::

    tracking:
      mlflow: {tracking_uri: sqlite:////shared/mlflow.db}
      wandb: {project: merges}

Each tracker is one entry of ``TRACKERS`` (name -> ``TrackerEntry``): its options model, the
modules it needs, a factory that builds an Optuna callback ``(study, frozen_trial) -> None``
in a worker, and an optional ``prepare`` run once by ``study create``. The callbacks are
optuna-integration's ``MLflowCallback`` and ``WeightsAndBiasesCallback``; mergeopt's workers
use ask/tell, so ``trial_loop.run_worker`` hands each trial it finished (COMPLETE, or FAIL
after an evaluation error) to ``WorkerTrackers.report``, in every worker process.

What each trial logs: the objective values as metrics named after the objectives, its cost as
the metrics ``cost/trial_seconds`` (start to tell), ``cost/merge_seconds``,
``cost/eval_seconds``, ``cost/items_scored`` and ``cost/tokens_generated`` (the runner's user
attrs), and its recipe (the trial parameters,
``b03.e1.weight``) as parameters. Several workers never share a tracker run: MLflow gets one
run per trial (named by the trial number) in one experiment named after the study, created by
``study create`` so that workers starting together do not race to create it; W&B gets one run
per worker process (named by the worker, ``host:pid/device``) in a group named after the
study, its steps the trial numbers.

A tracker that fails never fails a trial: building it or logging a trial logs one warning
line, and a tracker that could not be built is off for that worker.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.optuna_compat import storage_of, trial_id_of

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger("mergeopt")

INSTALL_HINT = "pip install -e '.[tracking]'"

# Metrics a trial logs beside its objective values; '/' cannot occur in an objective name.
COST_METRICS = {
    "cost/trial_seconds": None,  # datetime_complete - datetime_start
    "cost/merge_seconds": attrs.MERGE_SECONDS,
    "cost/eval_seconds": attrs.EVAL_SECONDS,
    "cost/items_scored": attrs.ITEMS_SCORED,
    "cost/tokens_generated": attrs.TOKENS_GENERATED,
}

TrialCallback = Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MLflowOptions(_Options):
    """``tracking_uri``: where runs go; default ``$MLFLOW_TRACKING_URI``, else MLflow's own
    default (``sqlite:///mlflow.db`` in the working folder of each process). Credentials
    belong in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, not in the URI (the
    spec is stored in the study). ``tag_user_attrs``: also tag each run with the trial's user
    attrs (the per-block recipe, raw metrics, worker, seed)."""

    tracking_uri: str | None = None
    tag_user_attrs: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is not None:
            from urllib.parse import urlsplit

            if urlsplit(value).password:
                raise ValueError(
                    "no password in the URI (the spec is stored in the study); set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
                )
        return value


class WandbOptions(_Options):
    """``project`` and ``entity`` as ``wandb.init`` takes them; ``group`` (default: the study
    name) gathers the workers' runs; ``as_multirun: true`` makes one run per trial instead of
    one per worker (slower: a ``wandb.init`` per trial). Log in with ``WANDB_API_KEY``, or
    set ``WANDB_MODE=offline``."""

    project: str = "mergeopt"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = []
    as_multirun: bool = False


@dataclass(frozen=True)
class TrackerContext:
    """What a worker's tracker needs to know: the study, its objectives, the worker."""

    study_name: str
    metric_names: list[str]
    worker: str


@dataclass(frozen=True)
class TrackerEntry:
    """One tracker: its options, the modules it imports, and how to build its callback.

    ``create(options, context)`` returns the callback and a function that ends the tracker's
    work in this process (finishing a run); ``prepare(options, study_name)``, if given, runs
    once when the study is created.
    """

    options: type[_Options]
    modules: tuple[str, ...]
    create: Callable[[Any, TrackerContext], tuple[TrialCallback, Callable[[], None]]]
    prepare: Callable[[Any, str], None] | None = None


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # optuna-integration 4.9 deprecated its tracker callbacks (they move to OptunaHub's
    # callbacks category); they still work, and the warning would repeat in every worker.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# --------------------------------------------------------------------------- MLflow


def _mlflow_experiment(tracking_uri: str | None, name: str) -> tuple[str, str]:
    """The tracking URI in use and the id of the experiment ``name``, created if missing.

    ``mlflow.set_experiment`` loses a creation race between processes without activating the
    experiment (the run would land in "Default"); an explicit id avoids that.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines on creating tables
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return uri, experiment.experiment_id
    try:
        return uri, client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return uri, experiment.experiment_id


def _prepare_mlflow(options: MLflowOptions, study_name: str) -> None:
    _mlflow_experiment(options.tracking_uri, study_name)


def _create_mlflow(
    options: MLflowOptions, context: TrackerContext
) -> tuple[TrialCallback, Callable[[], None]]:
    from optuna_integration import MLflowCallback

    uri, experiment_id = _mlflow_experiment(options.tracking_uri, context.study_name)
    with _quiet_deprecation():
        callback = MLflowCallback(
            tracking_uri=uri,
            metric_name=[*context.metric_names, *COST_METRICS],
            create_experiment=False,
            mlflow_kwargs={"experiment_id": experiment_id},
            tag_trial_user_attrs=options.tag_user_attrs,
        )
    return callback, lambda: None


# --------------------------------------------------------------------------- Weights & Biases


def _create_wandb(
    options: WandbOptions, context: TrackerContext
) -> tuple[TrialCallback, Callable[[], None]]:
    import wandb
    from optuna_integration import WeightsAndBiasesCallback

    init = {
        "project": options.project,
        "entity": options.entity,
        "group": options.group or context.study_name,
        "job_type": "worker",
        "name": context.worker,
        "tags": [*options.tags, context.study_name],
        "config": {"study": context.study_name, "worker": context.worker},
        # No capture of the worker's output, and no run summary printed by every worker at
        # the end of `study run`.
        "settings": wandb.Settings(console="off", quiet=True),
    }
    with _quiet_deprecation():
        callback = WeightsAndBiasesCallback(
            metric_name=[*context.metric_names, *COST_METRICS],
            wandb_kwargs=init,
            as_multirun=options.as_multirun,
        )

    def finish() -> None:
        if wandb.run is not None:
            wandb.run.finish()

    return callback, finish


TRACKERS: dict[str, TrackerEntry] = {
    "mlflow": TrackerEntry(
        options=MLflowOptions,
        modules=("optuna_integration", "mlflow"),
        create=_create_mlflow,
        prepare=_prepare_mlflow,
    ),
    "wandb": TrackerEntry(
        options=WandbOptions,
        modules=("optuna_integration", "wandb"),
        create=_create_wandb,
    ),
}


# --------------------------------------------------------------------------- checks


def tracker_options(tracking: Mapping[str, Mapping[str, Any]]) -> dict[str, _Options]:
    """The validated options of each tracker; ``UserError`` (one line) for an unknown tracker
    or option."""
    from mergeopt.spec import format_validation_error

    options = {}
    for name, given in tracking.items():
        entry = TRACKERS.get(name)
        if entry is None:
            raise UserError(
                f"tracking: unknown tracker {name!r}; expected one of {', '.join(TRACKERS)}"
            )
        try:
            options[name] = entry.options.model_validate(dict(given))
        except ValidationError as exc:
            field_and_problem = format_validation_error(exc, "").removeprefix(": ")
            raise UserError(f"tracking.{name}.{field_and_problem}") from None
    return options


def _import_modules(name: str, entry: TrackerEntry) -> None:
    for module in entry.modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(
                f"tracking.{name}: the {module} package is not installed; {INSTALL_HINT}"
            ) from None


def check_tracking(tracking: Mapping[str, Mapping[str, Any]]) -> None:
    """The trackers exist and their options are valid (cheap: imports nothing)."""
    tracker_options(tracking)


def prepare_tracking(tracking: Mapping[str, Mapping[str, Any]], study_name: str) -> None:
    """At ``study create``: every tracker's packages import, and its ``prepare`` step (the
    MLflow experiment) is done once, before any worker starts."""
    for name, options in tracker_options(tracking).items():
        entry = TRACKERS[name]
        _import_modules(name, entry)
        if entry.prepare is not None:
            try:
                entry.prepare(options, study_name)
            except Exception as exc:  # noqa: BLE001 - any failure of the tracker's backend
                raise UserError(f"tracking.{name}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- workers


def with_costs(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """A copy of a finished trial whose values are followed by its cost (``COST_METRICS``
    order), so that the callbacks log both; a missing cost is NaN. Unchanged without values."""
    if trial.values is None:
        return trial
    costs = []
    for key in COST_METRICS.values():
        if key is None:
            started, ended = trial.datetime_start, trial.datetime_complete
            costs.append((ended - started).total_seconds() if started and ended else math.nan)
        else:
            value = trial.user_attrs.get(key)
            costs.append(float(value) if isinstance(value, (int, float)) else math.nan)
    copied = copy.copy(trial)
    copied.values = [*trial.values, *costs]
    return copied


@dataclass
class _Open:
    name: str
    callback: TrialCallback
    close: Callable[[], None]


@dataclass
class WorkerTrackers:
    """The trackers of one worker process; ``report`` and ``close`` never raise."""

    trackers: list[_Open] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        tracking: Mapping[str, Mapping[str, Any]],
        *,
        study_name: str,
        metric_names: list[str],
        worker: str,
    ) -> WorkerTrackers:
        context = TrackerContext(study_name=study_name, metric_names=metric_names, worker=worker)
        opened = cls()
        if not tracking:
            return opened
        try:
            options = tracker_options(tracking)
        except UserError as exc:
            logger.warning("trackers off: %s", exc)
            return opened
        for name, given in options.items():
            try:
                callback, close = TRACKERS[name].create(given, context)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops a worker
                logger.warning("tracker %s off in this worker: %s", name, _one_line(exc))
                continue
            opened.trackers.append(_Open(name, callback, close))
        return opened

    def report(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Log a trial this worker finished (told COMPLETE or FAIL) to every tracker."""
        if not self.trackers:
            return
        try:
            frozen = with_costs(_finished_trial(study, trial))
        except Exception as exc:  # noqa: BLE001 - e.g. the database is down for a moment
            logger.warning("trial %d not tracked: %s", trial.number, _one_line(exc))
            return
        for tracker in self.trackers:
            try:
                with _quiet_deprecation():
                    tracker.callback(study, frozen)
            except Exception as exc:  # noqa: BLE001 - a tracker never fails a trial
                logger.warning(
                    "tracker %s could not log trial %d: %s",
                    tracker.name,
                    frozen.number,
                    _one_line(exc),
                )

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                logger.warning("tracker %s did not close cleanly: %s", tracker.name, _one_line(exc))
        self.trackers.clear()


def _finished_trial(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial as stored; if its result went to the retry copy that replaced it
    (``trial_loop._adopt_retry``), that copy."""
    from optuna.trial import TrialState

    frozen = storage_of(study).get_trial(trial_id_of(trial))
    # An evaluation that failed says why; a trial failed as stale by another worker does not.
    if frozen.state == TrialState.FAIL and attrs.FAIL_REASON not in frozen.user_attrs:
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if attrs.ADOPTED_FROM.get(other) == frozen.number:
                return other
    return frozen
