"""A mergekit config's output tokenizer and the embedding rows that follow it.

``tokenizer_source`` (``base``, ``union`` or a model) or a ``tokenizer:`` block (``source``,
``tokens``, ``pad_to_multiple_of``) gives the merged model a tokenizer of its own, built as
mergekit builds it: ``base`` is the base model's (or the first model's), ``union`` the base's
plus every model's tokens it lacks (in the config's model order), a model that model's; tokens
named under ``tokens`` are added. Every model's embeddings and head are then re-indexed to that
vocabulary before merging (:meth:`OutputVocabulary.permute`): a token a model lacks takes a
default row (the one model that has it, else the base's row, else the mean over the models that
have it, else zeros; or what ``tokens`` says, ``force`` overriding even present rows), rows past
the vocabulary (``pad_to_multiple_of``) the mean row, and ``vocab_size`` is the vocabulary's
size. Checkpoints that pad their embeddings (Qwen2.5, Llama-3) therefore come out cut to their
tokenizer. A base tokenizer with more tokens than its ``vocab_size`` (which mergekit strips by
rewriting its BPE model) is refused in one line.

``chat_template`` (a template, ``auto``: the most common among the models, or a template name
mergekit ships, read from an installed mergekit) is written into the output tokenizer
(:func:`chat_template`).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError

logger = logging.getLogger(__name__)

ModelPathOf = Callable[[Any, str], Path]
"""Resolves a model reference of the config (and the key it sits under) to a folder."""


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from (``tokenizer.tokens.TOKEN.source``): ``zero``; a model's
    own row for the token (``model``); or a model's row of another token (``model_token``, by
    ``token_id`` or ``token``). ``force``: even in models that have the token."""

    kind: str
    model: Path | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The config's tokenizer: its ``source`` (``base``, ``union`` or a model folder), tokens to
    add with their rows' sources, and the row count's multiple."""

    source: str | Path
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def read_tokenizer_spec(
    config: Mapping[str, Any], model_path: ModelPathOf, where: str
) -> TokenizerSpec | None:
    """The config's ``tokenizer_source`` or ``tokenizer:`` block, checked (None: neither)."""
    source, block = config.get("tokenizer_source"), config.get("tokenizer")
    if source is not None and block is not None:
        raise UserError(f"{where}: give tokenizer_source or tokenizer, not both")
    if block is None:
        return None if source is None else TokenizerSpec(_source(source, model_path))
    if not isinstance(block, Mapping):
        raise UserError(f"{where}: tokenizer: expected {{source, tokens, pad_to_multiple_of}}")
    extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if extra:
        raise UserError(f"{where}: tokenizer: unsupported key {extra[0]!r}")
    multiple = block.get("pad_to_multiple_of")
    if multiple is not None and (not isinstance(multiple, int) or multiple < 1):
        raise UserError(f"{where}: tokenizer.pad_to_multiple_of: expected a positive integer")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise UserError(f"{where}: tokenizer.tokens: expected a mapping of token -> {{source}}")
    return TokenizerSpec(
        _source(block.get("source", "union"), model_path),
        {
            str(token): _token_source(entry, model_path, f"{where}: tokenizer.tokens.{token}")
            for token, entry in tokens.items()
        },
        multiple,
    )


def _source(value: Any, model_path: ModelPathOf) -> str | Path:
    return value if value in ("base", "union") else model_path(value, "tokenizer source")


def _token_source(entry: Any, model_path: ModelPathOf, where: str) -> TokenSource:
    if not isinstance(entry, Mapping) or set(entry) - {"source", "force"}:
        raise UserError(f"{where}: expected {{source, force}}")
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise UserError(f"{where}.force: expected true or false")
    source = entry.get("source")
    if isinstance(source, Mapping) and source.get("kind") == "zero" and len(source) == 1:
        return TokenSource("zero", force=force)
    if isinstance(source, Mapping) and source.get("kind") == "model_token":
        if set(source) - {"kind", "model", "token_id", "token"}:
            raise UserError(f"{where}.source: expected {{kind, model, token_id or token}}")
        token_id, token = source.get("token_id"), source.get("token")
        if (token_id is None) == (token is None):
            raise UserError(f"{where}.source: give one of token_id and token")
        if token_id is not None and (not isinstance(token_id, int) or token_id < 0):
            raise UserError(f"{where}.source.token_id: expected a token index")
        model = model_path(source.get("model"), f"{where}.source.model")
        token = None if token is None else str(token)
        return TokenSource("model_token", model, token_id, token, force)
    if source is None or isinstance(source, Mapping):
        raise UserError(f"{where}.source: expected a model, {{kind: zero}} or model_token")
    return TokenSource("model", model_path(source, f"{where}.source"), force=force)


