"""Studies: create one from a spec, and the worker loop that runs its trials.

A study holds everything a worker needs as JSON in its user_attrs (the spec with absolute
paths, the genome, the block layout and block importance), so that any process on any machine
can join it with nothing but the study name and the storage URL.

The worker loop is ask -> merge -> score -> tell. It keeps the study at exactly the requested
number of COMPLETE trials: a worker asks for a new trial only while COMPLETE + RUNNING trials
are fewer than the target, and waits while the remaining ones are running (they may still
fail and need a replacement).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt import attrs
from mergeopt.blocks import BlockLayout
from mergeopt.errors import UserError
from mergeopt.genome import Genome
from mergeopt.spec import StudySpec
from mergeopt.storage import (
    DatabaseUnreachable,
    TrialHeartbeats,
    batched_trial_writes,
    connection_error_text,
    count_trials,
    is_connection_error,
    load_study,
    mask_url,
    open_storage,
    remove_sqlite_file,
    sqlite_file,
    trial_state,
)

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger("mergeopt")

POLL_SECONDS = 0.5


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
    genome: Genome
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

    models = spec.models
    folders = [
        check_model_folder(
            reference, allow_pickle=models.allow_pickle, trust_remote_code=models.trust_remote_code
        )
        for reference in (models.base, *models.experts)
    ]
    base, *experts = (Checkpoint(path=folder) for folder in folders)
    check_mergeable(base, experts)
    check_method(spec, num_experts=len(experts))
    validate_objectives(spec.objectives)

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


def check_method(spec: StudySpec, *, num_experts: int) -> None:
    """The method exists, knows the global parameters, and every per-expert parameter it needs
    is searched or fixed (and every searched or fixed one is one it uses)."""
    from mergeopt.merge.methods import METHODS

    merge = spec.merge
    method = METHODS.get(merge.method)
    if method is None:
        raise UserError(
            f"merge.method: unknown method {merge.method!r}; expected one of {', '.join(METHODS)}"
        )
    for name in merge.parameters:
        if name not in method.global_defaults:
            known = ", ".join(method.global_defaults) or "none"
            raise UserError(
                f"merge.parameters.{name}: {merge.method} has no such parameter (it has: {known})"
            )
    given = {*merge.search, *merge.fixed}
    for name in sorted(given - set(method.expert_defaults)):
        raise UserError(
            f"merge.search/fixed: {merge.method} uses no per-expert {name!r} "
            f"(it uses: {', '.join(method.expert_defaults) or 'none'})"
        )
    for name, default in method.expert_defaults.items():
        if default is None and name not in given:
            raise UserError(f"merge.search: {merge.method} needs {name!r} searched or fixed")
    if method.kind == "slerp" and num_experts != 1:
        raise UserError(
            f"models.experts: slerp merges exactly one expert into the base, got {num_experts}"
        )


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
        stored = study.user_attrs.get(attrs.SPEC)
        if stored is not None and StudySpec.from_json(stored) != spec.model_copy(
            update={"name": stored.get("name")}
        ):
            raise UserError(
                f"study {study_name!r} exists with a different spec; choose another --name"
            )
        return study

    plan = plan_study(spec)
    directions = [objective.direction for objective in spec.objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI says what it created
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective.name for objective in spec.objectives])
        stored_spec = spec.model_copy(update={"name": study_name, "storage": None}).to_json()
        study.set_user_attr(attrs.SPEC, stored_spec)
        study.set_user_attr(attrs.SPEC_PATH, spec_path)
        study.set_user_attr(attrs.GENOME, plan.genome.to_dict())
        study.set_user_attr(attrs.LAYOUT, plan.layout.to_dict())
        study.set_user_attr(attrs.BLOCK_IMPORTANCE, plan.block_importance)
        from mergeopt import __version__

        study.set_user_attr(attrs.CREATED_WITH, __version__)
        if spec.sampler.enqueue_experts:
            for expert in range(plan.genome.num_experts):
                study.enqueue_trial(
                    plan.genome.expert_alone(expert),
                    user_attrs={attrs.PREFIX + "source": f"expert {expert}"},
                )
    except BaseException:
        optuna.delete_study(study_name=study_name, storage=storage)
        raise
    return study


def stored_spec(study: optuna.Study) -> StudySpec:
    data = study.user_attrs.get(attrs.SPEC)
    if data is None:
        raise UserError(f"study {study.study_name!r} was not created by mergeopt (no spec stored)")
    return StudySpec.from_json(data)


def stored_genome(study: optuna.Study) -> Genome:
    return Genome.from_dict(study.user_attrs[attrs.GENOME])


def stored_layout(study: optuna.Study) -> BlockLayout:
    return BlockLayout.from_dict(study.user_attrs[attrs.LAYOUT])


# --------------------------------------------------------------------------- counting


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials per state name (COMPLETE, RUNNING, FAIL, WAITING, PRUNED)."""
    return count_trials(study)


