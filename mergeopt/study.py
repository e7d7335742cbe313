"""Studies: create one from a spec, and read back what it stores.

A study holds everything a worker needs as JSON in its user_attrs (the spec with absolute
paths, the genome, the block layout and block importance), so that any process on any machine
can join it with nothing but the study name and the storage URL. The worker loop that runs its
trials is ``trial_loop.py``; one trial's merge and score, ``runner.py``; status, ``report.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergeopt import attrs
from mergeopt.blocks import BlockLayout
from mergeopt.errors import UserError
from mergeopt.genome import DataflowGenome, Genome, Hop, SearchGenome, genome_from_dict
from mergeopt.spec import StudySpec
from mergeopt.storage import (
    load_study,
    mask_url,
    open_storage,
    remove_sqlite_file,
    sqlite_file,
)
from mergeopt.trial_io import count_trials

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from mergeopt.checkpoints import Checkpoint


# --------------------------------------------------------------------------- creation


def study_name_for(spec: StudySpec, name: str | None) -> str:
    from mergeopt.spec import STUDY_NAME_RE

    chosen = name or spec.name
    if not chosen:
        raise UserError("the study needs a name: give --name or set name: in the spec")
    if not STUDY_NAME_RE.match(chosen):
        raise UserError(f"study name {chosen!r}: use 1-100 letters, digits, '_', '.', '-'")
    return chosen


@dataclass(frozen=True)
class StudyPlan:
    """Everything derived from a spec before a study is written: checked, nothing stored yet."""

    spec: StudySpec
    layout: BlockLayout
    genome: SearchGenome
    block_importance: list[float]


def plan_study(spec: StudySpec) -> StudyPlan:
    """Check models, method, objectives and sampler of a spec and derive layout and genome.

    Raises ``UserError`` for anything wrong; reads model headers, task files and (for block
    importance) the weights, but writes nothing.
    """
    from mergeopt.checkpoints import Checkpoint, check_mergeable
    from mergeopt.models import check_model_folder
    from mergeopt.objectives.evaluate import validate_objectives
    from mergeopt.samplers import validate_sampler_options
    from mergeopt.tracking import check_tracking

    check_tracking(spec.tracking)
    models = spec.models
    folders = [
        check_model_folder(
            reference, allow_pickle=models.allow_pickle, trust_remote_code=models.trust_remote_code
        )
        for reference in (models.base, *models.experts)
    ]
    base, *experts = (Checkpoint(path=folder) for folder in folders)
    check_mergeable(base, experts)
    validate_objectives(spec.objectives)
    _check_label_counts(spec, experts)
    if spec.merge.space == "dataflow":
        return _plan_dataflow(spec, [base, *experts])
    check_method(spec, num_experts=len(experts))

    blocks = spec.merge.blocks
    num_layers = base.num_layers
    for label, value in (
        ("num_blocks", blocks.num_blocks),
        ("layers_per_block", blocks.layers_per_block),
    ):
        if value is not None and value > num_layers:
            raise UserError(
                f"merge.blocks.{label}: {value} exceeds the {num_layers} layers of {base.path}"
            )
    layout, block_importance = _layout_and_importance(spec, folders[0], folders[1:], num_layers)
    genome = Genome(
        num_blocks=layout.num_blocks,
        num_experts=len(experts),
        searched=dict(spec.merge.search),
        fixed=dict(spec.merge.fixed),
    )
    validate_sampler_options(
        spec.sampler.name, spec.sampler.options, genome=genome, num_objectives=len(spec.objectives)
    )
    return StudyPlan(spec=spec, layout=layout, genome=genome, block_importance=block_importance)


def _plan_dataflow(spec: StudySpec, sources: list[Checkpoint]) -> StudyPlan:
    """A data-flow study's genome over ``sources`` (model A first); its layout is model A's
    layers as one block each, which only the exports' metadata reads."""
    from mergeopt.merge.dataflow import LLAMA_STYLE_LAYER
    from mergeopt.samplers import validate_sampler_options

    options = spec.merge.dataflow
    assert options is not None  # the spec fills it in for space: dataflow
    for checkpoint in sources:
        prefix = "model.layers.0."
        layer = {n.removeprefix(prefix) for n in checkpoint.names if n.startswith(prefix)}
        if not layer or not layer <= LLAMA_STYLE_LAYER:
            raise UserError(
                f"model {checkpoint.path}: data-flow search needs pre-norm Llama-style decoder "
                f"layers (model.layers.N with input_layernorm, self_attn.o_proj, mlp.down_proj: "
                f"Llama, Mistral, Qwen2, Qwen3); {checkpoint.config.get('model_type')!r} is not"
            )
    if spec.sampler.name in ("model-level", "saasbo-qnehvi"):
        raise UserError(
            f"sampler.name: {spec.sampler.name} searches merge parameters; a data-flow study "
            "uses cmaes, random, tpe, nsga2 or gp"
        )
    genome = DataflowGenome(
        source_layers=tuple(c.num_layers for c in sources),
        repeats=options.repeats,
        scale=options.scale,
    )
    validate_sampler_options(
        spec.sampler.name, spec.sampler.options, genome=None, num_objectives=len(spec.objectives)
    )
    layout = BlockLayout.fixed(sources[0].num_layers, layers_per_block=1)
    return StudyPlan(spec=spec, layout=layout, genome=genome, block_importance=[])


