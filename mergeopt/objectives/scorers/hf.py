"""The transformers scorer: one resident ``AutoModelForCausalLM`` per worker.

Merged tensors are written straight into the model's parameters (``merge_target``), so a trial
costs no disk and no reload. Generation is greedy, batched with left padding and a KV cache;
prompts are sorted by length so that a batch pads little. Two decoding paths give the same
tokens: transformers' dynamic cache (finished rows leave the batch), and a static cache whose
decode step is captured once as a CUDA graph on CUDA (``static_decode``; the default there).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.objectives.scorers.base import (
    Generation,
    LoglikelihoodFromSequences,
    TrialEvaluationError,
    first_stop,
    format_prompt,
)
from mergeopt.objectives.scorers.static_decode import (
    STEPS_BETWEEN_CHECKS,
    StaticDecoder,
    batch_rows,
    cache_length,
    prefill_width,
    supports_static_decoding,
)

if TYPE_CHECKING:
    import torch

    from mergeopt.merge.engine import MergeTarget

TORCH_DTYPES = ("float32", "bfloat16", "float16")
DECODE_PATHS = ("auto", "static", "dynamic")
# Scored positions turned into float32 log-probabilities at once: bounds the temporary of a
# long perplexity batch to this many rows of the vocabulary (1024 x 152k x 4 bytes = 0.6 GB).
SCORED_POSITIONS_PER_CHUNK = 1024


class HFScorer(LoglikelihoodFromSequences):
    """Greedy generation and log-likelihoods with a resident transformers model.

    Args:
        model_dir: a Hugging Face model folder (config.json, safetensors, tokenizer).
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        dtype: the precision the model is held and run in.
        batch_size: prompts (or scored sequences) per forward pass.
        chat_template: wrap each prompt as a user turn of the tokenizer's chat template.
        decode: ``"static"`` (static KV cache; its decode step a CUDA graph on CUDA),
            ``"dynamic"`` (transformers' cache), or ``"auto"``: static on CUDA when the model's
            attention allows it (full causal attention through sdpa or eager), else dynamic.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        chat_template: bool = False,
        trust_remote_code: bool = False,
        decode: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in TORCH_DTYPES:
            raise UserError(f"scorer.dtype: {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        if decode not in DECODE_PATHS:
            raise UserError(f"scorer.decode: {decode!r} is not one of {', '.join(DECODE_PATHS)}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.chat_template = chat_template
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.model_dir, trust_remote_code=trust_remote_code
            )
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(
                f"model {self.model_dir}: cannot load with transformers: {first_line}"
            ) from None
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types .to badly
        self.model.requires_grad_(False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id: int = self.tokenizer.pad_token_id
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        # transformers 5.24 renamed the KV-cache argument and output field to ``cache`` (the old
        # ``past_key_values`` warns on every forward); earlier 5.x only know the old name.
        forward_parameters = inspect.signature(self.model.forward).parameters
        self._cache_field = "cache" if "cache" in forward_parameters else "past_key_values"
        # Names as the checkpoint writes them, including tied aliases (lm_head.weight when it
        # shares the embedding): several names may point at one tensor.
        self._tensors_by_name: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self._target: MergeTarget | None = None
        self.static_decoding = self._static_decoding(decode)
        # Static decoders by (rows, cache length), kept for the worker's life: their caches
        # and captured graphs serve every trial (the weights change in place).
        self._decoders: dict[tuple[int, int], StaticDecoder] = {}
        self._graph_pool: Any = None

    def _static_decoding(self, decode: str) -> bool:
        if decode == "dynamic" or (decode == "auto" and self.device.type != "cuda"):
            return False
        if supports_static_decoding(self.model):
            return True
        if decode == "static":
            raise UserError(
                f"scorer.decode: static decoding needs full causal attention through sdpa or "
                f"eager; {self.model_dir} has sliding windows or another attention"
            )
        return False

    # -- weights ---------------------------------------------------------------------------

    def merge_target(self) -> MergeTarget:
        """The model's parameters by HF name; the same object on every call, because the merge
        engine remembers per target which blocks it already holds."""
        if self._target is None:
            from mergeopt.merge.engine import ModuleTarget

            self._target = ModuleTarget(module=self.model)
        return self._target

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the resident model by Hugging Face name (dtype/device converted).

        Behind the merge engine's back: call ``engine.forget(scorer.merge_target())`` after it.
        """
        import torch

        with torch.no_grad():
            for name, tensor in named_tensors:
                target = self._tensors_by_name.get(name)
                if target is None:
                    raise KeyError(f"{self.model_dir}: the model has no tensor named {name!r}")
                target.data.copy_(tensor)
        self.after_weights_loaded()

    def after_weights_loaded(self) -> None:
        """Nothing is cached across calls: the KV cache lives only inside one ``generate``."""

    # -- scoring ---------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str]
    ) -> list[Generation]:
        """Greedy completions, in the order of ``prompts``; see ``Generation`` for the counts."""
        formatted = [
            format_prompt(self.tokenizer, p, chat_template=self.chat_template) for p in prompts
        ]
        token_ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in formatted]
        # Longest first: the first batch shows at once whether memory suffices.
        order = sorted(range(len(prompts)), key=lambda i: -len(token_ids[i]))
        results: list[Generation | None] = [None] * len(prompts)
        generate_batch = (
            self._generate_batch_static if self.static_decoding else self._generate_batch
        )
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            outputs = self._guarded(
                generate_batch, [token_ids[i] for i in batch], max_new_tokens, list(stop)
            )
            for i, output in zip(batch, outputs, strict=True):
                results[i] = output
        return [r for r in results if r is not None]

    def _generate_batch(
        self, batch_ids: list[list[int]], max_new_tokens: int, stop: list[str]
    ) -> list[Generation]:
        """One left-padded batch. Shapes: input_ids, attention_mask ``batch x prompt_len``."""
        import torch

        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        # Positions count real tokens only, so a left-padded prompt sees the positions it would
        # see alone (what makes batched and single greedy outputs agree).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generated: list[list[int]] = [[] for _ in batch_ids]
        done: list[Generation | None] = [None] * len(batch_ids)
        # rows[i]: which prompt of the batch the i-th row of the tensors still computes.
        # Finished rows are dropped from the batch (and the KV cache), so one long answer
        # does not make every short one pay for its steps.
        rows = list(range(len(batch_ids)))
        past = None
        with torch.inference_mode():
            for _step in range(max_new_tokens):
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_field: past},
                )
                past = getattr(out, self._cache_field)
                logits = out.logits[:, -1, :]
                if not bool(torch.isfinite(logits).all()):
                    raise TrialEvaluationError("non-finite logits (NaN or inf) in generation")
                next_tokens = logits.argmax(dim=-1).tolist()
                keep: list[int] = []
                for position, (row, token) in enumerate(zip(rows, next_tokens, strict=True)):
                    generated[row].append(token)
                    done[row] = self._ended(generated[row], stop)
                    if done[row] is None:
                        keep.append(position)
                if not keep:
                    break
                if len(keep) < len(rows):
                    selected = torch.tensor(keep, device=self.device)
                    past.batch_select_indices(selected)
                    attention_mask = attention_mask[selected]
                    position_ids = position_ids[selected]
                    rows = [rows[p] for p in keep]
                input_ids = torch.tensor(
                    [[generated[row][-1]] for row in rows], dtype=torch.long, device=self.device
                )
                attention_mask = torch.cat(
                    [attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1
                )
                position_ids = position_ids[:, -1:] + 1
        return [
            d if d is not None else Generation(text=self._decode(g), num_tokens=len(g))
            for d, g in zip(done, generated, strict=True)
        ]

    def _generate_batch_static(
        self, batch_ids: list[list[int]], max_new_tokens: int, stop: list[str]
    ) -> list[Generation]:
        """The same tokens as ``_generate_batch`` through a ``StaticDecoder``: every row runs
        until the whole batch has ended; tokens are read back ``STEPS_BETWEEN_CHECKS`` steps at
        a time (the overshoot is at most twice that)."""
        import torch

        decoder = self._decoder(len(batch_ids), prefill_width(batch_ids), max_new_tokens)
        generated: list[list[int]] = [[] for _ in batch_ids]
        done: list[Generation | None] = [None] * len(batch_ids)
        with torch.inference_mode():
            decoder.prefill(batch_ids, pad_token_id=self.pad_token_id)
            produced = 1
            pending = decoder.read_back(0, produced)
            while True:
                # Queue the next chunk before reading the last one: the device decodes while
                # the host checks stops. Rows that ended are not looked at again (the dynamic
                # path drops them from the batch).
                steps = min(STEPS_BETWEEN_CHECKS, max_new_tokens - produced)
                for _ in range(steps):
                    decoder.advance()
                queued = decoder.read_back(produced, produced + steps) if steps else None
                produced += steps
                tokens, finite = pending()
                for step_tokens, step_finite in zip(tokens, finite, strict=True):
                    live = [row for row, ended in enumerate(done) if ended is None]
                    if not all(step_finite[row] for row in live):
                        raise TrialEvaluationError("non-finite logits (NaN or inf) in generation")
                    for row in live:
                        generated[row].append(step_tokens[row])
                        done[row] = self._ended(generated[row], stop)
                if queued is None or all(d is not None for d in done):
                    break
                pending = queued
        return [
            d if d is not None else Generation(text=self._decode(g), num_tokens=len(g))
            for d, g in zip(done, generated, strict=True)
        ]

    def _decoder(self, count: int, width: int, max_new_tokens: int) -> StaticDecoder:
        """The static decoder for ``count`` prompts padded to ``width`` and ``max_new_tokens``
        generated, made on first use (on CUDA its graph is captured in its first batch)."""
        import torch

        rows = batch_rows(count, self.batch_size)
        length = cache_length(width, max_new_tokens)
        decoder = self._decoders.get((rows, length))
        if decoder is None:
            capture = self.device.type == "cuda"
            if capture and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            decoder = StaticDecoder(
                self.model,
                rows=rows,
                length=length,
                cache_field=self._cache_field,
                capture=capture,
                graph_pool=self._graph_pool,
            )
            self._decoders[(rows, length)] = decoder
        return decoder

    def _ended(self, tokens: list[int], stop: Sequence[str]) -> Generation | None:
        """The generation if its last token ended it (EOS, or it completed a stop string)."""
        if tokens[-1] in self.eos_token_ids:
            return Generation(text=self._decode(tokens[:-1]), num_tokens=len(tokens))
        if not any(stop):
            return None  # nothing to look for: the text is decoded once, at the end
        text = self._decode(tokens)
        cut = first_stop(text, stop)
        if cut >= 0:
            return Generation(text=text[:cut], num_tokens=len(tokens))
        return None

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _score_sequences(
        self, sequences: list[list[int]], first_scored: list[int]
    ) -> list[tuple[float, int]]:
        # Longest first, in batches of neighbours in length: a batch pads to its own longest
        # sequence, so sorting is what keeps the padding (and the memory of a batch) small.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            scores = self._guarded(
                self._score_batch, [sequences[i] for i in batch], [first_scored[i] for i in batch]
            )
            for i, score in zip(batch, scores, strict=True):
                results[i] = score
        return results

    def _score_batch(
        self, sequences: list[list[int]], first_scored: list[int]
    ) -> list[tuple[float, int]]:
        """One right-padded forward pass; the sums of all rows are read back at once.

        Right padding leaves every real token's positions and attention as they are alone
        (pads come after it, and causal attention never looks forward), so a row scores what
        it scores unbatched up to float rounding. Logits are computed only for the window of
        positions some row scores (``logits_to_keep``: for multiple choice, the continuations
        rather than the whole contexts), and only the scored positions are turned into
        log-probabilities, in float32, ``SCORED_POSITIONS_PER_CHUNK`` at a time.
        """
        import torch

        width = max(len(s) for s in sequences)
        # Position p predicts token p + 1; row r scores positions first_r - 1 .. len_r - 2.
        spans = [
            (first - 1, len(ids) - 1) for ids, first in zip(sequences, first_scored, strict=True)
        ]
        scored_rows = [row for row, (lo, hi) in enumerate(spans) if lo < hi]
        if not scored_rows:
            return [(0.0, 0)] * len(sequences)
        offset = min(spans[row][0] for row in scored_rows)  # first position given logits
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        # (row, position - offset) of every scored position, and the token it predicts.
        rows = [row for row in scored_rows for _ in range(*spans[row])]
        columns = [p - offset for row in scored_rows for p in range(*spans[row])]
        targets = [sequences[row][p + 1] for row in scored_rows for p in range(*spans[row])]
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                logits_to_keep=width - offset,
            ).logits
            row_index = torch.tensor(rows, device=self.device)
            column_index = torch.tensor(columns, device=self.device)
            target_ids = torch.tensor(targets, device=self.device)
            token_log_probs = torch.empty(len(rows), dtype=torch.float32, device=self.device)
            for lo in range(0, len(rows), SCORED_POSITIONS_PER_CHUNK):
                hi = lo + SCORED_POSITIONS_PER_CHUNK
                picked = logits[row_index[lo:hi], column_index[lo:hi]].float()
                token_log_probs[lo:hi] = (
                    torch.log_softmax(picked, -1).gather(-1, target_ids[lo:hi, None]).squeeze(-1)
                )
            # Summed row by row through a zero-padded matrix rather than atomic adds, so that
            # the same weights give the same bits on CUDA too.
            per_position = torch.zeros(
                (len(sequences), width - offset), dtype=torch.float32, device=self.device
            )
            per_position[row_index, column_index] = token_log_probs
            totals = per_position.sum(-1).tolist()
        scores: list[tuple[float, int]] = []
        for row, (lo, hi) in enumerate(spans):
            if lo >= hi:
                scores.append((0.0, 0))
                continue
            if not math.isfinite(totals[row]):
                raise TrialEvaluationError("non-finite log-likelihood (NaN or inf)")
            scores.append((totals[row], hi - lo))
        return scores

    def _guarded(self, function: Any, *args: Any) -> Any:
        """Run one batch; out-of-memory becomes a ``TrialEvaluationError`` (memory freed)."""
        import torch

        try:
            return function(*args)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TrialEvaluationError(f"out of memory on {self.device}: {first_line}") from exc

    # -- life cycle ------------------------------------------------------------------------

    def healthy(self) -> bool:
        """A one-token forward pass still runs (a CUDA error poisons the whole context)."""
        import torch

        try:
            with torch.inference_mode():
                probe = torch.tensor([[self.pad_token_id]], device=self.device)
                self.model(input_ids=probe)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - any failure means "rebuild the scorer"
            return False
        return True

    def close(self) -> None:
        import gc

        import torch

        for decoder in self._decoders.values():
            decoder.close()
        self._decoders.clear()
        self._tensors_by_name.clear()
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config (may be a list, e.g. Qwen's <|im_end|>) and tokenizer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
