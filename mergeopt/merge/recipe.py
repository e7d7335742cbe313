"""Run a mergekit-format YAML recipe with mergeopt's merge math and write a Hugging Face folder.

``mergeopt merge RECIPE.yml OUT_DIR`` calls :func:`run_recipe`. The recipe is mergekit's
format; what it may hold:

- ``merge_method`` (a name in ``mergeopt.merge.methods.METHODS``), ``base_model``, ``dtype``,
  ``out_dtype``, ``tokenizer_source`` (absent or ``base``: :mod:`mergeopt.merge.vocabulary`);
- ``models: [{model: PATH, parameters: {weight, density, gamma, epsilon}}]``, or ``slices`` whose
  sources share one ``layer_range`` that matches the output position (the layers line up);
- ``parameters`` (global: normalize, rescale, lambda, int8_mask, t, or per-model defaults);
- every value a scalar, a gradient list (interpolated over the layers of a slice,
  ``t = layer / (layers - 1)``, each layer stack with its own count: :mod:`mergeopt.tensor_names`;
  0 outside the layers) or ``[{filter: SUBSTRING, value: ...}]`` entries (first match on the
  tensor name wins), read by :mod:`mergeopt.merge.settings` as mergekit validates them;
- embeddings are planned from the first slice, final norms and heads from the last;
- without ``dtype``, each tensor is merged in its inputs' dtypes promoted, as mergekit does.

Anything else (LoRA ``model+adapter``, ``modules``, ``tokenizer``, ``chat_template``, slices
that reorder or stack layers, slices of a model with several layer stacks, unknown parameters,
DELLA's density ± epsilon outside (0, 1)) is a :class:`UserError` naming the key; a per-model
parameter of another method (which mergekit ignores) is a warning. The output is written to a
temporary folder next to ``OUT_DIR`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergeopt.errors import UserError
from mergeopt.merge.settings import check_setting, resolve, validator_for
from mergeopt.merge.vocabulary import base_vocabulary_rows, config_vocab_size
from mergeopt.tensor_names import has_vocabulary_rows, is_post_weight, layer_counts, layer_of

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
}
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32"}
DTYPES.update({"fp16": "float16", "bf16": "bfloat16", "float": "float32", "half": "float16"})
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class _Source:
    path: Path
    parameters: Mapping[str, Any] | None


@dataclass(frozen=True)
class _Slice:
    start: int
    end: int
    sources: list[_Source]
    parameters: Mapping[str, Any] | None


class Recipe:
    """A parsed, validated recipe (see the module docstring for what is accepted)."""

    def __init__(self, *, config: Mapping[str, Any], config_path: Path) -> None:
        from mergeopt.merge.methods import get_method

        where = str(config_path)
        if not isinstance(config, Mapping):
            raise UserError(f"{where}: expected a mapping at the top level")
        unknown = sorted(set(config) - TOP_LEVEL_KEYS)
        if unknown:
            raise UserError(f"{where}: unsupported key {unknown[0]!r}")
        if "merge_method" not in config:
            raise UserError(f"{where}: merge_method is required")
        self.spec = get_method(str(config["merge_method"]), f"{where}: merge_method")
        tokenizer_source = config.get("tokenizer_source")
        if tokenizer_source not in (None, "base"):
            raise UserError(
                f"{where}: tokenizer_source {tokenizer_source!r} is not supported yet (only 'base')"
            )
        self.tokenizer_source = tokenizer_source
        self.where = where
        self._dir = config_path.parent
        self.dtype = self._dtype(config.get("dtype"), "dtype")
        self.out_dtype = self._dtype(config.get("out_dtype"), "out_dtype") or self.dtype
        self.parameters = self._check_params(
            config.get("parameters") or {}, "parameters", global_scope=True
        )
        base = config.get("base_model")
        self.base_path = self._model_path(base, "base_model") if base is not None else None
        if ("models" in config) == ("slices" in config):
            raise UserError(f"{where}: give exactly one of models and slices")
        self.slices: list[_Slice] = []
        if "models" in config:
            sources = [self._source(m, f"models[{i}]") for i, m in enumerate(config["models"])]
            self.slices.append(_Slice(start=0, end=-1, sources=sources, parameters=None))
        else:
            for index, entry in enumerate(config["slices"] or []):
                self.slices.append(self._slice(entry, f"slices[{index}]"))
        if not self.slices or not self.slices[0].sources:
            raise UserError(f"{where}: no input models")
        self._split_inputs()

    # -- parsing helpers ---------------------------------------------------------------------

    def _dtype(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if str(value) not in DTYPES:
            raise UserError(f"{self.where}: {key} {value!r} is not one of {sorted(set(DTYPES))}")
        return DTYPES[str(value)]

    def _model_path(self, reference: Any, key: str) -> Path:
        if isinstance(reference, Mapping) and set(reference) <= {"model"}:
            reference = reference.get("model")
        if not isinstance(reference, str):
            raise UserError(f"{self.where}: {key}: expected a model folder path")
        path = Path(reference).expanduser()
        if not path.is_dir() and (self._dir / path).is_dir():
            path = self._dir / path
        if not path.is_dir() and "+" in reference:
            raise UserError(
                f"{self.where}: {key}: {reference}: LoRA references (model+adapter) are not "
                "supported yet; merge the adapter into its model first (PEFT merge_and_unload)"
            )
        if not path.is_dir() and "@" in reference:
            raise UserError(
                f"{self.where}: {key}: {reference}: revisions (model@revision) are not "
                "supported; give a local model folder"
            )
        if not path.is_dir():
            raise UserError(f"{self.where}: {key}: model folder {reference} not found")
        return path.resolve()

    def _check_params(self, params: Any, key: str, *, global_scope: bool) -> Mapping[str, Any]:
        """The parameters of one scope, names and values checked; a per-model parameter of
        another method (mergekit ignores it) is dropped with a warning."""
        from mergeopt.merge.methods import METHODS

        if not isinstance(params, Mapping):
            raise UserError(f"{self.where}: {key}: expected a mapping")
        where = f"{self.where}: {key}"
        spec = self.spec
        if global_scope:  # mergekit: per-model defaults may be set here too
            spec.check_method_params(params, where, shared=True)
            kinds: dict[str, Any] = {**spec.expert_defaults, **spec.global_defaults}
        else:
            own = set(spec.expert_defaults) | set(spec.expert_overrides)
            elsewhere = {n for m in METHODS.values() for n in m.expert_defaults}
            for name in sorted(set(params) - own):
                if name in elsewhere:
                    logger.warning(
                        "%s.%s: %s has no per-model parameter %r; ignored, as mergekit does",
                        where,
                        name,
                        spec.name,
                        name,
                    )
            params = {
                name: value
                for name, value in params.items()
                if name in own or name not in elsewhere
            }
            spec.check_expert_params(params, where, required=False)
            kinds = {**spec.expert_defaults}
            kinds.update({name: spec.global_defaults[name] for name in spec.expert_overrides})
        for name, setting in params.items():
            check_setting(setting, validator_for(kinds.get(name)), f"{where}.{name}")
        return params

    def _source(self, entry: Any, key: str) -> _Source:
        if not isinstance(entry, Mapping):
            raise UserError(f"{self.where}: {key}: expected {{model, parameters}}")
        extra = sorted(set(entry) - {"model", "parameters", "layer_range"})
        if extra:
            raise UserError(f"{self.where}: {key}: unsupported key {extra[0]!r}")
        params = self._check_params(
            entry.get("parameters") or {}, f"{key}.parameters", global_scope=False
        )
        return _Source(path=self._model_path(entry.get("model"), f"{key}.model"), parameters=params)

    def _slice(self, entry: Any, key: str) -> _Slice:
        if not isinstance(entry, Mapping) or "sources" not in entry:
            raise UserError(f"{self.where}: {key}: expected {{sources, parameters}}")
        extra = sorted(set(entry) - {"sources", "parameters"})
        if extra:
            raise UserError(f"{self.where}: {key}: unsupported key {extra[0]!r}")
        ranges = {tuple(s.get("layer_range") or ()) for s in entry["sources"]}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2:
            raise UserError(f"{self.where}: {key}: sources must share one layer_range")
        start, end = (int(v) for v in next(iter(ranges)))
        expected_start = self.slices[-1].end if self.slices else 0
        if start != expected_start or end <= start:
            raise UserError(
                f"{self.where}: {key}.layer_range [{start}, {end}]: slices must follow each "
                f"other from layer 0 without reordering (expected start {expected_start})"
            )
        params = self._check_params(
            entry.get("parameters") or {}, f"{key}.parameters", global_scope=True
        )
        sources = [self._source(s, f"{key}.sources[{i}]") for i, s in enumerate(entry["sources"])]
        models = [s.path for s in sources]
        if self.slices and models != [s.path for s in self.slices[0].sources]:
            raise UserError(f"{self.where}: {key}: every slice must list the same models")
        return _Slice(start=start, end=end, sources=sources, parameters=params)

    def _split_inputs(self) -> None:
        """Which inputs are experts: methods that take a base exclude it; linear merges them
        all."""
        paths = [s.path for s in self.slices[0].sources]
        if not self.spec.base_input:
            if self.base_path is not None and self.base_path not in paths:
                raise UserError(
                    f"{self.where}: base_model of a linear merge must be one of the models"
                )
            self.input_paths = paths
            self.base_or_first = self.base_path or paths[0]
            self.expert_indices = list(range(len(paths)))
            self.spec.check_experts(len(paths), f"{self.where}: models")
            return
        if self.base_path is None:
            raise UserError(f"{self.where}: {self.spec.name} needs base_model")
        self.expert_indices = [i for i, p in enumerate(paths) if p != self.base_path]
        self.input_paths = [paths[i] for i in self.expert_indices]
        self.base_or_first = self.base_path
        self.spec.check_experts(len(self.input_paths), f"{self.where}: models besides the base")

    # -- per-tensor parameters ---------------------------------------------------------------

    def _slice_and_t(self, name: str, counts: Mapping[str, int]) -> tuple[_Slice, float]:
        """The slice a tensor is planned from and its ``t``: layers by their index in their own
        stack (each module of a multimodal model has its own count); outside the layers, the
        first slice before them (embeddings) and the last after them (final norm, head), at
        t = 0, as mergekit plans pre- and post-weights."""
        ref = layer_of(name)
        if ref is None:
            return (self.slices[-1] if is_post_weight(name) else self.slices[0]), 0.0
        for piece in self.slices:
            end = counts[ref.module] if piece.end == -1 else piece.end
            if piece.start <= ref.index < end:
                count = end - piece.start
                return piece, ((ref.index - piece.start) / (count - 1) if count > 1 else 1.0)
        raise UserError(f"{self.where}: layer {ref.index} ({name}) is in no slice")

    def check_layers(self, names: Sequence[str]) -> dict[str, int]:
        """Each layer stack's count among the base's tensor ``names``; slices need one stack."""
        counts = layer_counts(names)
        if len(counts) > 1 and self.slices[0].end != -1:
            raise UserError(
                f"{self.where}: slices of a model with several layer stacks "
                f"({', '.join(counts)}) are not supported yet; use models"
            )
        return counts

    def tensor_params(
        self, name: str, counts: Mapping[str, int]
    ) -> tuple[list[dict[str, float]], dict[str, float | bool]]:
        """(per-expert parameters, method parameters) of one tensor, mergekit's precedence:
        the model's own setting, then the slice's, then the global ``parameters``. ``counts``:
        each layer stack's layer count (:meth:`check_layers`)."""
        piece, t = self._slice_and_t(name, counts)
        shared_scopes = [piece.parameters, self.parameters]
        spec = self.spec
        method_params: dict[str, float | bool] = {}
        for key, default in spec.global_defaults.items():
            if key in spec.expert_overrides:
                continue  # given per tensor with the experts' values, below
            value = resolve(shared_scopes, key, name, t, default)
            if value is not None:
                method_params[key] = value
        experts: list[dict[str, float]] = []
        for index in self.expert_indices:
            source = piece.sources[index]
            values: dict[str, float] = {}
            for key, expert_default in spec.expert_defaults.items():
                scopes = [source.parameters, *shared_scopes]
                value = resolve(scopes, key, name, t, expert_default)
                if value is not None:
                    values[key] = value
            for key in spec.expert_overrides:  # mergekit reads these from shared scopes
                value = resolve(shared_scopes, key, name, t, spec.global_defaults[key])
                if value is not None:
                    values[key] = value
            where = f"{self.where}: {source.path.name}, {name}"
            spec.check_required(values, where, overrides=True)
            spec.check_values(values, where)
            experts.append(values)
        return experts, method_params


