"""The attributes mergeopt keeps in Optuna studies and trials: one typed accessor per key.

Study user_attrs are visible in optuna-dashboard, so everything a person may want to read
(the spec, the block layout, block importance, anchor scores) lives there as JSON. Keys are
namespaced with ``mergeopt:`` so they never collide with a user's own attributes; a sampler's
own keys add its name (:func:`sampler_prefix`).

Each key is an accessor: a ``str`` (the key itself, so ``attrs.SPEC in study.user_attrs`` and
``{attrs.RECIPE: ...}`` work) with typed ``get``/``read``/``set`` for where it is kept::

    spec = attrs.SPEC.read(study)           # dict; KeyError when the study has none
    seed = attrs.SEED.get(trial)            # int | None
    attrs.FAIL_REASON.set(trial, "...")     # a live optuna.Trial
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mergeopt import optuna_compat

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

T = TypeVar("T")

PREFIX = "mergeopt:"


def sampler_prefix(sampler: str) -> str:
    """The key prefix of one sampler's own attributes, e.g. ``mergeopt:cmaes:``."""
    return f"{PREFIX}{sampler}:"


ASSIGNED = "assigned"
"""A batch sampler's trial system attr (``mergeopt:<sampler>:assigned``): the candidate
``{"params", "user_attrs"}`` the trial holds, written before its parameters are."""


def holds_assignment(trial: FrozenTrial) -> bool:
    """Whether a batch sampler assigned the trial a candidate (:data:`ASSIGNED`)."""
    return any(
        key.startswith(PREFIX) and key.endswith(":" + ASSIGNED) for key in trial.system_attrs
    )


class StudyUserAttr(str, Generic[T]):
    """A study user attr (shown by optuna-dashboard)."""

    __slots__ = ()

    def get(self, study: optuna.Study) -> T | None:
        return study.user_attrs.get(self)

    def read(self, study: optuna.Study) -> T:
        return study.user_attrs[self]

    def set(self, study: optuna.Study, value: T) -> None:
        study.set_user_attr(str(self), value)


class StudySystemAttr(str, Generic[T]):
    """A study system attr (bookkeeping that is not shown to people)."""

    __slots__ = ()

    def get(self, study: optuna.Study) -> T | None:
        return optuna_compat.study_system_attrs(study).get(self)

    def set(self, study: optuna.Study, value: T) -> None:
        optuna_compat.set_study_system_attr(study, str(self), value)


class TrialUserAttr(str, Generic[T]):
    """A trial user attr (shown by optuna-dashboard)."""

    __slots__ = ()

    def get(self, trial: FrozenTrial | optuna.Trial) -> T | None:
        return trial.user_attrs.get(self)

    def read(self, trial: FrozenTrial | optuna.Trial) -> T:
        return trial.user_attrs[self]

    def set(self, trial: optuna.Trial, value: T) -> None:
        trial.set_user_attr(str(self), value)

    def set_on(self, study: optuna.Study, trial: FrozenTrial | int, value: T) -> None:
        """Set it on a trial this process holds no live handle of (a frozen trial or an id)."""
        trial_id = trial if isinstance(trial, int) else optuna_compat.trial_id_of(trial)
        optuna_compat.storage_of(study).set_trial_user_attr(trial_id, str(self), value)


class TrialSystemAttr(str, Generic[T]):
    """A trial system attr (bookkeeping that is not shown to people)."""

    __slots__ = ()

    def get(self, trial: FrozenTrial) -> T | None:
        return trial.system_attrs.get(self)

    def set_on(self, study: optuna.Study, trial: FrozenTrial | int, value: T) -> None:
        trial_id = trial if isinstance(trial, int) else optuna_compat.trial_id_of(trial)
        stored: Any = value  # JSON by construction of the accessor's type
        optuna_compat.storage_of(study).set_trial_system_attr(trial_id, str(self), stored)


