"""Reading Hugging Face safetensors checkpoints tensor by tensor (never a whole model in RAM).

A :class:`Checkpoint` is a model folder: ``config.json`` plus one or more ``*.safetensors``
shards (with or without ``model.safetensors.index.json``). Tensors are read lazily through
``safetensors.safe_open`` (memory-mapped), so merging N experts never holds a second full
host copy of any model. Torch is imported here; keep this module out of light imports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.tensor_names import config_num_layers, is_classifier_head

if TYPE_CHECKING:
    import torch

TIED_HEAD = "lm_head.weight"
TIED_EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")


class Checkpoint:
    """One model folder: its config and where each tensor lives.

    Attributes:
        path: the folder.
        config: ``config.json`` as a dict.
        shard_of: tensor name -> shard file, in the order the shards list them.
        shapes: tensor name -> shape, read from the safetensors headers.
    """

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise UserError(f"model {self.path}: folder not found")
        config_path = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"model {self.path}: no config.json") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{config_path}: unreadable ({exc.__class__.__name__})") from None
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            from mergeopt.models import pickle_checkpoints

            pickled = pickle_checkpoints(self.path)
            if pickled:
                raise UserError(
                    f"model {self.path}: only pickle checkpoints ({pickled[0].name}); mergeopt "
                    "merges safetensors only: convert them with transformers' "
                    "save_pretrained(safe_serialization=True)"
                )
            raise UserError(f"model {self.path}: no *.safetensors weights")
        from safetensors import safe_open

        self.shard_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        sliced = handle.get_slice(name)
                        self.shard_of[name] = shard
                        self.shapes[name] = tuple(sliced.get_shape())
                        self.dtypes[name] = str(sliced.get_dtype())
            except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
                raise UserError(f"{shard}: not a readable safetensors file ({exc})") from None

    @property
    def tie_word_embeddings(self) -> bool:
        tied = self.config.get("tie_word_embeddings")
        if tied is None:
            tied = (self.config.get("text_config") or {}).get("tie_word_embeddings", False)
        return bool(tied)

    @property
    def num_layers(self) -> int:
        layers = config_num_layers(self.config)
        if layers is None:
            raise UserError(f"{self.path}/config.json: no num_hidden_layers (nor n_layer)")
        return layers

    @property
    def names(self) -> list[str]:
        return list(self.shard_of)

    def source_name(self, name: str) -> str:
        """The stored tensor that holds ``name`` (the embeddings for a tied, absent LM head)."""
        if name in self.shard_of:
            return name
        if name == TIED_HEAD:
            for embeddings in TIED_EMBEDDINGS:
                if embeddings in self.shard_of:
                    return embeddings
        raise UserError(f"model {self.path}: no tensor {name}")

    def num_parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


class CheckpointReader:
    """Open shards of several checkpoints at once; read any tensor in any dtype/device.

    Use as a context manager; shard handles are opened on first use and closed on exit.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint]) -> None:
        self.checkpoints = list(checkpoints)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._handles.clear()

    def read(
        self,
        model: int,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Tensor ``name`` of checkpoint ``model`` (shape as stored), cast to ``dtype``."""
        from safetensors import safe_open

        checkpoint = self.checkpoints[model]
        source = checkpoint.source_name(name)
        shard = checkpoint.shard_of[source]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._stack.enter_context(safe_open(str(shard), framework="pt"))
            self._handles[shard] = handle
        tensor = handle.get_tensor(source)
        if dtype is not None and tensor.dtype != dtype:
            # Cast on the device when the device is faster at it; never two host copies.
            tensor = tensor.to(device=device).to(dtype)
        return tensor.to(device=device)

    def read_fitted(
        self,
        model: int,
        name: str,
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Tensor ``name`` of checkpoint ``model`` in the merged ``shape`` (:func:`merge_shapes`):
        zero-padded along dimension 0 when it has fewer rows (a smaller classification head),
        zeros when the checkpoint lacks it (a base without a head)."""
        import torch

        checkpoint = self.checkpoints[model]
        if name not in checkpoint.shard_of:
            try:
                checkpoint.source_name(name)
            except UserError:
                return torch.zeros(tuple(shape), dtype=dtype, device=device)
        tensor = self.read(model, name, dtype=dtype, device=device)
        if tuple(tensor.shape) == tuple(shape):
            return tensor
        fitted = torch.zeros(tuple(shape), dtype=tensor.dtype, device=device)
        fitted[: tensor.shape[0]] = tensor
        return fitted


def is_sequence_classifier(checkpoint: Checkpoint) -> bool:
    """A ``*ForSequenceClassification`` model (its config's ``architectures`` say so)."""
    return any(
        str(name).endswith("ForSequenceClassification")
        for name in checkpoint.config.get("architectures") or ()
    )


def merge_shapes(base: Checkpoint, experts: Sequence[Checkpoint]) -> dict[str, tuple[int, ...]]:
    """Each tensor to merge and its merged shape; raises UserError when an expert does not fit.

    Causal LMs and other models: the base's tensors, every expert holding each in the same shape.

    Sequence classifiers (every expert a ``*ForSequenceClassification``, as fine-tunes of one
    encoder on tasks with different label counts are): the experts' tensors, which they must
    share. Tensors of the classification head (under a ``classifier`` module, outside the
    layers) may differ between experts in their first dimension, the label count: each is
    zero-padded to the largest (a task's missing labels score 0, which stays 0 in its task
    vector). A tensor the base lacks (the head of a base pretrained without one, BERT's pooler)
    is zeros in the base, so its task vector is the expert's whole tensor. Base tensors no expert
    has (a masked-LM head) are not merged.
    """
    for expert in experts:
        if expert.config.get("model_type") != base.config.get("model_type"):
            raise UserError(
                f"model {expert.path}: architecture {expert.config.get('model_type')!r} "
                f"differs from the base's {base.config.get('model_type')!r}"
            )
    if experts and all(is_sequence_classifier(expert) for expert in experts):
        return _classifier_shapes(base, experts)
    for expert in experts:
        for name, shape in base.shapes.items():
            try:
                source = expert.source_name(name)
            except UserError:
                raise UserError(
                    f"model {expert.path}: tensor {name} of the base {base.path} is missing"
                ) from None
            if expert.shapes[source] != shape:
                raise UserError(
                    f"model {expert.path}: tensor {name} has shape "
                    f"{list(expert.shapes[source])}, the base has {list(shape)}"
                )
    return dict(base.shapes)


def _classifier_shapes(
    base: Checkpoint, experts: Sequence[Checkpoint]
) -> dict[str, tuple[int, ...]]:
    first = experts[0]
    shapes = dict(first.shapes)
    for expert in experts[1:]:
        missing = sorted(set(first.shapes) ^ set(expert.shapes))
        if missing:
            owner = first if missing[0] in first.shapes else expert
            raise UserError(
                f"model {expert.path}: tensor {missing[0]} is in {owner.path} only (the experts "
                "must have the same tensors)"
            )
        for name, shape in expert.shapes.items():
            shapes[name] = _fitted_shape(name, shapes[name], shape, where=f"model {expert.path}")
    for name, shape in shapes.items():
        if name in base.shapes:
            merged = _fitted_shape(name, shape, base.shapes[name], where=f"base {base.path}")
            if merged != shape:
                raise UserError(
                    f"base {base.path}: tensor {name} has shape {list(base.shapes[name])}, "
                    f"larger than every expert's {list(shape)}"
                )
    return shapes


def _fitted_shape(
    name: str, shape: tuple[int, ...], other: tuple[int, ...], *, where: str
) -> tuple[int, ...]:
    """The shape both fit in: equal shapes, or a head tensor's larger label count."""
    if shape == other:
        return shape
    if is_classifier_head(name) and len(shape) == len(other) and shape[1:] == other[1:]:
        return (max(shape[0], other[0]), *shape[1:])
    kind = "classification head tensor" if is_classifier_head(name) else "tensor"
    raise UserError(
        f"{where}: {kind} {name} has shape {list(other)}, another model has {list(shape)} "
        "(only a head's label count may differ)"
    )


def check_mergeable(base: Checkpoint, experts: Sequence[Checkpoint]) -> list[str]:
    """The tensor names to merge (see :func:`merge_shapes`); raises UserError when an expert
    does not fit."""
    return list(merge_shapes(base, experts))


def iter_shards(checkpoint: Checkpoint) -> Iterator[tuple[Path, list[str]]]:
    """(shard file, tensor names in it) in shard order."""
    by_shard: dict[Path, list[str]] = {}
    for name, shard in checkpoint.shard_of.items():
        by_shard.setdefault(shard, []).append(name)
    yield from by_shard.items()


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tensor_difference_stats(
    base: Path, experts: Sequence[Path], *, device: str = "cpu"
) -> dict[str, list[tuple[float, float, float, float, int]]]:
    """Per tensor and expert: ``(Σδ², Σ b·e, Σ b², Σ e², numel)`` with ``δ = e − b`` in fp32.

    One pass over the checkpoints, one tensor of each model in memory at a time; the sums let
    callers aggregate L2 norms and cosine similarities over any group of tensors.
    """
    import torch

    base_checkpoint = Checkpoint(path=Path(base))
    expert_checkpoints = [Checkpoint(path=Path(p)) for p in experts]
    shapes = merge_shapes(base_checkpoint, expert_checkpoints)
    stats: dict[str, list[tuple[float, float, float, float, int]]] = {}
    with CheckpointReader([base_checkpoint, *expert_checkpoints]) as reader:
        for name, shape in shapes.items():
            b = reader.read_fitted(0, name, shape, dtype=torch.float32, device=device)
            if not b.is_floating_point():
                continue
            base_sq = float(b.square().sum())
            rows = []
            for index in range(len(expert_checkpoints)):
                e = reader.read_fitted(index + 1, name, shape, dtype=torch.float32, device=device)
                rows.append(
                    (
                        float((e - b).square().sum()),
                        float((b * e).sum()),
                        base_sq,
                        float(e.square().sum()),
                        b.numel(),
                    )
                )
            stats[name] = rows
    return stats
