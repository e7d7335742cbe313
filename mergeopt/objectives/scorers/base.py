"""What every scorer offers the evaluator and the merge engine, and the helpers they share.

The scorers by backend name are in ``mergeopt.objectives.scorers`` (``SCORERS``).

A scorer is a model resident on one device for the whole study: the merge engine writes merged
tensors into it (``merge_target``), then the evaluator asks it for greedy generations and
log-likelihoods. Nothing here imports torch, so the protocol can be named anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mergeopt.errors import UserError

if TYPE_CHECKING:
    import torch

    from mergeopt.merge.engine import MergeTarget


class TrialEvaluationError(Exception):
    """Scoring one merged model failed (generation error, NaN, out of memory).

    The worker fails that trial with ``reason`` in its user_attrs and goes on; it rebuilds the
    scorer only when ``scorer.healthy()`` says the scorer is unusable.
    """

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        super().__init__(self.reason)


@dataclass(frozen=True)
class Generation:
    """One greedy completion: its text cut before the first stop string (EOS not included), and
    ``num_tokens``, the generated tokens up to and including the one that ended it (the token
    completing a stop string, or EOS); ``max_new_tokens`` when it ran out of length."""

    text: str
    num_tokens: int


@runtime_checkable
class Scorer(Protocol):
    """A resident model that merged weights are written into and that scores tasks."""

    def merge_target(self) -> MergeTarget:
        """Where the merge engine writes merged tensors (by Hugging Face tensor name)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write full tensors by Hugging Face name (anchors, benchmarks); then call
        ``after_weights_loaded``."""
        ...

    def after_weights_loaded(self) -> None:
        """Drop whatever caches depend on the old weights (vLLM's prefix cache)."""
        ...

    def generate(
        self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str]
    ) -> list[Generation]:
        """Greedy completions of all prompts, batched over the whole list."""
        ...

    def loglikelihood(self, contexts_and_continuations: list[tuple[str, str]]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens given its context."""
        ...

    def rolling_loglikelihood(self, texts: list[str]) -> list[tuple[float, int]]:
        """For each text: (sum of log-probabilities of tokens 2..n given their prefix, n - 1)."""
        ...

    def healthy(self) -> bool:
        """Whether the scorer still works after a failed trial (else the worker rebuilds it)."""
        ...

    def close(self) -> None:
        """Free the model and its device memory."""
        ...


@runtime_checkable
class Classifier(Protocol):
    """A scorer that answers classification tasks (``scorers/classifier.py``)."""

    def classify(
        self, texts: list[str], text_pairs: list[str | None], *, head: int
    ) -> list[list[float]]:
        """Logits of expert ``head``'s classification head on the model's body, for each text
        (and its pair, where not None)."""
        ...


def format_prompt(tokenizer: Any, prompt: str, *, chat_template: bool) -> str:
    """The prompt as the model sees it: raw, or as one user turn of the tokenizer's chat template
    with the assistant's turn opened (both scorers format prompts here, so they agree)."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"scorer.chat_template is on but the tokenizer of {tokenizer.name_or_path} has none"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``; -1 if none occurs."""
    positions = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(positions) if positions else -1


def split_context_tokens(
    tokenizer: Any, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, as lm-evaluation-harness splits
    them: the whole string is tokenized once and the context's tokens are cut off its front, so a
    space or a merge across the boundary tokenizes as it would in running text. Falls back to
    separate tokenization when the whole string does not start with the context's tokens."""
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    whole_ids = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    if whole_ids[: len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
        return list(context_ids), list(whole_ids[len(context_ids) :])
    return list(context_ids), list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def scored_sequences(
    tokenizer: Any, contexts_and_continuations: list[tuple[str, str]], *, chat_template: bool
) -> tuple[list[list[int]], list[int]]:
    """For log-likelihood requests: each pair's token ids (context then continuation) and the
    position of its first continuation token, the first one scored."""
    sequences: list[list[int]] = []
    first_scored: list[int] = []
    for context, continuation in contexts_and_continuations:
        formatted = format_prompt(tokenizer, context, chat_template=chat_template)
        context_ids, continuation_ids = split_context_tokens(tokenizer, formatted, continuation)
        if not context_ids:
            raise ValueError("log-likelihood needs a non-empty context")
        sequences.append(context_ids + continuation_ids)
        first_scored.append(len(context_ids))
    return sequences, first_scored


class LoglikelihoodFromSequences:
    """``loglikelihood`` and ``rolling_loglikelihood`` for a scorer that implements one method,
    ``_score_sequences(sequences, first_scored) -> [(sum of log p, tokens scored)]`` (token ids
    in, the log-probabilities of each sequence's tokens from ``first_scored`` on)."""

    tokenizer: Any
    chat_template: bool

    def _score_sequences(
        self, sequences: list[list[int]], first_scored: list[int]
    ) -> list[tuple[float, int]]:
        raise NotImplementedError

    def loglikelihood(self, contexts_and_continuations: list[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation tokens | context) per pair (lm-eval's token split)."""
        sequences, first_scored = scored_sequences(
            self.tokenizer, contexts_and_continuations, chat_template=self.chat_template
        )
        return [total for total, _count in self._score_sequences(sequences, first_scored)]

    def rolling_loglikelihood(self, texts: list[str]) -> list[tuple[float, int]]:
        """(sum of log p(token_i | tokens before i) for i = 2..n, n - 1) per text."""
        sequences = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        return self._score_sequences(sequences, [1] * len(sequences))
