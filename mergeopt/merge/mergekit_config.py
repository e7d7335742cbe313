"""Run a mergekit config (mergekit's YAML) with mergeopt's merge math; write a Hugging Face folder.

``mergeopt merge CONFIG.yml OUT_DIR`` calls :func:`run_mergekit_config`. The config is mergekit's
format; what it may hold:

- ``merge_method`` (a name in ``mergeopt.merge.methods.METHODS``), ``base_model``, ``dtype``,
  ``out_dtype``; ``tokenizer_source`` or ``tokenizer:`` and ``chat_template``
  (:mod:`mergeopt.merge.vocabulary`);
- ``models: [{model: PATH, parameters: {weight, density, gamma, epsilon}}]``, or ``slices``
  whose sources give ``layer_range``s of one length (stacked, reordered or a subset: the
  frankenmerge; a slice may name its own ``base_model``; ``residual_weight``, which mergekit
  ignores, is a warning; :mod:`mergeopt.merge.mergekit_config_plan` plans each output tensor);
- a model may be a LoRA reference ``MODEL+ADAPTER`` (:mod:`mergeopt.merge.adapters`);
- ``parameters`` (global: normalize, rescale, lambda, int8_mask, t, or per-model defaults);
- every value a scalar, a gradient list (interpolated over the layers of a slice,
  ``t = layer / (layers - 1)``, each layer stack with its own count: :mod:`mergeopt.tensor_names`;
  0 outside the layers) or ``[{filter: SUBSTRING, value: ...}]`` entries (first match on the
  tensor name wins), read by :mod:`mergeopt.merge.settings` as mergekit validates them;
- or ``modules:``, each module (a layer stack; ``default``: the tensors outside the layers, or
  the whole of a one-stack model) with its own ``models`` or ``slices`` and ``parameters``;
- embeddings are planned from the first slice, final norms and heads from the last;
- without ``dtype``, each tensor is merged in its inputs' dtypes promoted, as mergekit does.

Anything else (slices of a model with several layer stacks outside ``modules:``, a tower's
layer count changed by its module's slices, unknown parameters,
DELLA's density ± epsilon outside (0, 1)) is a :class:`UserError` naming the key; a per-model
parameter of another method (which mergekit ignores) is a warning. The output is written to a
staging folder next to ``OUT_DIR`` (:func:`mergeopt.staging.staged_folder`) and renamed into place
when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergeopt.errors import UserError
from mergeopt.merge.mergekit_config_plan import MergekitConfig
from mergeopt.merge.vocabulary import (
    OutputVocabulary,
    build_vocabulary,
    chat_template,
    config_vocab_size,
)
from mergeopt.staging import staged_folder
from mergeopt.tensor_names import config_num_layers, has_vocabulary_rows

__all__ = ["MergekitConfig", "run_mergekit_config"]

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


def run_mergekit_config(
    config_path: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Merge the models of a mergekit config and write a Hugging Face folder to ``out_dir``.

    Reads one tensor of each model at a time (safetensors, memory-mapped), merges it on
    ``device`` by a :class:`~mergeopt.merge.plan.MergePlan` (mergekit's operation order), and
    writes ``model-XXXXX-of-XXXXX.safetensors`` shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``, the base's ``config.json`` (dtype, layer count and
    vocabulary size updated) and tokenizer files. ``seed`` seeds random methods.

    Raises:
        UserError: unreadable or unsupported config, missing models, ``out_dir`` exists.
    """
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
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    # LoRA references' models are made here, beside the output, and removed after the merge
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a parent folder should be, no permission, ...
        raise UserError(f"{out_dir}: cannot write a folder there ({error.strerror})") from None
    adapters = tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.adapters-", dir=out_dir.parent)
    with adapters as made:
        parsed = MergekitConfig(config=config, config_path=config_path, adapters_dir=Path(made))
        _merge(parsed, config_path, out_dir, device, seed, max_shard_bytes)


