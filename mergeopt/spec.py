"""The study spec: a YAML file that names models, merge method, blocks, objectives and sampler.

Every default of a study lives here. ``load_spec`` turns a file into a validated ``StudySpec``
or raises ``UserError`` with one line naming the file, the field and what was expected.
Relative paths in a spec are resolved against the spec file's folder, so the stored spec
(JSON in the study's user_attrs) holds absolute paths that every worker can use.

Example (``studies/tiny.yaml``)::

    name: tiny
    models:
      base: ../zoo/base
      experts: [../zoo/expert-direct, ../zoo/expert-steps]
    merge:
      method: task_arithmetic
      blocks: {num_blocks: 4}
      search: {weight: [0.0, 1.0]}
    objectives:
      - {name: accuracy, task: ../zoo/tasks/arith.jsonl, metric: accuracy, direction: maximize}
      - {name: tokens, task: ../zoo/tasks/arith.jsonl, metric: mean_tokens, direction: minimize}
    sampler: {name: tpe}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeopt.errors import UserError, read_user_text

STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# Per-expert merge parameters that may be searched or fixed, as mergekit names them.
EXPERT_PARAMETERS = ("weight", "density", "gamma", "epsilon")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsSpec(_Strict):
    """The base model and the fine-tuned experts merged into it (local folders or hub ids)."""

    base: str
    experts: list[str] = Field(min_length=1)
    allow_pickle: bool = False
    trust_remote_code: bool = False


class BlocksSpec(_Strict):
    """How decoder layers are grouped into blocks that share merge parameters.

    ``partition: fixed`` uses ``num_blocks`` or ``layers_per_block`` (default: one layer per
    block). ``partition: auto`` groups consecutive layers by the experts' functional difference
    into ``num_blocks`` blocks (SIPBMM: ``alpha`` weighs within-block variance, ``beta``
    imbalance between block sizes).
    """

    partition: Literal["fixed", "auto"] = "fixed"
    num_blocks: int | None = Field(default=None, ge=1)
    layers_per_block: int | None = Field(default=None, ge=1)
    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=1.0, ge=0)
    metric: Literal["l2", "cosine"] = "l2"

    @model_validator(mode="after")
    def _one_size(self) -> BlocksSpec:
        if self.num_blocks is not None and self.layers_per_block is not None:
            raise ValueError("give num_blocks or layers_per_block, not both")
        if self.partition == "auto" and self.num_blocks is None:
            raise ValueError("partition: auto needs num_blocks")
        return self


class DataflowSpec(_Strict):
    """Data-flow search (``merge: {space: dataflow}``): the path tokens take through the
    decoder layers of the source models (``models.base`` is model A, then ``models.experts``),
    Sakana's DFS. ``repeats``: how many times every layer is offered (``r``, so ``T = M x r``
    candidate hops for ``M`` layers in all). ``scale``: bounds of each hop's searched input
    scaling (log scale, 1 in the middle), or null for none (every scale 1)."""

    repeats: int = Field(default=2, ge=1)
    scale: tuple[float, float] | None = (0.5, 2.0)

    @field_validator("scale")
    @classmethod
    def _positive(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] < value[1]:
            raise ValueError("scale must be [low, high] with 0 < low < high")
        return value


class MergeSpec(_Strict):
    """The fusion method, its global parameters and the searched per-expert parameters.

    ``space``: ``parameter`` (per-block merge parameters, the default) or ``dataflow`` (the
    path through the source models' layers, options in ``dataflow``; ``method`` is then
    ``passthrough``, which is what its mergekit export is, and is filled in when left out).
    """

    method: str
    space: Literal["parameter", "dataflow"] = "parameter"
    dataflow: DataflowSpec | None = None
    parameters: dict[str, float | bool] = Field(default_factory=dict)
    blocks: BlocksSpec = Field(default_factory=BlocksSpec)
    search: dict[str, tuple[float, float]] = Field(default_factory=lambda: {"weight": (0.0, 1.0)})
    fixed: dict[str, float] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("search", "fixed")
    @classmethod
    def _known_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if name not in EXPERT_PARAMETERS:
                raise ValueError(
                    f"unknown per-expert parameter {name!r}; expected one of "
                    f"{', '.join(EXPERT_PARAMETERS)}"
                )
        return value

    @field_validator("search")
    @classmethod
    def _bounds(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        if not value:
            raise ValueError("search at least one parameter, e.g. {weight: [0.0, 1.0]}")
        for name, (low, high) in value.items():
            if not low < high:
                raise ValueError(f"bounds of {name} must be [low, high] with low < high")
            if name in ("density", "gamma", "epsilon") and not (low >= 0.0 and high <= 1.0):
                raise ValueError(f"bounds of {name} must lie in [0, 1]")
        return value

    @model_validator(mode="before")
    @classmethod
    def _dataflow_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("space") == "dataflow":
            # ``dataflow:`` left empty in YAML is None: the defaults, as when it is left out
            return {"method": "passthrough", **data, "dataflow": data.get("dataflow") or {}}
        return data

    @model_validator(mode="after")
    def _space_fields(self) -> MergeSpec:
        if self.space == "parameter":
            if self.dataflow is not None:
                raise ValueError("dataflow options need space: dataflow")
            return self
        if self.method != "passthrough":
            raise ValueError("space: dataflow searches a path, not a merge; leave method out")
        defaults = MergeSpec(method="passthrough")  # a stored spec holds every default
        searched = [
            name
            for name in ("blocks", "dtype", "fixed", "parameters", "search")
            if getattr(self, name) != getattr(defaults, name)
        ]
        if searched:
            raise ValueError(
                "space: dataflow searches no merge parameters (its layers run in scorer.dtype); "
                "remove " + ", ".join(sorted(searched))
            )
        return self

    @model_validator(mode="after")
    def _disjoint(self) -> MergeSpec:
        both = set(self.search) & set(self.fixed)
        if both:
            raise ValueError(f"{', '.join(sorted(both))} both searched and fixed")
        return self


class ObjectiveSpec(_Strict):
    """One objective: a metric of the merged model on a task file, and its direction."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: str
    kind: Literal["generation", "multiple_choice", "perplexity", "classification", "evalscope"] = (
        "generation"
    )
    metric: str = "accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    extract: Literal["last_number", "exact", "regex"] = "last_number"
    pattern: str | None = None
    limit: int | None = Field(default=None, ge=1)
    subsample_seed: int = 0
    heldout: str | None = None
    normalize: bool = False
    evalscope: dict[str, Any] | None = None
    head: int | None = Field(default=None, ge=0)
    """``classification``: the expert (its index in ``models.experts``) whose classification
    head answers this task on the merged model's body."""
    train: str | None = None
    """``classification``: the task's training items, which ``mergeopt baseline`` fine-tunes
    on (default: the search split); studies never read it."""

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveSpec:
        metrics = {
            "generation": ("accuracy", "mean_tokens"),
            "multiple_choice": ("accuracy",),
            "perplexity": ("perplexity",),
            "classification": ("accuracy", "macro_f1"),
        }
        if self.kind in metrics and self.metric not in metrics[self.kind]:
            raise ValueError(
                f"metric of a {self.kind} task must be one of "
                f"{', '.join(metrics[self.kind])}, got {self.metric!r}"
            )
        if self.extract == "regex" and not self.pattern:
            raise ValueError("extract: regex needs a pattern")
        if (self.kind == "classification") != (self.head is not None):
            raise ValueError(
                "head (the index of the expert whose classification head answers the task) "
                "is required for kind: classification, and only there"
            )
        if self.train is not None and self.kind != "classification":
            raise ValueError(
                "train (the items mergeopt baseline fine-tunes on) is for kind: classification only"
            )
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        return self


