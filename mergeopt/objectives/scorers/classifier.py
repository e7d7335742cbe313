"""The classifier scorer: one resident ``AutoModelForSequenceClassification`` per worker, for
``classification`` objectives (encoder classifiers merged with heads of different sizes).

The model is built from the base's folder (a masked-LM base gets a head of zeros: the base
has none, as the merge engine reads it). The merge writes every merged tensor into it, the
classification head merged zero-padded to the largest expert's (``checkpoints.merge_shapes``;
the head is resized on the first write). A task is answered by its own expert's head on the
merged body: the scorer keeps each expert's head tensors (those under ``classifier`` and
those the base lacks, as BERT's pooler when the base is a masked LM) and puts the task's in
before classifying. Why not the merged padded head: the heads of different tasks are
unrelated, so merging them mixes another task's label directions into each row; on the
encoder zoo a TIES merge of the four experts scored lower on every task through the shared
padded head than through the experts' own (README, "Encoder classifiers").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mergeopt.errors import UserError
from mergeopt.merge.engine import ModuleTarget
from mergeopt.objectives.scorers.base import Generation, TrialEvaluationError
from mergeopt.tensor_names import is_classifier_head

if TYPE_CHECKING:
    import torch

    from mergeopt.merge.engine import MergeTarget
    from mergeopt.merge.plan import NamedTensors

TORCH_DTYPES = ("float32", "bfloat16", "float16")


class _HeadFittingTarget(ModuleTarget):
    """A :class:`ModuleTarget` whose classification head takes the merged head's label count."""

    def __init__(self, *, scorer: ClassifierScorer) -> None:
        super().__init__(module=scorer.model)
        self._scorer = scorer

    def write(self, tensors: NamedTensors) -> None:
        for name, tensor in tensors:
            self._scorer.fit_head(name, tuple(tensor.shape))
        super().write(tensors)