def config_vocab_size(config: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The config scope holding ``vocab_size`` (top level, else ``text_config``) and its key."""
    if isinstance(config.get("vocab_size"), int):
        return config, "vocab_size"
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text, "vocab_size"
    return None


def _config_rows(folder: Path) -> int | None:
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    scope = config_vocab_size(config)
    return None if scope is None else int(scope[0][scope[1]])


def _load_tokenizer(folder: Path, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: no tokenizer in {folder} ({exc.__class__.__name__})") from None


@dataclass
class OutputVocabulary:
    """The merged model's tokenizer and, per input model, where each output token's row is in
    that model's embeddings (``rows_of[model][token id]``, -1: the model lacks the token)."""

    tokenizer: Any
    vocab: dict[str, int]
    rows: int
    rows_of: dict[Path, list[int]]
    original_vocabs: dict[Path, dict[str, int]]
    tokens: dict[str, TokenSource]

    def permute(
        self, tensors: Sequence[Any], models: Sequence[Path], base: Path | None
    ) -> list[Any]:
        """``tensors`` (one per model of ``models``, rows over that model's vocabulary)
        re-indexed to the output vocabulary, ``rows`` rows each, in their promoted dtype."""
        import torch

        dtype = tensors[0].dtype
        for tensor in tensors:
            dtype = torch.promote_types(dtype, tensor.dtype)
        tensors = [t.to(dtype) for t in tensors]
        # a model may be named twice (two layer ranges of it in one slice): one result per
        # position, while the rows some model lacks come from the distinct models
        by_model: dict[Path, Any] = {}
        for model, tensor in zip(models, tensors, strict=True):
            by_model.setdefault(model, tensor)
        size = len(self.vocab)
        defaults = self._default_rows(by_model, base)
        forced = {self.vocab[t] for t, s in self.tokens.items() if s.force and t in self.vocab}
        result = []
        for model, tensor in zip(models, tensors, strict=True):
            keep = [row >= 0 and i not in forced for i, row in enumerate(self.rows_of[model])]
            kept = torch.tensor(keep, dtype=torch.bool)
            rows = torch.tensor(self.rows_of[model], dtype=torch.long)[kept]
            out = tensor.new_zeros((self.rows, *tensor.shape[1:]))
            out[:size][kept.to(out.device)] = tensor[rows.to(tensor.device)]
            for token_id, row in defaults.items():
                if not keep[token_id]:
                    out[token_id] = row
            missing = [t for t, i in self.vocab.items() if not keep[i] and i not in defaults]
            for token in missing:  # mergekit logs these and leaves the row zero
                logger.error("no embedding for token %r in model %s", token, model)
            if self.rows > size:  # padding rows: the mean row, as mergekit fills them
                out[size:] = torch.mean(out[:size], dim=0)
            result.append(out)
        return result

    def _default_rows(self, tensors: dict[Path, Any], base: Path | None) -> dict[int, Any]:
        """The row of each token some model lacks (or whose source is forced): mergekit's
        choice of source (the one model that has it, the base, the mean of those that have
        it, zeros; or the config's ``tokens`` entry)."""
        models, index = list(tensors), self.rows_of
        first = tensors[models[0]]
        rows: dict[int, Any] = {}
        for token, token_id in self.vocab.items():
            present = [m for m in models if index[m][token_id] >= 0]
            source = self.tokens.get(token)
            if not (source is not None and source.force) and len(present) == len(models):
                continue
            if source is not None:
                rows[token_id] = self._configured_row(token, token_id, source, tensors)
            elif len(present) == 1:
                rows[token_id] = tensors[present[0]][index[present[0]][token_id]]
            elif not present:
                logger.warning("token %r is in none of the models: its row is zeros", token)
                rows[token_id] = first.new_zeros(first.shape[1:])
            elif base in present:
                rows[token_id] = tensors[base][index[base][token_id]]
            else:  # mergekit's order: a zero row, each model's row added, divided by the count
                total = first.new_zeros(first.shape[1:])
                for model in present:
                    total = total + tensors[model][index[model][token_id]]
                total /= len(present)
                rows[token_id] = total
        return rows

    def _configured_row(
        self,
        token: str,
        token_id: int,
        source: TokenSource,
        tensors: dict[Path, Any],
    ) -> Any:
        if source.kind == "zero":
            first = next(iter(tensors.values()))
            return first.new_zeros(first.shape[1:])
        assert source.model is not None
        if source.model not in tensors:
            raise UserError(
                f"tokenizer.tokens.{token}: model {source.model} is not an input of this tensor"
            )
        tensor = tensors[source.model]
        if source.kind == "model_token":
            row = source.token_id
            if row is None:
                vocab = self.original_vocabs[source.model]
                if source.token not in vocab:
                    raise UserError(
                        f"tokenizer.tokens.{token}: no token {source.token!r} in {source.model}"
                    )
                row = vocab[source.token]
            if not 0 <= row < tensor.shape[0]:
                raise UserError(f"tokenizer.tokens.{token}: token id {row} is out of range")
            return tensor[row]
        row = self.rows_of[source.model][token_id]
        if row < 0:
            raise UserError(f"tokenizer.tokens.{token}: {source.model} has no token {token!r}")
        return tensor[row]


def build_vocabulary(
    spec: TokenizerSpec, base: Path, models: Sequence[Path], where: str
) -> OutputVocabulary:
    """The output tokenizer of ``spec`` and every model's rows for its tokens (``base``: the
    config's base model, or its first model; ``models``: every model the config reads)."""
    base_tokenizer = _load_tokenizer(base, where)
    base_rows = _config_rows(base)
    if base_rows is not None and any(i >= base_rows for i in base_tokenizer.get_vocab().values()):
        raise UserError(
            f"{where}: the base tokenizer has tokens past its model's {base_rows} embedding "
            "rows; a tokenizer merge would have to strip them from its BPE model (not supported)"
        )
    tokenizers = {base: base_tokenizer}
    for model in models:
        if model not in tokenizers:
            try:
                tokenizers[model] = _load_tokenizer(model, where)
            except UserError:
                logger.warning("%s: no tokenizer in %s; taken as the base's", where, model)
    if isinstance(spec.source, Path):
        tokenizer = _load_tokenizer(spec.source, where)
    elif spec.source == "base":
        tokenizer = base_tokenizer
    else:
        tokenizer = _union(base_tokenizer, tokenizers)
    present = set(tokenizer.get_vocab())
    for token in spec.tokens:
        if token not in present:
            tokenizer.add_tokens(token)
            present.add(token)
    vocab = dict(tokenizer.get_vocab())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{where}: the output tokenizer's token ids are not 0..{len(vocab) - 1}")
    rows_of = {}
    for model in models:
        model_vocab = tokenizers.get(model, base_tokenizer).get_vocab()
        limit = _config_rows(model) or len(model_vocab)
        rows = [-1] * len(vocab)
        for token, token_id in vocab.items():
            row = model_vocab.get(token, -1)
            rows[token_id] = row if row < limit else -1
        rows_of[model] = rows
    size = len(vocab)
    multiple = spec.pad_to_multiple_of
    if multiple and size % multiple:
        size += multiple - size % multiple
    return OutputVocabulary(
        tokenizer=tokenizer,
        vocab=vocab,
        rows=size,
        rows_of=rows_of,
        original_vocabs={m: dict(t.get_vocab()) for m, t in tokenizers.items()},
        tokens=spec.tokens,
    )


def _union(base_tokenizer: Any, tokenizers: Mapping[Path, Any]) -> Any:
    """The base tokenizer plus, in order, every model's tokens it lacks (within each model's
    embedding rows); added tokens keep the first model's settings, as mergekit builds it."""
    from transformers import AutoTokenizer

    tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tokenizer in tokenizers.items():
        limit = _config_rows(model) or tokenizer.vocab_size
        tokens.update({t: None for t, i in tokenizer.get_vocab().items() if i < limit})
        for token_id, info in tokenizer.added_tokens_decoder.items():
            if token_id < limit and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base tokenizer stays as it is
        base_tokenizer.save_pretrained(folder)
        union = AutoTokenizer.from_pretrained(folder)
    base_vocab = base_tokenizer.get_vocab()
    for token in tokens:
        if token not in added and token not in base_vocab:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union


def chat_template(value: str, models: Sequence[Path], where: str) -> str | None:
    """The template ``chat_template: value`` writes: the text itself, the most common template
    among ``models`` (``auto``; None when none has one), or a template mergekit ships by name."""
    if value == "auto":
        found = []
        for model in models:
            try:
                template = _load_tokenizer(model, where).chat_template
            except UserError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return _named_template(value, where)
    if len(value) < 20 or "{" not in value:
        raise UserError(f"{where}: chat_template {value!r} is not a template")
    return value


def _named_template(name: str, where: str) -> str:
    """A template mergekit ships (``chatml``, ``llama3``, ...), read from mergekit's package
    data: mergeopt does not copy mergekit's (LGPL) files, so this needs mergekit installed."""
    from importlib import resources

    try:
        folder = resources.files("mergekit._data.chat_templates")
    except ModuleNotFoundError:
        raise UserError(
            f"{where}: chat_template {name!r}: named templates are mergekit's files; install "
            "mergekit or give the template's text"
        ) from None
    template = folder.joinpath(f"{name}.jinja")
    if not template.is_file():
        raise UserError(f"{where}: chat_template {name!r} is not a template nor a known name")
    return template.read_text(encoding="utf-8")
