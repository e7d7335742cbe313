"""Answer extraction and the metrics computed from generations, log-likelihoods and class
predictions.

Extraction rules (``extract`` of an objective):

- ``last_number``: the last number in the completion (``-1,234.5`` style; commas dropped), as
  Sakana's evolutionary merge and SIPBMM score GSM8K/AIME-like answers; it is correct when it
  equals the answer's number.
- ``exact``: the completion, stripped of surrounding whitespace, equals the stripped answer.
- ``regex``: the first match of ``pattern`` (its first group if it has one), stripped, equals the
  stripped answer.

Where both sides are numbers, they are compared as numbers (``"42.0"`` equals ``"42"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
EXTRACTIONS = ("last_number", "exact", "regex")


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(completion: str, *, extract: str, pattern: str | None = None) -> str | None:
    """The answer a completion gives under an extraction rule; None when it gives none."""
    if extract == "last_number":
        numbers = NUMBER_RE.findall(completion)
        return numbers[-1].replace(",", "") if numbers else None
    if extract == "exact":
        return completion.strip()
    if extract == "regex":
        if pattern is None:
            raise ValueError("extract='regex' needs a pattern")
        match = re.search(pattern, completion)
        if match is None:
            return None
        return (match.group(1) if match.groups() else match.group(0)).strip()
    raise ValueError(f"unknown extraction {extract!r}; expected one of {', '.join(EXTRACTIONS)}")


def answers_match(predicted: str | None, answer: str) -> bool:
    """Numeric equality where both parse as numbers, else equality of stripped strings."""
    if predicted is None:
        return False
    predicted_number, answer_number = _as_number(predicted), _as_number(answer)
    if predicted_number is not None and answer_number is not None:
        return math.isclose(predicted_number, answer_number, rel_tol=1e-9, abs_tol=1e-9)
    return predicted.strip() == answer.strip()


def generation_accuracy(
    completions: Sequence[str], answers: Sequence[str], *, extract: str, pattern: str | None = None
) -> float:
    """Share of completions whose extracted answer matches (0 for an empty task)."""
    if not completions:
        return 0.0
    correct = sum(
        answers_match(extract_answer(c, extract=extract, pattern=pattern), a)
        for c, a in zip(completions, answers, strict=True)
    )
    return correct / len(completions)


def mean_tokens(token_counts: Sequence[int]) -> float:
    """Mean generated tokens per item (SIPBMM's length objective)."""
    return sum(token_counts) / len(token_counts) if token_counts else 0.0


def choice_accuracy(choice_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of items whose highest-scoring choice is the answer (ties: the first choice)."""
    if not choice_scores:
        return 0.0
    correct = sum(
        max(range(len(scores)), key=lambda i: scores[i]) == answer
        for scores, answer in zip(choice_scores, answers, strict=True)
    )
    return correct / len(choice_scores)


def perplexity(log_likelihoods: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(− total log-likelihood / total scored tokens) over all texts (token-weighted)."""
    total_tokens = sum(token_counts)
    if total_tokens == 0:
        return float("nan")
    return math.exp(-sum(log_likelihoods) / total_tokens)


def macro_f1(predicted: Sequence[int], labels: Sequence[int]) -> float:
    """The mean over classes of F1 = 2·TP / (2·TP + FP + FN), over the classes that occur among
    the labels or the predictions (scikit-learn's ``f1_score(average="macro")``); 0 for no items."""
    classes = set(labels) | set(predicted)
    if not classes:
        return 0.0
    total = 0.0
    for cls in classes:
        true_positives = sum(p == cls and y == cls for p, y in zip(predicted, labels, strict=True))
        false = sum((p == cls) != (y == cls) for p, y in zip(predicted, labels, strict=True))
        total += 2 * true_positives / (2 * true_positives + false)
    return total / len(classes)