def _merge(
    parsed: MergekitConfig,
    config_path: Path,
    out_dir: Path,
    device: str,
    seed: int,
    max_shard_bytes: int,
) -> None:
    """:func:`run_mergekit_config`'s merge of a parsed config into ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from mergeopt.checkpoints import Checkpoint, CheckpointReader, check_mergeable
    from mergeopt.merge.plan import MergePlan, tensor_seed

    checkpoints = [Checkpoint(path=p) for p in parsed.paths]
    reference = checkpoints[0]
    index_of = {p: i for i, p in enumerate(parsed.paths)}
    # models: every model holds every tensor of the reference; slices: each source the layers
    # it gives (checked per tensor below)
    names = reference.names if parsed.sliced else check_mergeable(reference, checkpoints[1:])
    plans = parsed.tensor_plans(names)
    for plan in plans:
        _check_sources(plan, checkpoints, index_of, parsed.where)
    params = {plan.name: parsed.tensor_params(plan) for plan in plans}  # all checked first
    vocabulary = None  # a tokenizer of its own: embeddings and head re-indexed to it
    if parsed.tokenizer is not None:
        vocabulary = build_vocabulary(
            parsed.tokenizer, parsed.base_or_first, parsed.paths, parsed.where
        )
    template = None
    if parsed.chat_template is not None:
        template = chat_template(parsed.chat_template, parsed.paths, parsed.where)
    torch_device = torch.device(device)
    dtype_of = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    # one merge plan per dtype met; exact: mergekit's operation order, as mergekit-yaml merges
    merge_plans: dict[torch.dtype, MergePlan] = {}
    merge_method = parsed.merge_method

    # an existing empty out_dir is replaced by the final rename
    with staged_folder(out_dir) as staging:
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        with CheckpointReader(checkpoints) as reader:
            for plan in plans:
                piece = plan.piece
                models = [index_of[s.path] for s in piece.sources]
                first = piece.base if piece.base is not None else 0
                work = dtype_of[parsed.dtype] if parsed.dtype else None
                base = reader.read(
                    models[first], plan.source_names[first], dtype=work, device=torch_device
                )
                if not base.is_floating_point():
                    merged = base
                else:
                    if work is None:  # mergekit: the inputs' dtypes promoted, per tensor
                        reads = [
                            (checkpoints[m], n)
                            for m, n in zip(models, plan.source_names, strict=True)
                        ]
                        base = base.to(promoted_dtype(reads, torch))
                    experts, method_params = params[plan.name]
                    read = {first: base}
                    permute = vocabulary is not None and has_vocabulary_rows(plan.name)
                    for i in range(len(models)) if permute else piece.experts:
                        if i not in read:
                            name = plan.source_names[i]
                            read[i] = reader.read(
                                models[i], name, dtype=base.dtype, device=torch_device
                            )
                    if permute:
                        assert vocabulary is not None
                        order = sorted(read)
                        rows = vocabulary.permute(
                            [read[i] for i in order],
                            [piece.sources[i].path for i in order],
                            piece.base_model,
                        )
                        read = dict(zip(order, rows, strict=True))
                        base = read[first]
                    # the task vectors written straight into the stack: one pass, not a
                    # stacking copy and a subtraction (the same differences)
                    subtract = merge_method.task_vectors and piece.base is not None
                    stack = torch.empty(
                        (len(piece.experts), *base.shape), dtype=base.dtype, device=torch_device
                    )
                    for row, i in zip(stack, piece.experts, strict=True):
                        if subtract:
                            torch.sub(read[i], base, out=row)
                        else:
                            row.copy_(read[i])
                    del read
                    merge_plan = merge_plans.get(base.dtype)
                    if merge_plan is None:
                        merge_plan = MergePlan.build(
                            merge_method, device=torch_device, dtype=base.dtype, exact=True
                        )
                        merge_plans[base.dtype] = merge_plan
                    generator = None
                    if merge_plan.randomized:
                        generator = torch.Generator(device=torch_device)
                        generator.manual_seed(tensor_seed(seed, plan.name))
                    merged = merge_plan.merge_tensor(
                        base if piece.base is not None else None,
                        stack,
                        experts,
                        method_params,
                        generator=generator,
                    )
                    if parsed.out_dtype:
                        merged = merged.to(dtype_of[parsed.out_dtype])
                    del stack
                merged = merged.to("cpu").contiguous()
                size = merged.numel() * merged.element_size()
                if shards[-1] and shard_bytes + size > max_shard_bytes:
                    shards.append({})
                    shard_bytes = 0
                shards[-1][plan.name] = merged
                shard_bytes += size
        _write_shards(shards, staging, save_file)
        vocab_rows = None if vocabulary is None else vocabulary.rows
        _write_config(reference, staging, parsed.config_dtype, vocab_rows, parsed.layer_sources)
        _write_tokenizer(reference.path, staging, vocabulary, parsed.chat_template, template)
        (staging / "mergekit_config.yml").write_text(
            config_path.read_text(encoding="utf-8"), encoding="utf-8"
        )


def _write_tokenizer(
    reference: Path,
    folder: Path,
    vocabulary: OutputVocabulary | None,
    template_asked: str | None,
    template: str | None,
) -> None:
    """The output's tokenizer, as mergekit-yaml writes it: a built one saved (with the chat
    template set); else the reference's files copied, or, when a chat template is asked for,
    the reference's tokenizer loaded and saved with it."""
    if vocabulary is None and template_asked is None:
        for file_name in TOKENIZER_FILES:
            source = reference / file_name
            if source.is_file():
                shutil.copy2(source, folder / file_name)
        return
    if vocabulary is not None:
        tokenizer = vocabulary.tokenizer
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(reference))
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))