# --------------------------------------------------------------------------- the trial loop


class TrialRunner:
    """A worker's resident merge engine, scorer and evaluator for one study.

    Built once per worker: it loads base and experts onto ``device`` and keeps them there;
    each trial merges in place into the scorer's weights and evaluates the objectives.
    """

    def __init__(self, study: optuna.Study, *, device: str) -> None:
        import torch

        from mergeopt.merge.engine import MergeEngine
        from mergeopt.models import resolve_model

        self.spec = stored_spec(study)
        self.genome = stored_genome(study)
        self.layout = stored_layout(study)
        self.device = device
        spec = self.spec
        self.base = resolve_model(spec.models.base)
        self.experts = [resolve_model(e) for e in spec.models.experts]
        # The scorer first: the engine checks its own needs against the memory left free.
        self._build_scorer()
        self.engine = MergeEngine(
            base=self.base,
            experts=self.experts,
            layout=self.layout,
            method=spec.merge.method,
            method_params=dict(spec.merge.parameters),
            device=device,
            dtype=getattr(torch, spec.merge.dtype),
        )
        self.anchors = self._anchors(study)

    def _build_scorer(self) -> None:
        from mergeopt.objectives.evaluate import Evaluator
        from mergeopt.objectives.scorers.base import create_scorer

        options = self.spec.scorer
        self.scorer = create_scorer(
            options.backend,
            self.base,
            device=self.device,
            dtype=options.dtype,
            batch_size=options.batch_size,
            chat_template=options.chat_template,
            gpu_memory_utilization=options.gpu_memory_utilization,
            trust_remote_code=self.spec.models.trust_remote_code,
        )
        self.evaluator = Evaluator(self.spec.objectives, self.scorer, scorer_options=options)

    def _anchors(self, study: optuna.Study) -> Any:
        """Base/expert scores for normalized objectives: measured by the first worker, then read."""
        from mergeopt.objectives.normalization import Anchors, measure_anchors, needs_anchors

        if not needs_anchors(self.spec.objectives):
            return None
        stored = study.user_attrs.get(attrs.ANCHORS)
        if stored is not None:
            return Anchors.from_json(stored)
        anchors = measure_anchors(
            self.evaluator,
            self.scorer,
            base_dir=self.base,
            expert_dirs=self.experts,
            engine=self.engine,
        )
        # Workers that measured at the same time store identical values (greedy decoding).
        study.set_user_attr(attrs.ANCHORS, anchors.to_json())
        return anchors

    def evaluate(
        self, params: Mapping[str, float], *, seed: int
    ) -> tuple[list[float], dict[str, Any]]:
        """Merge the trial's recipe into the resident model and score it.

        Returns the objective values (in spec order) and the trial user_attrs to store.
        Raises ``TrialEvaluationError`` when scoring fails; a scorer left unusable is rebuilt.
        """
        from mergeopt.objectives.normalization import normalize_values
        from mergeopt.objectives.scorers.base import TrialEvaluationError

        block_params = self.genome.block_params(params)
        try:
            started = time.perf_counter()
            target = self.scorer.merge_target()
            stats = self.engine.merge(block_params, target=target, seed=seed)
            self.scorer.after_weights_loaded()
            merge_seconds = time.perf_counter() - started
            result = self.evaluator.evaluate()
        except TrialEvaluationError:
            if not self.scorer.healthy():
                logger.warning("the scorer is unusable after this failure; rebuilding it")
                self.engine.forget(self.scorer.merge_target())
                self.scorer.close()
                self._build_scorer()
            raise
        raw = result.values
        values = normalize_values(raw, self.anchors, self.spec.objectives) if self.anchors else raw
        user_attrs = {
            attrs.RECIPE: block_params,
            attrs.METRICS: result.metrics,
            attrs.MERGE_SECONDS: round(merge_seconds, 4),
            attrs.EVAL_SECONDS: round(result.seconds, 4),
            "mergeopt:blocks_merged": stats.blocks_merged,
            "mergeopt:raw_values": raw,
        }
        for name, value in values.items():
            if value != value:  # NaN: a broken merge must not enter the Pareto front
                raise TrialEvaluationError(f"objective {name} is NaN")
        return [values[objective.name] for objective in self.spec.objectives], user_attrs

    def close(self) -> None:
        self.scorer.close()


