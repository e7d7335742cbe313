"""A mergekit config's ``tokenizer_source: base``: the merged vocabulary is the base tokenizer's.

Checkpoints often pad their embeddings past the tokenizer (Qwen2.5, Llama-3: config
``vocab_size`` rows, fewer tokens). mergekit then writes embeddings and head with one row per
token of the base tokenizer, merged from the inputs' rows cut to that size, and sets
``vocab_size`` to it; :func:`base_vocabulary_rows` gives that row count. Inputs whose
tokenizers differ from the base's would need mergekit's token permutation, and ``union`` or
a model as the source a tokenizer of its own: both are refused in one line for now.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError


def _vocabulary(folder: Path, where: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: no tokenizer in {folder} ({exc.__class__.__name__})") from None
    return dict(tokenizer.get_vocab())


def base_vocabulary_rows(
    base: Path, inputs: Sequence[Path], config_rows: int, where: str
) -> int | None:
    """The embedding rows mergekit keeps for ``tokenizer_source: base`` (the base tokenizer's
    size), or None when that is ``config_rows`` already."""
    vocabulary = _vocabulary(base, where)
    for folder in inputs:
        if folder != base and _vocabulary(folder, where) != vocabulary:
            raise UserError(
                f"{where}: tokenizer_source base with a model whose tokenizer differs from the "
                f"base's ({folder}) is not supported yet"
            )
    rows = len(vocabulary)
    if rows > config_rows:
        raise UserError(
            f"{where}: the base tokenizer has {rows} tokens, more than the {config_rows} "
            "embedding rows; tokenizer_source base cannot add rows yet"
        )
    return rows if rows < config_rows else None


def config_vocab_size(config: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The config scope holding ``vocab_size`` (top level, else ``text_config``) and its key."""
    if isinstance(config.get("vocab_size"), int):
        return config, "vocab_size"
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text, "vocab_size"
    return None