class SamplerSpec(_Strict):
    """The optimizer, by name, and its keyword options.

    ``enqueue_experts: true`` makes each expert alone (its weight at the upper bound, the
    others' at the lower) the study's first trials, so the front starts from the source models.
    """

    name: str = "tpe"
    options: dict[str, Any] = Field(default_factory=dict)
    enqueue_experts: bool = False


class ScorerSpec(_Strict):
    """How merged models are scored: backend, precision, batching and generation limits."""

    backend: str = "hf"  # a name in mergeopt.objectives.scorers.SCORERS
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    chat_template: bool = False
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # vllm: no torch.compile and no CUDA graphs; the engine starts in seconds instead of tens of
    # seconds (each worker pays that once) and generates more slowly.
    enforce_eager: bool = False
    # hf: a static KV cache with its decode step captured as a CUDA graph ("static"), or
    # transformers' dynamic cache; "auto" is static on CUDA (same greedy tokens either way).
    decode: Literal["auto", "static", "dynamic"] = "auto"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        from mergeopt.objectives.scorers import SCORERS

        if backend not in SCORERS:
            names = [repr(name) for name in SCORERS]
            expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise ValueError(f"Input should be {expected}")
        return backend


class WorkerSpec(_Strict):
    """Crash recovery: a trial whose worker stops heartbeating for ``grace_period`` seconds is
    failed and re-enqueued (at most ``max_retry`` times) by the next worker that looks.

    ``database_outage_limit``: how many seconds a worker keeps retrying (with exponential
    back-off, 0.5 s doubling up to 15 s) when the study's database stops answering, e.g. while
    PostgreSQL restarts. A finished evaluation is kept and reported once the database is back;
    past the limit the worker exits with one ``error: database ... unreachable`` line, leaving
    the study as a crash would (its running trial is failed and retried by the next run).
    """

    heartbeat_interval: int = Field(default=10, ge=1)
    grace_period: int | None = Field(default=None, ge=1)
    max_retry: int = Field(default=3, ge=0)
    database_outage_limit: int = Field(default=300, ge=1)

    @property
    def effective_grace_period(self) -> int:
        return self.grace_period if self.grace_period is not None else 3 * self.heartbeat_interval