# Study user_attrs, written by `study create` (and ANCHORS by the first worker)
SPEC: StudyUserAttr[dict[str, Any]] = StudyUserAttr(PREFIX + "spec")
"""The validated study spec, as a JSON-compatible dict (``StudySpec.to_json``)."""
SPEC_PATH: StudyUserAttr[str | None] = StudyUserAttr(PREFIX + "spec_path")
"""Where the spec was read from (for messages only)."""
GENOME: StudyUserAttr[dict[str, Any]] = StudyUserAttr(PREFIX + "genome")
"""``Genome.to_dict()`` (blocks, experts, searched bounds) or ``DataflowGenome.to_dict()``."""
LAYOUT: StudyUserAttr[dict[str, Any]] = StudyUserAttr(PREFIX + "layout")
"""``BlockLayout.to_dict()``."""
BLOCK_IMPORTANCE: StudyUserAttr[list[float]] = StudyUserAttr(PREFIX + "block_importance")
"""One number in [0, 1] per block."""
ANCHORS: StudyUserAttr[dict[str, Any]] = StudyUserAttr(PREFIX + "anchors")
"""Objective scores of the base and each expert, for normalization (``Anchors.to_json``)."""
CREATED_WITH: StudyUserAttr[str] = StudyUserAttr(PREFIX + "version")
"""The mergeopt version that created the study."""
HELDOUT_ANCHORS: StudyUserAttr[dict[str, Any]] = StudyUserAttr(PREFIX + "heldout_anchors")
"""``ANCHORS`` measured on the held-out split, for ``normalize: true``."""
BASELINES: StudyUserAttr[dict[str, Any]] = StudyUserAttr(PREFIX + "baselines")
"""Preference baselines fine-tuned from the base (``mergeopt baseline``), by label
(``"epo 0.7,0.3"``): method, preference, values and held-out values in objective order,
train_seconds, steps, model_dir (``baselines.record_in_study``)."""

# Study system attrs
ARTIFACT_DIR: StudySystemAttr[str] = StudySystemAttr(PREFIX + "artifact_dir")
"""The folder ``study plot`` attached the plots in, so that ``study run`` can refresh them."""
SAMPLER_EXHAUSTED: StudySystemAttr[bool] = StudySystemAttr(PREFIX + "sampler:exhausted")
"""True once a finite sampler (the model-level grid) has handed out its last point."""
FIDELITY_PLAN: StudySystemAttr[dict[str, Any]] = StudySystemAttr(PREFIX + "fidelity_plan")
"""Fidelity rungs' item order and strata per task group (``FidelityPlan.to_json``), chosen
by the first worker of a study with ``fidelity:``."""

RUN_PREFIX = PREFIX + "run:"
"""Study system attrs ``mergeopt:run:<n>``: the ``study run`` invocations on the study, each
claimed once (``workers.claim_run_number``) with its host, process and devices; ``n`` seeds
its workers' samplers."""