class ClassifierScorer:
    """Batched logits of a resident sequence classifier.

    Args:
        model_dir: a Hugging Face model folder (config.json, safetensors, tokenizer): the base.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        dtype: the precision the model is held and run in.
        batch_size: texts per forward pass.
        expert_dirs: the experts' folders, whose heads answer their tasks (``classify``).
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        trust_remote_code: bool = False,
        expert_dirs: Sequence[Path] = (),
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        if dtype not in TORCH_DTYPES:
            raise UserError(f"scorer.dtype: {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # a masked-LM base: "newly initialized" head
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.model_dir, trust_remote_code=trust_remote_code
            )
            self.model, loading = AutoModelForSequenceClassification.from_pretrained(
                self.model_dir,
                dtype=getattr(torch, dtype),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(
                f"model {self.model_dir}: cannot load as a sequence classifier: {first_line}"
            ) from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._tensors: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        with torch.no_grad():
            for name in loading.get("missing_keys", ()):
                if name in self._tensors:  # what the folder lacks is zeros, as the engine reads it
                    self._tensors[name].zero_()
        self._target: MergeTarget | None = None
        self.heads = [self._expert_head(Path(folder)) for folder in expert_dirs]
        self.max_length = _max_length(self.tokenizer, self.model.config)

    def _expert_head(self, folder: Path) -> dict[str, torch.Tensor]:
        """An expert's own tensors: its classification head, and what the base lacks."""
        from mergeopt.checkpoints import Checkpoint, CheckpointReader

        base = Checkpoint(path=self.model_dir)
        expert = Checkpoint(path=folder)
        names = [
            name
            for name in expert.names
            if name in self._tensors and (is_classifier_head(name) or name not in base.shapes)
        ]
        with CheckpointReader([expert]) as reader:
            return {
                name: reader.read(0, name, dtype=self._tensors[name].dtype, device=self.device)
                for name in names
            }

    def _put_head(self, head: int) -> None:
        """Expert ``head``'s own tensors into the model, a smaller head zero-padded."""
        import torch

        if not 0 <= head < len(self.heads):
            raise UserError(f"classification head {head}: the scorer holds {len(self.heads)}")
        with torch.no_grad():
            for name, tensor in self.heads[head].items():
                target = self._tensors[name]
                if tensor.shape[0] > target.shape[0]:
                    self.fit_head(name, tuple(tensor.shape))
                    target = self._tensors[name]
                if target.shape == tensor.shape:
                    target.data.copy_(tensor)
                else:
                    target.data.zero_()
                    target.data[: tensor.shape[0]].copy_(tensor)

    # -- weights ---------------------------------------------------------------------------

    def fit_head(self, name: str, shape: tuple[int, ...]) -> None:
        """Resize a classification head tensor to ``shape`` (another label count), zeroed."""
        import torch

        tensor = self._tensors.get(name)
        if tensor is None or tuple(tensor.shape) == shape:
            return
        if not is_classifier_head(name) or tuple(tensor.shape[1:]) != shape[1:]:
            raise UserError(
                f"tensor {name} has shape {list(shape)}, the model {self.model_dir} "
                f"{list(tensor.shape)}"
            )
        tensor.data = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        self.model.config.num_labels = shape[0]

    def merge_target(self) -> MergeTarget:
        """The model's parameters by HF name (one object: the engine remembers what it holds)."""
        if self._target is None:
            self._target = _HeadFittingTarget(scorer=self)
        return self._target

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the model one source model (anchors): its tensors, a smaller head zero-padded,
        zeros for what it lacks (a base without a head); tensors the classifier has no place
        for (a masked-LM head) are skipped. Call ``engine.forget(scorer.merge_target())`` after."""
        import torch

        written: set[str] = set()
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = self._tensors.get(name)
                if target is None:
                    continue
                if is_classifier_head(name) and tensor.shape[0] != target.shape[0]:
                    rows = max(tensor.shape[0], target.shape[0])
                    self.fit_head(name, (rows, *target.shape[1:]))
                    target = self._tensors[name]
                    target.data.zero_()
                    target.data[: tensor.shape[0]].copy_(tensor)
                else:
                    target.data.copy_(tensor)
                written.add(name)
            for name, target in self._tensors.items():
                if name not in written and target.is_floating_point():
                    target.data.zero_()
        self.after_weights_loaded()

    def after_weights_loaded(self) -> None:
        """Nothing is cached across calls."""

    # -- scoring ---------------------------------------------------------------------------

    def classify(
        self, texts: list[str], text_pairs: list[str | None], *, head: int
    ) -> list[list[float]]:
        """Logits of expert ``head``'s classification head on the model's body, per text
        (batched, longest texts first)."""
        self._put_head(head)
        lengths = [len(t) + len(p or "") for t, p in zip(texts, text_pairs, strict=True)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        results: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            logits = self._guarded([texts[i] for i in batch], [text_pairs[i] for i in batch])
            for i, row in zip(batch, logits, strict=True):
                results[i] = row
        return results

    def _guarded(self, texts: list[str], pairs: Sequence[str | None]) -> list[list[float]]:
        import torch

        try:
            if all(pair is None for pair in pairs):
                encoded = self.tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            else:
                encoded = self.tokenizer(
                    texts,
                    [pair or "" for pair in pairs],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            with torch.inference_mode():
                logits = self.model(**encoded.to(self.device)).logits.float()
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise TrialEvaluationError(f"out of memory on {self.device}") from exc
        if not bool(torch.isfinite(logits).all()):
            raise TrialEvaluationError("non-finite logits (NaN or inf)")
        rows: list[list[float]] = logits.cpu().tolist()
        return rows

    def generate(
        self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str]
    ) -> list[Generation]:
        self._classification_only()

    def loglikelihood(self, contexts_and_continuations: list[tuple[str, str]]) -> list[float]:
        self._classification_only()

    def rolling_loglikelihood(self, texts: list[str]) -> list[tuple[float, int]]:
        self._classification_only()

    def _classification_only(self) -> NoReturn:
        raise UserError("scorer.backend classifier scores classification objectives only")

    # -- life cycle ------------------------------------------------------------------------

    def healthy(self) -> bool:
        """A one-text forward pass still runs."""
        try:
            self._guarded(["ok"], [None])
            if self.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - any failure means "rebuild the scorer"
            return False
        return True

    def close(self) -> None:
        import gc

        import torch

        self._tensors.clear()
        self.heads.clear()
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# transformers' stand-in for "no limit" when a tokenizer was saved without model_max_length
_NO_LIMIT = 10**20


def _max_length(tokenizer: Any, config: Any) -> int | None:
    """Tokens a text may keep: the tokenizer's limit and the model's position embeddings,
    whichever is smaller (a tokenizer saved without ``model_max_length`` has no limit of its
    own, and texts past the position embeddings crash the forward pass)."""
    limits = [
        limit
        for limit in (
            getattr(tokenizer, "model_max_length", None),
            getattr(config, "max_position_embeddings", None),
        )
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT
    ]
    return min(limits) if limits else None