class FidelitySpec(_Strict):
    """Fidelity rungs (off unless given): score a trial on a fraction of each task's items
    first, and stop it there (PRUNED) when even the optimistic corner of its objectives'
    confidence intervals is dominated by the study's COMPLETE trials.

    ``rungs``: fractions of the items scored by each rung, strictly increasing in (0, 1],
    the last 1.0. ``confidence``: two-sided level of each objective's interval.
    ``first_rung_items``: ``informative`` (items on which the source models disagree first,
    padded with random ones) or ``random``. ``estimator``: ``calibrated`` (predict the full
    value from the rung's with a line fitted on the study's COMPLETE trials, once 8 finished)
    or ``design`` (intervals of the items as a random sample only).
    """

    rungs: list[float] = Field(default_factory=lambda: [0.25, 1.0], min_length=1)
    confidence: float = Field(default=0.9, gt=0, lt=1)
    first_rung_items: Literal["informative", "random"] = "informative"
    estimator: Literal["calibrated", "design"] = "calibrated"

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(not 0 < rung <= 1 for rung in value):
            raise ValueError("every rung is a fraction of the items in (0, 1]")
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("rungs must be strictly increasing")
        if value[-1] != 1.0:
            raise ValueError("the last rung must be 1.0 (every item)")
        return value