# Trial user_attrs of an evaluated trial (written by the worker)
RECIPE: TrialUserAttr[list[list[dict[str, float]]]] = TrialUserAttr(PREFIX + "recipe")
"""The trial's merge parameters: ``recipe[block][expert][parameter]``."""
DATAFLOW_PATH: TrialUserAttr[list[list[float]]] = TrialUserAttr(PREFIX + "dataflow_path")
"""A data-flow trial's path: ``[[source, layer, scale], ...]`` (``genome.DataflowGenome``)."""
METRICS: TrialUserAttr[dict[str, Any]] = TrialUserAttr(PREFIX + "metrics")
"""Raw per-task metrics before normalization."""
RAW_VALUES: TrialUserAttr[dict[str, float]] = TrialUserAttr(PREFIX + "raw_values")
"""Objective values before normalization, by objective name."""
BLOCKS_MERGED: TrialUserAttr[int] = TrialUserAttr(PREFIX + "blocks_merged")
"""Blocks the merge engine had to merge (unchanged blocks are skipped)."""
MERGE_SECONDS: TrialUserAttr[float] = TrialUserAttr(PREFIX + "merge_seconds")
EVAL_SECONDS: TrialUserAttr[float] = TrialUserAttr(PREFIX + "eval_seconds")
SEED: TrialUserAttr[int] = TrialUserAttr(PREFIX + "seed")
"""The seed of the trial's randomized merge (DARE/TIES masks); export repeats it."""
WORKER: TrialUserAttr[str] = TrialUserAttr(PREFIX + "worker")
"""``host:pid/device`` of the worker that ran the trial."""
# Evaluation cost of the trial's search evaluation (EVAL_SECONDS is its time). A later
# fidelity change adds what it skipped beside these, so totals can say the fraction saved.
ITEMS_SCORED: TrialUserAttr[int] = TrialUserAttr(PREFIX + "items_scored")
"""Task items the model answered or was scored on."""
TOKENS_GENERATED: TrialUserAttr[int] = TrialUserAttr(PREFIX + "tokens_generated")
"""Tokens generated over those items."""
FIDELITY: TrialUserAttr[dict[str, Any]] = TrialUserAttr(PREFIX + "fidelity")
"""Fidelity rungs of the trial: ``{"rung": index reached, "fraction": of the items,
"stopped": bool, "values": {name: estimate}, "intervals": {name: [low, high]}}`` (normalized
as the study's values; a bound is None where unbounded). A stopped (PRUNED) trial's cost is
in ``ITEMS_SCORED``, ``TOKENS_GENERATED`` and ``EVAL_SECONDS``, as a complete one's."""
STOPPED_VALUES: TrialUserAttr[list[float]] = TrialUserAttr(PREFIX + "stopped_values")
"""A trial stopped by fidelity rungs: its estimated values in objective order (normalized as
the study's values), which samplers may observe in place of the values a PRUNED trial lacks."""

# Held-out evaluation (`mergeopt study evaluate NAME --heldout`), written onto COMPLETE trials.
# Re-evaluating a trial overwrites these keys (same merge, same seed, greedy decoding: the
# values come out identical; the cost is that of the latest evaluation, never summed twice).
HELDOUT_VALUES: TrialUserAttr[dict[str, float]] = TrialUserAttr(PREFIX + "heldout_values")
"""Objective name -> value on the held-out split."""
HELDOUT_METRICS: TrialUserAttr[dict[str, Any]] = TrialUserAttr(PREFIX + "heldout_metrics")
"""Raw per-task metrics on the held-out split."""
HELDOUT_SEED: TrialUserAttr[int] = TrialUserAttr(PREFIX + "heldout_seed")
"""The merge seed used: the trial's ``SEED``."""
HELDOUT_COST: TrialUserAttr[dict[str, Any]] = TrialUserAttr(PREFIX + "heldout_cost")
"""``{"items_scored", "tokens_generated", "eval_seconds"}`` of the held-out evaluation."""

# Trial user_attrs of the trial's history
FAIL_REASON: TrialUserAttr[str] = TrialUserAttr(PREFIX + "fail_reason")
GIVEN_BACK: TrialUserAttr[bool] = TrialUserAttr(PREFIX + "given_back")
"""Closed unevaluated (surplus, interrupted, taken over, lost ask): not a failed candidate; the
candidate was requeued or never needed. Status counts these apart from failures."""
SOURCE: TrialUserAttr[str] = TrialUserAttr(PREFIX + "source")
"""Why a queued candidate exists (``expert 0``: an expert alone, enqueued at creation)."""
REQUEUED_FROM: TrialUserAttr[int] = TrialUserAttr(PREFIX + "requeued_from")
"""The number of the failed or given-back trial whose candidate this trial evaluates again."""
ADOPTED_FROM: TrialUserAttr[int] = TrialUserAttr(PREFIX + "adopted_from")
"""The number of the trial, failed as stale, whose finished evaluation this retry reports."""

# Trial system attrs
TAKEN_BY: TrialSystemAttr[int] = TrialSystemAttr(PREFIX + "taken_by")
"""On a queued candidate closed as FAIL: the number of the waiting trial that took it over."""
GRID_INDEX: TrialSystemAttr[int] = TrialSystemAttr(sampler_prefix("model-level") + "grid_index")
"""The model-level sampler's grid point of the trial."""