class _Interrupts:
    """Ctrl-C in a worker: the first SIGINT interrupts (at once, or at the end of a deferred
    section such as ``study.ask``); later ones — the parent forwards the terminal's signal —
    are ignored, so the handler that fails and requeues the trial always runs to its end."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "SIGINT"
        self._deferred = 0

    @classmethod
    def install(cls) -> _Interrupts:
        """Handle Ctrl-C, and SIGTERM/SIGHUP (SLURM's end of a job, a closed terminal) alike."""
        interrupts = cls()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, interrupts._handle)
        return interrupts

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self._deferred:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if self.requested and not self._deferred:
            raise KeyboardInterrupt


def _default_runner(study: optuna.Study, device: str) -> TrialRunner:
    return TrialRunner(study, device=device)


def worker_label(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}/{device}"


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    n_trials: int,
    device: str = "cpu",
    timeout: float | None = None,
    on_trial_end: Callable[[int], None] | None = None,
    runner_factory: Callable[[optuna.Study, str], TrialRunner] | None = None,
) -> int:
    """Run trials of ``study_name`` until it holds ``n_trials`` COMPLETE trials (or timeout).

    Returns how many trials this worker completed. Ctrl-C fails the running trial, enqueues its
    parameters again (so a rerun evaluates the same candidate first) and re-raises.
    ``runner_factory(study, device)`` replaces the merge-and-score runner (benchmarks of the
    storage use a no-op objective).

    Every database call of the loop survives an outage (see ``_Reconnect``): the worker backs
    off and continues when the database is back, a finished evaluation is reported then, and
    past ``worker.database_outage_limit`` seconds it raises ``DatabaseUnreachable``.
    """
    import optuna
    from optuna.trial import TrialState

    from mergeopt.objectives.scorers.base import TrialEvaluationError
    from mergeopt.samplers import create_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    probe = load_study(study_name, open_storage(storage_url))
    spec = stored_spec(probe)
    worker = spec.worker
    storage = open_storage(
        storage_url,
        heartbeat_interval=worker.heartbeat_interval,
        grace_period=worker.effective_grace_period,
        max_retry=worker.max_retry,
    )
    masked = mask_url(storage_url)
    heartbeats = TrialHeartbeats(
        storage,
        worker.heartbeat_interval,
        on_error=lambda e: logger.warning(
            "heartbeat failed (%s); retrying", connection_error_text(e, storage_url)
        ),
        on_recovered=lambda: logger.warning("heartbeat recorded again"),
    ).watch()
    reconnect = _Reconnect(
        url=storage_url, masked_url=masked, limit=worker.database_outage_limit, marks=heartbeats
    )
    genome = stored_genome(probe)
    _no_kernel_build_lock(spec.sampler.name)
    sampler = create_sampler(
        spec.sampler.name,
        spec.sampler.options,
        seed=_worker_seed(spec.seed),
        genome=genome,
        num_objectives=len(spec.objectives),
    )
    study = load_study(study_name, storage, sampler=sampler)
    interrupts = _Interrupts.install()
    runner = (runner_factory or _default_runner)(study, device)
    distributions = genome.distributions()
    label = worker_label(device)
    # After an outage every heartbeat is old: wait until the other workers' heartbeats had
    # time to resume before failing their trials as stale.
    stale_check_pause = 2 * worker.heartbeat_interval + 1
    started = time.monotonic()
    completed = 0

    def look() -> tuple[bool, dict[str, int]]:
        """Fail stale trials; whether to stop, and the trial counts."""
        if not heartbeats.outage_within(stale_check_pause):
            optuna.storages.fail_stale_trials(study)
        if _sampler_exhausted(study):
            return True, {}
        return False, trial_counts(study)

    orphans: list[int] = []

    def ask() -> optuna.Trial:
        """``study.ask``; a trial left behind by an ask that lost its connection is failed
        (and its queued candidate enqueued again) before asking anew."""
        while orphans:
            _abandon(study, orphans[0], reason="the database connection was lost during ask")
            orphans.pop(0)
        try:
            # A trial row must never exist without its handle; its parameters and worker
            # label go to the database in one transaction.
            asked = None
            with interrupts.deferred(), batched_trial_writes(study._storage):
                asked = study.ask(distributions)
                asked.set_user_attr(attrs.WORKER, label)
            return asked
        except KeyboardInterrupt:  # raised as the deferred section ends: the trial exists
            if asked is not None:
                reason = f"interrupted ({interrupts.signal_name}); requeued"
                _give_back(study, asked, reason=reason, requeue_sampled=True)
            raise
        except Exception as exc:
            if is_connection_error(exc):
                for trial_id in heartbeats.held():
                    heartbeats.release(trial_id)
                    orphans.append(trial_id)
            raise

    with heartbeats:
        try:
            while True:
                if timeout is not None and time.monotonic() - started > timeout:
                    break
                exhausted, counts = reconnect.call(look)
                if exhausted or counts["COMPLETE"] >= n_trials:
                    break
                if counts["COMPLETE"] + counts["RUNNING"] >= n_trials:
                    time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; one may fail
                    continue
                trial = None
                try:
                    trial = reconnect.call(ask)
                    if reconnect.call(_is_surplus, study, trial.number, n_trials):
                        reason = f"surplus: the study already has {n_trials}"
                        reconnect.call(_give_back, study, trial, reason=reason)
                        continue
                    outcome = _run_one(study, trial, runner, reconnect, TrialEvaluationError)
                except KeyboardInterrupt:
                    if trial is not None:
                        _give_back(
                            study,
                            trial,
                            reason=f"interrupted ({interrupts.signal_name}); requeued",
                            requeue_sampled=True,
                        )
                    raise
                finally:
                    for trial_id in heartbeats.held():  # finished or given back
                        heartbeats.release(trial_id)
                if outcome is TrialState.COMPLETE:
                    completed += 1
                    if on_trial_end is not None:
                        on_trial_end(trial.number)
        finally:
            runner.close()
    return completed