def _check_label_counts(spec: StudySpec, experts: list[Checkpoint]) -> None:
    """Every classification task's labels fit the head of the expert that answers it."""
    from mergeopt.checkpoints import is_sequence_classifier
    from mergeopt.objectives.tasks import label_count, load_task

    tasks = [o for o in spec.objectives if o.kind == "classification"]
    if tasks and not all(is_sequence_classifier(expert) for expert in experts):
        raise UserError(
            "classification objectives need sequence classifiers as experts "
            "(config.json architectures: *ForSequenceClassification)"
        )
    for objective in tasks:
        assert objective.head is not None  # the spec requires it for classification
        expert = experts[objective.head]
        labels = len(expert.config.get("id2label") or {}) or 2
        count = label_count(load_task(objective.task, "classification"))
        if count > labels:
            raise UserError(
                f"objective {objective.name}: label {count - 1} of {objective.task} is out of "
                f"range: the head of expert {objective.head} ({expert.path.name}) has "
                f"{labels} labels"
            )


def check_method(spec: StudySpec, *, num_experts: int) -> None:
    """The method exists, knows the global parameters, takes this many experts, and every
    per-expert parameter it needs is searched or fixed (and every searched or fixed one is one
    it uses). The checks are the method's own (``MergeMethod.check_*``), as the engine's are."""
    from mergeopt.merge.methods import get_method

    merge = spec.merge
    method = get_method(merge.method, "merge.method")
    if not method.expert_defaults:  # model_stock, karcher, sce, ram, arcee_fusion, slerp, ...
        raise UserError(
            f"merge.method: {method.name} has no per-model parameter for a study to search; "
            "merge with it by `mergeopt merge`"
        )
    method.check_method_params(merge.parameters, "merge.parameters")
    # searched or fixed per-expert values are numbers for every block: no per-tensor overrides
    method.check_expert_params(merge.search, "merge.search", required=False, overrides=False)
    method.check_expert_params(merge.fixed, "merge.fixed", required=False, overrides=False)
    method.check_required({*merge.search, *merge.fixed}, "merge.search", hint="search or fix it")
    method.check_experts(num_experts, "models.experts")


def _layout_and_importance(
    spec: StudySpec, base: Path, experts: list[Path], num_layers: int
) -> tuple[BlockLayout, list[float]]:
    """The block layout and per-block importance (task-vector size, normalized to [0, 1])."""
    from mergeopt import blocks as block_layouts

    options = spec.merge.blocks
    if options.partition == "auto":
        assert options.num_blocks is not None
        scores = block_layouts.layer_difference_scores(base, experts, metric=options.metric)
        layout = BlockLayout.by_difference(
            scores, num_blocks=options.num_blocks, alpha=options.alpha, beta=options.beta
        )
    elif options.num_blocks is not None:
        layout = BlockLayout.fixed(num_layers, num_blocks=options.num_blocks)
    else:
        layout = BlockLayout.fixed(num_layers, layers_per_block=options.layers_per_block or 1)
    importance = block_layouts.block_importance(base, experts, layout, metric=options.metric)
    return layout, [float(v) for v in importance]


def create_study(
    spec: StudySpec,
    *,
    storage_url: str,
    name: str | None = None,
    load_if_exists: bool = False,
    spec_path: str | None = None,
) -> optuna.Study:
    """Validate ``spec`` and create its study; nothing is written unless every check passes
    (a SQLite file that did not exist before is removed again)."""
    study_name = study_name_for(spec, name)
    database_file = sqlite_file(storage_url)
    new_file = database_file if database_file and not database_file.exists() else None
    try:
        return _create_study(spec, storage_url, study_name, load_if_exists, spec_path)
    except BaseException:
        if new_file is not None:  # a failed create leaves no empty database behind
            remove_sqlite_file(new_file)
        raise