def _check_sources(
    plan: Any, checkpoints: Sequence[Any], index_of: dict[Path, int], where: str
) -> None:
    """Every source of a sliced tensor holds it, in one shape."""
    shapes = set()
    for source, name in zip(plan.piece.sources, plan.source_names, strict=True):
        checkpoint = checkpoints[index_of[source.path]]
        try:
            shapes.add(checkpoint.shapes[checkpoint.source_name(name)])
        except UserError:
            raise UserError(
                f"{where}: {plan.name}: model {source.path} has no tensor {name}"
            ) from None
    if len(shapes) > 1:
        raise UserError(f"{where}: {plan.name}: the sources' shapes differ ({sorted(shapes)})")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def promoted_dtype(reads: Sequence[tuple[Any, str]], torch: Any) -> Any:
    """The dtype the tensors ``reads`` (checkpoint, name) are merged in without a config
    ``dtype``: their stored floating dtypes promoted (bf16 with fp32 -> fp32, bf16 with fp16
    -> fp32), as mergekit promotes each tensor group."""
    dtype = None
    for checkpoint, name in reads:
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
    reference: Any,
    folder: Path,
    out_dtype: str | None,
    vocab_rows: int | None,
    layer_sources: list[int],
) -> None:
    """The reference's config, with the dtype written, the vocabulary size cut and, where
    slices set the layers, their count and the per-layer lists (``layer_types``) following
    them (``layer_sources[j]``: output layer j's layer in its source)."""
    config = json.loads(json.dumps(reference.config))  # a deep copy
    old_layers = config_num_layers(config)
    if layer_sources and old_layers != len(layer_sources):
        for scope in (config, config.get("text_config") or {}):
            for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                if key in scope:
                    scope[key] = len(layer_sources)
            per_layer = scope.get("layer_types")
            if isinstance(per_layer, list) and len(per_layer) == old_layers:
                scope["layer_types"] = [per_layer[i % len(per_layer)] for i in layer_sources]
    scope = config_vocab_size(config)
    if vocab_rows is not None and scope is not None:
        scope[0][scope[1]] = vocab_rows
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