@dataclass
class _Reconnect:
    """Retries a database step with exponential back-off while the database is unreachable.

    ``call(step, *args)`` runs ``step(*args)``; on a connection-level error
    (``is_connection_error``) it logs one line per attempt with the masked URL, sleeps 0.5 s
    doubling up to 15 s, and runs it again, until ``limit`` seconds have passed since the first
    failure: then it raises ``DatabaseUnreachable``. Steps must be safe to repeat (they re-read
    what they need).
    """

    url: str
    masked_url: str
    limit: float
    marks: TrialHeartbeats
    first_delay: float = 0.5
    max_delay: float = 15.0

    def call(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delay = self.first_delay
        down_since: float | None = None
        attempt = 0
        while True:
            try:
                result = step(*args, **kwargs)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                self.marks.note_outage()
                attempt += 1
                elapsed = now - down_since
                if elapsed >= self.limit:
                    raise DatabaseUnreachable(self.masked_url, elapsed) from None
                wait = min(delay, self.limit - elapsed)
                logger.warning(
                    "database %s unreachable (%s); attempt %d, retrying in %.1f s",
                    self.masked_url,
                    connection_error_text(exc, self.url),
                    attempt,
                    wait,
                )
                time.sleep(wait)
                delay = min(2 * delay, self.max_delay)
                continue
            if down_since is not None:
                self.marks.note_outage()
                logger.warning(
                    "database %s reachable again after %.1f s; continuing",
                    self.masked_url,
                    time.monotonic() - down_since,
                )
            return result


def _no_kernel_build_lock(sampler_name: str) -> None:
    """Keep workers from JIT-compiling botorch's fused qLogNEHVI kernel.

    botorch builds (or re-checks) it with ``torch.utils.cpp_extension.load`` at the first
    acquisition, under a lock file in ``~/.cache/torch_extensions`` that torch waits on
    forever, with no owner check. A worker killed while holding it (the chaos test found this)
    left every later SAASBO fit on the machine waiting. The pure-PyTorch path computes the same
    acquisition, somewhat slower.
    """
    if not sampler_name.startswith("saasbo"):
        return
    with contextlib.suppress(ImportError, AttributeError):
        from botorch.acquisition.multi_objective import logei

        if getattr(logei, "_C", None) is None:
            logei._load_attempted = True


def _worker_seed(seed: int) -> int:
    # Distinct per process, so that independent samplers do not propose identical points.
    return (seed * 1_000_003 + os.getpid()) % (2**31)


def _sampler_exhausted(study: optuna.Study) -> bool:
    """Samplers with a finite space (model-level grid) mark the study when it is used up;
    other samplers never do, so their workers skip the read (a query per trial)."""
    from mergeopt.samplers.model_level import ModelLevelSampler, is_exhausted

    return isinstance(study.sampler, ModelLevelSampler) and is_exhausted(study)


def _is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Another worker asked at the same moment: trials before this one already fill the study."""
    earlier = count_trials(study, below_number=number)
    return earlier["COMPLETE"] + earlier["RUNNING"] >= n_trials


# User attrs that describe one evaluation attempt, not the candidate: not copied on requeue.
_ATTEMPT_ATTRS = (attrs.FAIL_REASON, attrs.WORKER, "mergeopt:requeued_from")


def _requeue_attrs(user_attrs: Mapping[str, Any], number: int) -> dict[str, Any]:
    """The candidate's user attrs (a batch sampler's generation and index) for its new trial."""
    kept = {k: v for k, v in user_attrs.items() if k not in _ATTEMPT_ATTRS}
    return {**kept, "mergeopt:requeued_from": number}


def _give_back(
    study: optuna.Study, trial: optuna.Trial, *, reason: str, requeue_sampled: bool = False
) -> None:
    """Fail a trial that will not be evaluated and enqueue its candidate again.

    A candidate popped from the queue (a sampler's batch point) always goes back, with its user
    attrs (so CMA-ES still counts it in its generation); a freshly sampled one only with
    ``requeue_sampled``. Safe to repeat after a lost connection: a finished trial is not told
    again.
    """
    from optuna.trial import TrialState

    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state.is_finished():
        return
    fixed = frozen.system_attrs.get("fixed_params")
    params = fixed or (dict(frozen.params) if requeue_sampled else None)
    trial.set_user_attr(attrs.FAIL_REASON, reason)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if params:
        study.enqueue_trial(params, user_attrs=_requeue_attrs(frozen.user_attrs, trial.number))


def _abandon(study: optuna.Study, trial_id: int, *, reason: str) -> None:
    """Fail a RUNNING trial whose ``study.ask`` never returned, and requeue its candidate."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return
    storage.set_trial_user_attr(trial_id, attrs.FAIL_REASON, reason)
    try:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # failed as stale by another worker meanwhile, and retried by it
    fixed = frozen.system_attrs.get("fixed_params")
    if fixed:
        study.enqueue_trial(fixed, user_attrs=_requeue_attrs(frozen.user_attrs, frozen.number))


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    runner: TrialRunner,
    reconnect: _Reconnect,
    evaluation_error: type[Exception],
) -> Any:
    """Evaluate one trial (its heartbeat is beaten by the worker's ``TrialHeartbeats``) and
    report the outcome, retrying the report until the database answers."""
    from optuna.trial import TrialState

    try:
        seed = _trial_seed(runner, trial)
        values, user_attrs = runner.evaluate(trial.params, seed=seed)
        user_attrs["mergeopt:seed"] = seed
    except evaluation_error as exc:
        reason = str(exc)

        def tell_failure() -> None:
            if not study._storage.get_trial(trial._trial_id).state.is_finished():
                trial.set_user_attr(attrs.FAIL_REASON, reason)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

        reconnect.call(tell_failure)
        logger.warning("trial %d failed: %s", trial.number, exc)
        return TrialState.FAIL
    return reconnect.call(lambda: _tell_result(study, trial, values, user_attrs))


