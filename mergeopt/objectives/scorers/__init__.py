"""Scorers: a model resident on one device that merged weights are written into in place.

``SCORERS`` maps each ``scorer.backend`` name of a study spec to a factory that imports its
scorer class (and its engine: transformers, vLLM) only when a scorer is built, so importing
this package stays cheap. ``base`` holds the ``Scorer`` protocol the classes implement.

A new backend is a module here with a class implementing ``base.Scorer`` and one entry in
``SCORERS``; the spec accepts every name in it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergeopt.errors import UserError

if TYPE_CHECKING:
    from mergeopt.objectives.scorers.base import Scorer


@dataclass(frozen=True)
class ScorerOptions:
    """What a scorer is built from: the model folder and the spec's ``scorer`` options.

    ``device`` is a torch device string ("cpu", "cuda:1"); the vLLM scorer runs on the device
    the process sees (set ``CUDA_VISIBLE_DEVICES`` per worker) and ignores the index.
    ``batch_size`` applies to hf and classifier (vLLM schedules the whole list itself);
    ``decode`` to hf; ``gpu_memory_utilization``, ``max_model_len`` and ``enforce_eager`` to
    vLLM; ``expert_dirs`` to classifier, which keeps each expert's classification head.
    """

    model_dir: Path
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 32
    chat_template: bool = False
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    trust_remote_code: bool = False
    enforce_eager: bool = False
    decode: str = "auto"
    expert_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ScorerClass:
    """A factory of one backend: imports ``module`` when a scorer is built and passes the
    class the ``ScorerOptions`` fields named in ``options`` (those its constructor takes)."""

    module: str
    class_name: str
    options: tuple[str, ...]

    def __call__(self, options: ScorerOptions) -> Scorer:
        scorer_class = getattr(importlib.import_module(self.module), self.class_name)
        return scorer_class(**{name: getattr(options, name) for name in self.options})


_EVERY_BACKEND = ("model_dir", "device", "dtype", "chat_template", "trust_remote_code")

SCORERS: dict[str, Callable[[ScorerOptions], Scorer]] = {
    "hf": ScorerClass(  # transformers
        "mergeopt.objectives.scorers.hf", "HFScorer", (*_EVERY_BACKEND, "batch_size", "decode")
    ),
    "vllm": ScorerClass(
        "mergeopt.objectives.scorers.vllm",
        "VLLMScorer",
        (*_EVERY_BACKEND, "gpu_memory_utilization", "max_model_len", "enforce_eager"),
    ),
    "classifier": ScorerClass(  # transformers' sequence classifiers: classification objectives
        "mergeopt.objectives.scorers.classifier",
        "ClassifierScorer",
        ("model_dir", "device", "dtype", "trust_remote_code", "batch_size", "expert_dirs"),
    ),
}
"""Scorer backends by the name a spec gives (``scorer.backend``) -> factory."""


def create_scorer(
    backend: str,
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 32,
    chat_template: bool = False,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    enforce_eager: bool = False,
    decode: str = "auto",
    expert_dirs: tuple[Path, ...] = (),
) -> Scorer:
    """A resident scorer for ``backend`` (a name in ``SCORERS``) holding the model in
    ``model_dir``; the options are those of :class:`ScorerOptions`."""
    factory = SCORERS.get(backend)
    if factory is None:
        raise UserError(
            f"scorer.backend: unknown backend {backend!r}; expected {', '.join(SCORERS)}"
        )
    return factory(
        ScorerOptions(
            model_dir=Path(model_dir),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            chat_template=chat_template,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            enforce_eager=enforce_eager,
            decode=decode,
            expert_dirs=expert_dirs,
        )
    )


__all__ = ["SCORERS", "ScorerOptions", "create_scorer"]