class StudySpec(_Strict):
    """A whole study: what is merged, how it is scored, and how the search runs.

    ``tracking`` names experiment trackers (``mlflow``, ``wandb``) and their options; every
    finished trial is logged to each (``mergeopt/tracking.py``). Off when empty; a list of
    names means each with its default options.
    """

    name: str | None = None
    storage: str | None = None
    models: ModelsSpec
    merge: MergeSpec
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scorer: ScorerSpec = Field(default_factory=ScorerSpec)
    worker: WorkerSpec = Field(default_factory=WorkerSpec)
    tracking: dict[str, dict[str, Any]] = Field(default_factory=dict)
    fidelity: FidelitySpec | None = None
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _study_name(cls, value: str | None) -> str | None:
        if value is not None and not STUDY_NAME_RE.match(value):
            raise ValueError("a study name is 1-100 letters, digits, '_', '.', '-'")
        return value

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        """``[mlflow, wandb]`` or ``{mlflow: }`` mean the trackers' default options."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(name, str) for name in value):
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {name: {} if options is None else options for name, options in value.items()}
        return value

    @field_validator("objectives")
    @classmethod
    def _unique_names(cls, value: list[ObjectiveSpec]) -> list[ObjectiveSpec]:
        names = [objective.name for objective in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"objective names must be unique: {', '.join(duplicated)}")
        return value

    @model_validator(mode="after")
    def _dataflow_scorer(self) -> StudySpec:
        if self.merge.space == "dataflow" and self.scorer.backend != "hf":
            raise ValueError(
                f"scorer.backend: {self.scorer.backend} cannot change the model's depth per "
                "trial in place, which merge space dataflow needs; use backend: hf"
            )
        if self.merge.space == "dataflow" and self.scorer.decode == "static":
            raise ValueError(
                "scorer.decode: static replays a decode step captured for one layer path, and "
                "merge space dataflow changes the path every trial; use decode: dynamic or auto "
                "(which decodes dynamically for data-flow studies)"
            )
        return self

    @model_validator(mode="after")
    def _scorer_options_used(self) -> StudySpec:
        """Every scorer option given is one the backend reads (no option is silently dead)."""
        from mergeopt.objectives.scorers import SCORERS

        defaults = ScorerSpec()
        read = set(getattr(SCORERS[self.scorer.backend], "options", ()))
        if any(o.kind != "classification" for o in self.objectives):
            read |= {"max_new_tokens", "stop"}  # the evaluator's generation options
        ignored = [
            name
            for name in ScorerSpec.model_fields
            if name != "backend"
            and name not in read
            and getattr(self.scorer, name) != getattr(defaults, name)
        ]
        if ignored:
            raise ValueError(
                f"scorer.{ignored[0]}: backend {self.scorer.backend} does not use it; remove "
                + ", ".join(f"scorer.{name}" for name in ignored)
            )
        return self

    @model_validator(mode="after")
    def _fidelity_needs_task_files(self) -> StudySpec:
        if self.fidelity is not None and any(o.kind == "evalscope" for o in self.objectives):
            raise ValueError("fidelity rungs need task-file objectives (not kind: evalscope)")
        if self.fidelity is not None and any(o.metric == "macro_f1" for o in self.objectives):
            raise ValueError("fidelity rungs need per-item metrics (not macro_f1)")
        return self

    @model_validator(mode="after")
    def _classifier_scores_classification(self) -> StudySpec:
        """The classifier scorer answers classification objectives, and only it does."""
        classifying = [o.kind == "classification" for o in self.objectives]
        if self.scorer.backend == "classifier" and not all(classifying):
            raise ValueError(
                "scorer.backend classifier scores kind: classification objectives only"
            )
        if self.scorer.backend != "classifier" and any(classifying):
            raise ValueError("kind: classification objectives need scorer.backend: classifier")
        experts = len(self.models.experts)
        for objective in self.objectives:
            if objective.head is not None and objective.head >= experts:
                raise ValueError(
                    f"objective {objective.name}: head {objective.head} is not an expert's index "
                    f"(0..{experts - 1} for the {experts} models.experts)"
                )
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudySpec:
        return cls.model_validate(data)


def _resolve(path: str, folder: Path) -> str:
    """An absolute path for a relative one; hub ids (``org/name`` that is no local path) stay."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    local = (folder / candidate).resolve()
    if local.exists() or path.startswith((".", "/")) or path.count("/") != 1:
        return str(local)
    return path


def _resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    models = data.get("models")
    if isinstance(models, dict):
        if isinstance(models.get("base"), str):
            models["base"] = _resolve(models["base"], folder)
        if isinstance(models.get("experts"), list):
            models["experts"] = [
                _resolve(e, folder) if isinstance(e, str) else e for e in models["experts"]
            ]
    for objective in data.get("objectives") or []:
        if isinstance(objective, dict):
            for key in ("task", "heldout", "train"):
                if isinstance(objective.get(key), str):
                    objective[key] = str((folder / Path(objective[key]).expanduser()).resolve())
    return data


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line: ``source: field.path: what was expected`` (+ how many more problems)."""
    # A misspelt field shows up as "unknown" and as "missing": name the misspelling first.
    problems = sorted(error.errors(), key=lambda p: p["type"] != "extra_forbidden")
    first = problems[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required field is missing"
    more = (
        f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})"
        if len(problems) > 1
        else ""
    )
    return f"{source}: {location}: {message}{more}"


def parse_spec(data: Any, *, source: str, folder: Path) -> StudySpec:
    """Validate an already-parsed spec mapping; relative paths are taken from ``folder``."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of spec fields at the top level")
    try:
        return StudySpec.model_validate(_resolve_paths(data, folder))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one silently, so a second ``merge:`` section would drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are pydantic's to reject
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file; every problem is a one-line ``UserError``."""
    path = Path(path)
    text = read_user_text(path, "spec file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_spec(data, source=str(path), folder=path.resolve().parent)