def run_recipe(
    config_path: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Merge the models of a mergekit YAML recipe and write a Hugging Face folder to ``out_dir``.

    Reads one tensor of each model at a time (safetensors, memory-mapped), merges it on
    ``device`` by a :class:`~mergeopt.merge.plan.MergePlan` (mergekit's operation order), and
    writes ``model-XXXXX-of-XXXXX.safetensors`` shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``, the base's ``config.json`` (dtype updated) and tokenizer
    files. ``seed`` seeds random methods.

    Raises:
        UserError: unreadable or unsupported recipe, missing models, ``out_dir`` exists.
    """
    import torch
    from safetensors.torch import save_file

    from mergeopt.checkpoints import Checkpoint, CheckpointReader, check_mergeable
    from mergeopt.merge.plan import MergePlan, tensor_seed

    config_path = Path(config_path)
    out_dir = Path(out_dir)
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{config_path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{config_path}: not a UTF-8 text file (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{config_path}: not valid YAML ({exc.__class__.__name__})") from None
    recipe = Recipe(config=config, config_path=config_path)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")

    reference = Checkpoint(path=recipe.base_or_first)
    inputs = [Checkpoint(path=p) for p in recipe.input_paths]
    names = check_mergeable(reference, inputs)
    counts = recipe.check_layers(names)
    params = {name: recipe.tensor_params(name, counts) for name in names}  # all checked first
    keep_rows = None  # tokenizer_source base: embeddings and head cut to the base tokenizer
    vocab_scope = config_vocab_size(reference.config)
    if recipe.tokenizer_source == "base" and vocab_scope is not None:
        keep_rows = base_vocabulary_rows(
            recipe.base_or_first, recipe.input_paths, vocab_scope[0][vocab_scope[1]], recipe.where
        )
    torch_device = torch.device(device)
    dtype_of = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    # one plan per dtype met; exact: mergekit's operation order, as mergekit-yaml would merge
    plans: dict[torch.dtype, MergePlan] = {}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        with CheckpointReader([reference, *inputs]) as reader:
            for name in names:
                work = dtype_of[recipe.dtype] if recipe.dtype else None
                base = reader.read(0, name, dtype=work, device=torch_device)
                if not base.is_floating_point():
                    merged = base
                else:
                    if work is None:  # mergekit: the inputs' dtypes promoted, per tensor
                        base = base.to(promoted_dtype([reference, *inputs], name, torch))
                    experts, method_params = params[name]
                    rows = None
                    if keep_rows is not None and has_vocabulary_rows(name):
                        rows = keep_rows
                        base = base[:rows]
                    stack = torch.stack(
                        [
                            reader.read(i + 1, name, dtype=base.dtype, device=torch_device)[:rows]
                            for i in range(len(inputs))
                        ]
                    )
                    plan = plans.get(base.dtype)
                    if plan is None:
                        plan = MergePlan.build(
                            recipe.spec, device=torch_device, dtype=base.dtype, exact=True
                        )
                        plans[base.dtype] = plan
                    if recipe.spec.task_vectors:
                        stack -= base
                    generator = None
                    if plan.randomized:
                        generator = torch.Generator(device=torch_device)
                        generator.manual_seed(tensor_seed(seed, name))
                    merged = plan.merge_tensor(
                        base if recipe.spec.base_input else None,
                        stack,
                        experts,
                        method_params,
                        generator=generator,
                    )
                    if recipe.out_dtype:
                        merged = merged.to(dtype_of[recipe.out_dtype])
                    del stack
                merged = merged.to("cpu").contiguous()
                size = merged.numel() * merged.element_size()
                if shards[-1] and shard_bytes + size > max_shard_bytes:
                    shards.append({})
                    shard_bytes = 0
                shards[-1][name] = merged
                shard_bytes += size
        _write_shards(shards, staging, save_file)
        _write_config(reference, staging, recipe.out_dtype, keep_rows)
        for file_name in TOKENIZER_FILES:
            source = reference.path / file_name
            if source.is_file():
                shutil.copy2(source, staging / file_name)
        (staging / "mergekit_config.yml").write_text(
            config_path.read_text(encoding="utf-8"), encoding="utf-8"
        )
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def promoted_dtype(checkpoints: Sequence[Any], name: str, torch: Any) -> Any:
    """The dtype every model's ``name`` is merged in without a recipe ``dtype``: their stored
    floating dtypes promoted (bf16 with fp32 -> fp32, bf16 with fp16 -> fp32), as mergekit
    promotes each tensor group."""
    dtype = None
    for checkpoint in checkpoints:
        stored = checkpoint.dtypes[checkpoint.source_name(name)]
        this = getattr(torch, _SAFETENSORS_DTYPES.get(stored, "float32"))
        dtype = this if dtype is None else torch.promote_types(dtype, this)
    return dtype


def _write_shards(shards: list[dict[str, Any]], folder: Path, save_file: Any) -> None:
    total = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for index, tensors in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total_size += tensor.numel() * tensor.element_size()
    index_data = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(index_data, indent=2) + "\n", encoding="utf-8"
    )


def _write_config(
    reference: Any, folder: Path, out_dtype: str | None, vocab_rows: int | None
) -> None:
    config = json.loads(json.dumps(reference.config))  # a deep copy
    scope = config_vocab_size(config)
    if vocab_rows is not None and scope is not None:
        scope[0][scope[1]] = vocab_rows
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