def _tell_result(
    study: optuna.Study, trial: optuna.Trial, values: list[float], user_attrs: dict[str, Any]
) -> Any:
    """Record a finished evaluation; safe to repeat after a lost connection.

    If the trial was failed as stale meanwhile (its heartbeats could not reach the database, or
    the worker stalled), the evaluation is not thrown away: the retry copy that Optuna's
    ``RetryFailedTrialCallback`` queued for the same candidate is taken (atomic WAITING ->
    RUNNING) and completed with these values, so the candidate is evaluated once.
    """
    from optuna.trial import TrialState

    storage = study._storage
    state = trial_state(storage, trial._trial_id)
    if state == TrialState.COMPLETE:
        return TrialState.COMPLETE  # told by an attempt whose reply was lost
    target = trial._trial_id
    if state != TrialState.RUNNING:
        target = _adopt_retry(study, trial.number)
        if target is None:
            logger.warning(
                "trial %d was failed while its result was on the way; its candidate is "
                "retried by another trial",
                trial.number,
            )
            return TrialState.FAIL
    with batched_trial_writes(storage):
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(target, key, value)
    number = trial.number if target == trial._trial_id else storage.get_trial(target).number
    study.tell(number, values, skip_if_finished=True)
    return TrialState.COMPLETE


def _adopt_retry(study: optuna.Study, failed_number: int) -> int | None:
    """The id of the queued retry copy of trial ``failed_number``, moved to RUNNING here."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for queued in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        history = queued.system_attrs.get("retry_history") or []
        if not history or history[-1] != failed_number:
            continue
        try:
            won = storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            won = False
        if won:
            storage.set_trial_user_attr(queued._trial_id, "mergeopt:adopted_from", failed_number)
            logger.warning(
                "trial %d was failed while its result was on the way; reported as its retry, "
                "trial %d",
                failed_number,
                queued.number,
            )
            return queued._trial_id
    return None


def _trial_seed(runner: TrialRunner, trial: optuna.Trial) -> int:
    return (runner.spec.seed * 1_000_003 + trial.number) % (2**31)


# --------------------------------------------------------------------------- reporting


def objective_names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    return list(names) if names else [f"objective_{i}" for i in range(len(study.directions))]


def best_values_text(study: optuna.Study) -> str:
    """``best of each: accuracy=0.81 tokens=4.2`` over COMPLETE trials, each objective's best in
    its own direction (they may come from different trials)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return ""
    parts = []
    for index, (name, direction) in enumerate(
        zip(objective_names(study), study.directions, strict=False)
    ):
        values = [t.values[index] for t in complete if t.values is not None]
        if values:
            best = max(values) if direction == StudyDirection.MAXIMIZE else min(values)
            parts.append(f"{name}={best:.4g}")
    return "best of each: " + " ".join(parts)


