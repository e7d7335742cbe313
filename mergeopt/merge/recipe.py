"""Run a mergekit-format YAML recipe with mergeopt's merge math and write a Hugging Face folder.

``mergeopt merge RECIPE.yml OUT_DIR`` calls :func:`run_recipe`. The recipe is mergekit's
format; what it may hold:

- ``merge_method`` (a name in ``mergeopt.merge.methods.METHODS``), ``base_model``, ``dtype``,
  ``out_dtype``, ``tokenizer_source`` (absent or ``base``);
- ``models: [{model: PATH, parameters: {weight, density, gamma, epsilon}}]``, or ``slices`` whose
  sources share one ``layer_range`` that matches the output position (the layers line up);
- ``parameters`` (global: normalize, rescale, lambda, int8_mask, t, or per-model defaults);
- every value a scalar, a gradient list (interpolated over the layers of a slice,
  ``t = layer / (layers - 1)``; 0 outside the layers) or ``[{filter: SUBSTRING, value: ...}]``
  entries (first match on the tensor name wins), resolved exactly as mergekit 0.1.x does.

Anything else (LoRA ``model@adapter``, ``modules``, ``tokenizer``, ``chat_template``, slices that
reorder or stack layers, unknown parameters) is a :class:`UserError` naming the key. The output
is written to a temporary folder next to ``OUT_DIR`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergeopt.blocks import layer_of_tensor
from mergeopt.errors import UserError

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


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: scalars as they are, gradient lists interpolated at
    ``t``, filter entries by first substring match (None when nothing matches) — mergekit's
    ``evaluate_setting``."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            low = int(scaled)
            high = min(len(setting) - 1, low + 1)
            fraction = scaled - low
            return (1 - fraction) * setting[low] + fraction * setting[high]
        for condition in setting:
            if not isinstance(condition, Mapping) or "value" not in condition:
                raise UserError(f"parameter entry {condition!r}: expected {{filter, value}}")
            extra = set(condition) - {"filter", "value"}
            if extra:
                raise UserError(f"parameter entry: unsupported key {sorted(extra)[0]!r}")
            pattern = condition.get("filter")
            if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
                return evaluate_setting(condition["value"], tensor_name, t)
        return None
    raise UserError(f"unexpected parameter value {setting!r}")


def _resolve(scopes: Sequence[Mapping[str, Any] | None], name: str, tensor: str, t: float) -> Any:
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor, t)
            if value is not None:
                return value
    return None


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
            raise UserError(f"{where}: tokenizer_source {tokenizer_source!r} (only 'base')")
        self.where = where
        self._dir = config_path.parent
        self.dtype = self._dtype(config.get("dtype"), "dtype")
        self.out_dtype = self._dtype(config.get("out_dtype"), "out_dtype") or self.dtype
        self.parameters: Mapping[str, Any] = config.get("parameters") or {}
        self._check_params(self.parameters, "parameters", global_scope=True)
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
        if "@" in reference:
            raise UserError(f"{self.where}: {key}: LoRA adapters (model@adapter) unsupported")
        path = Path(reference).expanduser()
        if not path.is_dir() and (self._dir / path).is_dir():
            path = self._dir / path
        if not path.is_dir():
            raise UserError(f"{self.where}: {key}: model folder {reference} not found")
        return path.resolve()

    def _check_params(self, params: Any, key: str, *, global_scope: bool) -> None:
        if not isinstance(params, Mapping):
            raise UserError(f"{self.where}: {key}: expected a mapping")
        where = f"{self.where}: {key}"
        if global_scope:  # mergekit: per-model defaults may be set here too
            self.spec.check_method_params(params, where, shared=True)
        else:
            self.spec.check_expert_params(params, where, required=False)

    def _source(self, entry: Any, key: str) -> _Source:
        if not isinstance(entry, Mapping):
            raise UserError(f"{self.where}: {key}: expected {{model, parameters}}")
        extra = sorted(set(entry) - {"model", "parameters", "layer_range"})
        if extra:
            raise UserError(f"{self.where}: {key}: unsupported key {extra[0]!r}")
        params = entry.get("parameters") or {}
        self._check_params(params, f"{key}.parameters", global_scope=False)
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
        params = entry.get("parameters") or {}
        self._check_params(params, f"{key}.parameters", global_scope=True)
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

    def _slice_and_t(self, name: str, num_layers: int) -> tuple[_Slice, float]:
        layer = layer_of_tensor(name)
        if layer is None:
            first_slice = "embed" in name
            return (self.slices[0] if first_slice else self.slices[-1]), 0.0
        for piece in self.slices:
            end = num_layers if piece.end == -1 else piece.end
            if piece.start <= layer < end:
                count = end - piece.start
                return piece, ((layer - piece.start) / (count - 1) if count > 1 else 1.0)
        raise UserError(f"{self.where}: layer {layer} ({name}) is in no slice")

    def tensor_params(
        self, name: str, num_layers: int
    ) -> tuple[list[dict[str, float]], dict[str, float | bool]]:
        """(per-expert parameters, method parameters) of one tensor, mergekit's precedence:
        the model's own setting, then the slice's, then the global ``parameters``."""
        piece, t = self._slice_and_t(name, num_layers)
        shared_scopes = [piece.parameters, self.parameters]
        method_params: dict[str, float | bool] = {}
        for key, default in self.spec.global_defaults.items():
            if key in self.spec.expert_overrides:
                continue  # given per tensor with the experts' values, below
            value = _resolve(shared_scopes, key, name, t)
            if value is not None:
                method_params[key] = type(default)(value)
        experts: list[dict[str, float]] = []
        for index in self.expert_indices:
            source = piece.sources[index]
            values: dict[str, float] = {}
            for key in self.spec.expert_defaults:
                value = _resolve([source.parameters, *shared_scopes], key, name, t)
                if value is not None:
                    values[key] = float(value)
            for key in self.spec.expert_overrides:  # mergekit reads these from shared scopes
                value = _resolve(shared_scopes, key, name, t)
                if value is not None:
                    values[key] = float(value)
            self.spec.check_required(
                values, f"{self.where}: {source.path.name}, {name}", overrides=True
            )
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
    num_layers = reference.num_layers
    torch_device = torch.device(device)
    dtype_of = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    # one plan per dtype met (without a recipe dtype, tensors keep their stored dtypes);
    # exact: mergekit's operation order everywhere, as mergekit-yaml would merge
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
                    experts, method_params = recipe.tensor_params(name, num_layers)
                    stack = torch.stack(
                        [
                            reader.read(i + 1, name, dtype=base.dtype, device=torch_device)
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
        _write_config(reference, staging, recipe.out_dtype)
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


def _write_config(reference: Any, folder: Path, out_dtype: str | None) -> None:
    config = dict(reference.config)
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