def _create_study(
    spec: StudySpec,
    storage_url: str,
    study_name: str,
    load_if_exists: bool,
    spec_path: str | None,
) -> optuna.Study:
    import optuna

    storage = open_storage(storage_url)
    existing = {
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    }
    if study_name in existing:
        if not load_if_exists:
            raise UserError(
                f"study {study_name!r} already exists in {mask_url(storage_url)} "
                "(use --load-if-exists to continue it, or another --name)"
            )
        study = load_study(study_name, storage)
        stored = attrs.SPEC.get(study)
        if stored is not None and StudySpec.from_json(stored) != spec.model_copy(
            update={"name": stored.get("name")}
        ):
            raise UserError(
                f"study {study_name!r} exists with a different spec; choose another --name"
            )
        return study

    plan = plan_study(spec)
    if spec.tracking:  # the trackers' packages, and the MLflow experiment, before any worker
        from mergeopt.tracking import prepare_tracking

        prepare_tracking(spec.tracking, study_name)
    directions = [objective.direction for objective in spec.objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI says what it created
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective.name for objective in spec.objectives])
        stored_spec = spec.model_copy(update={"name": study_name, "storage": None}).to_json()
        attrs.SPEC.set(study, stored_spec)
        attrs.SPEC_PATH.set(study, spec_path)
        attrs.GENOME.set(study, plan.genome.to_dict())
        attrs.LAYOUT.set(study, plan.layout.to_dict())
        attrs.BLOCK_IMPORTANCE.set(study, plan.block_importance)
        from mergeopt import __version__

        attrs.CREATED_WITH.set(study, __version__)
        genome = plan.genome
        if spec.sampler.enqueue_experts and isinstance(genome, DataflowGenome):
            study.enqueue_trial(genome.source_alone(), user_attrs={attrs.SOURCE: "model A alone"})
        elif spec.sampler.enqueue_experts and isinstance(genome, Genome):
            for expert in range(genome.num_experts):
                study.enqueue_trial(
                    genome.expert_alone(expert),
                    user_attrs={attrs.SOURCE: f"expert {expert}"},
                )
    except BaseException:
        optuna.delete_study(study_name=study_name, storage=storage)
        raise
    return study


def stored_spec(study: optuna.Study) -> StudySpec:
    data = attrs.SPEC.get(study)
    if data is None:
        raise UserError(f"study {study.study_name!r} was not created by mergeopt (no spec stored)")
    return StudySpec.from_json(data)


def stored_genome(study: optuna.Study) -> SearchGenome:
    return genome_from_dict(attrs.GENOME.read(study))


def stored_parameter_genome(study: optuna.Study, *, done_to_it: str) -> Genome:
    """The study's parameter-space genome; a one-line ``UserError`` for a data-flow study,
    which cannot ``done_to_it`` (e.g. "be merged with mergeopt merge")."""
    genome = stored_genome(study)
    if not isinstance(genome, Genome):
        raise UserError(
            f"study {study.study_name!r} searches data-flow paths, which cannot {done_to_it}"
        )
    return genome


def stored_layout(study: optuna.Study) -> BlockLayout:
    return BlockLayout.from_dict(attrs.LAYOUT.read(study))


# --------------------------------------------------------------------------- counting


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials per state name (COMPLETE, RUNNING, FAIL, WAITING, PRUNED)."""
    return count_trials(study)


def complete_trial(study: optuna.Study, number: int, *, done_to_it: str) -> FrozenTrial:
    """Trial ``number`` of ``study``, which must exist and be COMPLETE; otherwise a one-line
    ``UserError`` saying what only COMPLETE trials can ``done_to_it`` (e.g. "be exported")."""
    from optuna.trial import TrialState

    name = study.study_name
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in by_number:
        known = f"trials 0..{len(by_number) - 1}" if by_number else "no trials"
        raise UserError(f"study {name!r} has no trial {number} ({known})")
    trial = by_number[number]
    if trial.state != TrialState.COMPLETE:
        raise UserError(
            f"trial {number} of study {name!r} is {trial.state.name}; only COMPLETE trials "
            f"can {done_to_it}"
        )
    return trial


def trial_recipe(study: optuna.Study, trial: FrozenTrial) -> list[list[dict[str, float]]]:
    """The per-block, per-expert merge parameters of a trial (stored, else from its params)."""
    recipe = attrs.RECIPE.get(trial)
    if recipe is not None:
        return [[{k: float(v) for k, v in e.items()} for e in block] for block in recipe]
    return stored_parameter_genome(study, done_to_it="have a merge recipe").block_params(
        trial.params
    )


def trial_path(study: optuna.Study, trial: FrozenTrial) -> list[Hop]:
    """The data-flow path of a trial (stored, else from its params)."""
    path = attrs.DATAFLOW_PATH.get(trial)
    if path is not None:
        return [(int(s), int(i), float(w)) for s, i, w in path]
    genome = stored_genome(study)
    if not isinstance(genome, DataflowGenome):
        raise UserError(f"study {study.study_name!r} searches merge parameters, not paths")
    return genome.path(trial.params)


def trial_seed(study: optuna.Study, trial: FrozenTrial) -> int:
    """The merge seed a trial was run with: the one it stored, else the one the worker loop
    derives for its number (a trial added outside a worker, or stored before seeds were)."""
    from mergeopt.seeds import derive_seed

    stored = attrs.SEED.get(trial)
    if stored is not None:
        return int(stored)
    return derive_seed(stored_spec(study).seed, trial.number)