def recipe_summary(params: Mapping[str, float], genome: Genome) -> str:
    """Mean of each searched parameter per expert over the blocks, e.g. ``e0.weight=0.42``."""
    from mergeopt.genome import parse_param_name

    sums: dict[str, list[float]] = {}
    for name, value in params.items():
        try:
            _, expert, param = parse_param_name(name)
        except ValueError:
            continue
        sums.setdefault(f"e{expert}.{param}", []).append(value)
    return " ".join(f"{key}={sum(v) / len(v):.2f}" for key, v in sorted(sums.items()))


def status_report(study: optuna.Study) -> dict[str, Any]:
    """Trial states, the Pareto (or best) trials and throughput, as JSON-compatible data."""
    from optuna.trial import TrialState

    counts = trial_counts(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = objective_names(study)
    genome = stored_genome(study) if attrs.GENOME in study.user_attrs else None
    experts = _expert_trial_params(study, genome)
    front = study.best_trials if complete else []
    pareto = [
        {
            "trial": t.number,
            "values": dict(zip(names, t.values or [], strict=False)),
            "recipe": recipe_summary(t.params, genome) if genome else "",
            "expert": next((name for name, params in experts if params == t.params), None),
        }
        for t in sorted(front, key=lambda t: t.number)
    ]
    throughput = None
    finished = [t for t in complete if t.datetime_start and t.datetime_complete]
    if len(finished) >= 2:
        first = min(t.datetime_start for t in finished)
        last = max(t.datetime_complete for t in finished)
        minutes = (last - first).total_seconds() / 60
        throughput = round(len(finished) / minutes, 3) if minutes > 0 else None
    eval_seconds = [t.user_attrs.get(attrs.EVAL_SECONDS) for t in complete]
    merge_seconds = [t.user_attrs.get(attrs.MERGE_SECONDS) for t in complete]
    return {
        "study": study.study_name,
        "objectives": [
            {"name": n, "direction": d.name.lower()}
            for n, d in zip(names, study.directions, strict=False)
        ],
        "states": counts,
        "pareto": pareto,
        "trials_per_minute": throughput,
        "mean_merge_seconds": _mean(merge_seconds),
        "mean_eval_seconds": _mean(eval_seconds),
    }


def _expert_trial_params(
    study: optuna.Study, genome: Genome | None
) -> list[tuple[str, dict[str, float]]]:
    """(expert folder name, the trial parameters that are that expert alone), when the genome
    has such a point (``Genome.expert_alone``: weights in [0, 1] and task arithmetic or linear)."""
    if genome is None or attrs.SPEC not in study.user_attrs:
        return []
    spec = stored_spec(study)
    if spec.merge.method not in ("task_arithmetic", "linear"):
        return []
    low, high = spec.merge.search.get("weight", (None, None)) or (None, None)
    if (low, high) != (0.0, 1.0):
        return []
    return [
        (Path(path).name or path, genome.expert_alone(index))
        for index, path in enumerate(spec.models.experts)
    ]


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return round(sum(numbers) / len(numbers), 4) if numbers else None
