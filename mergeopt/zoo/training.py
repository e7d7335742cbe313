"""Tokenizer, model and training loop of the zoo's causal LMs (torch and transformers only)."""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from mergeopt.zoo.tasks import Example

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# One token per printable ASCII character, plus space and newline.
_CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The zoo's ``Qwen2ForCausalLM``: grouped-query attention, untied embeddings."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 8
    initializer_range: float = 0.1


def _gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (space -> "Ġ", newline -> "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


_BYTE_TO_SYMBOL = _gpt2_byte_symbols()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: a byte-level BPE with an empty merge list over the printable
    ASCII characters, space and newline.

    Why byte-level BPE and not a plain character model: transformers 5 rebuilds the tokenizer
    of a ``qwen2`` folder as ``Qwen2Tokenizer`` (a byte-level BPE with Qwen's pre-tokenizer) from
    the saved vocabulary and merges, whatever class the folder names. With no merges every
    byte stays one token under any pre-tokenizer, so transformers, vLLM and this function
    tokenize alike.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [_BYTE_TO_SYMBOL[ord(character)] for character in _CHARACTERS]
    vocab = {token: index for index, token in enumerate((*_SPECIAL_TOKENS, *symbols))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one token of the vocabulary."""
    ids = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(ids, int)
    return ids


def make_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape) -> PreTrainedModel:
    """A freshly initialized model; head_dim 64 because vLLM's CPU attention rejects small head
    sizes such as 16."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id, pad_id = token_id(tokenizer, EOS_TOKEN), token_id(tokenizer, PAD_TOKEN)
    # head_dim and torch_dtype are config kwargs Qwen2Config's signature does not declare.
    config = Qwen2Config(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=shape.initializer_range,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    return model


def batches(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    batch_size: int,
    *,
    rng: random.Random,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``input_ids`` and ``labels`` (``-100`` outside the completions), each
    ``batch x longest``.

    Only completions carry loss, pretraining included: a prompt's operands are random digits
    that nothing predicts, and their loss slowed learning the skills severalfold (measured while
    designing zoo v2). Examples of one kind share a batch (grouped within windows of 16 batches,
    then the batches shuffled by ``rng``), because padding to the longest row is what a CPU
    step pays for and kinds differ most in length.
    """
    import torch

    eos_id, pad_id = token_id(tokenizer, EOS_TOKEN), token_id(tokenizer, PAD_TOKEN)
    rows: list[tuple[str, list[int], int]] = []
    for example in examples:
        prompt = tokenizer.encode(example.prompt, add_special_tokens=False)
        completion = tokenizer.encode(example.completion, add_special_tokens=False)
        rows.append((example.kind, prompt + completion + [eos_id], len(prompt)))
    window = 16 * batch_size
    chunks: list[list[tuple[str, list[int], int]]] = []
    for start in range(0, len(rows), window):
        ordered = sorted(rows[start : start + window], key=lambda row: row[0])  # stable
        chunks.extend(ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size))
    rng.shuffle(chunks)
    result = []
    for chunk in chunks:
        longest = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), longest), -100, dtype=torch.long)
        for i, (_, ids, prompt_length) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
        result.append((input_ids, labels))
    return result


def _parameter_groups(
    model: PreTrainedModel, lr: float, layer_decay: float
) -> list[dict[str, object]]:
    """Discriminative fine-tuning (ULMFiT's layer-wise rates): layer ``i`` of ``L`` trains at
    ``lr * layer_decay ** (L - 1 - i)``, everything outside the layers at ``lr``."""
    num_layers = model.config.num_hidden_layers
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        factor = 1.0
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            factor = layer_decay ** (num_layers - 1 - layer)
        groups.setdefault(factor, []).append(parameter)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]


def train(
    model: PreTrainedModel,
    steps: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    warmup_steps: int,
    layer_decay: float = 1.0,
    advance: Callable[[], None],
) -> float:
    """AdamW with linear warm-up and cosine decay to 5% over ``steps``; returns the last loss."""
    import torch

    optimizer = torch.optim.AdamW(
        _parameter_groups(model, lr, layer_decay), betas=(0.9, 0.98), weight_decay=0.01
    )
    total = len(steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    loss_value = float("nan")
    for input_ids, labels in steps:
        # Pad positions sit after each sequence's end, so causal attention never sees them
        # from a real token and no attention mask is needed.
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss_value = loss.item()
        advance()
    model.eval()
    return loss_value


@contextmanager
def deterministic_torch(seed: int, *, threads: int, algorithms: bool = True) -> Iterator[None]:
    """Seeded torch on ``threads`` threads for the duration of a build, restored afterwards;
    ``algorithms``: deterministic algorithms too (CUDA has none for some training kernels)."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(algorithms)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)
            torch.set_num_threads(previous_threads)


def relative_delta_norm(base: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> float:
    """‖expert − base‖ / ‖base‖ over all parameters: a task vector's relative size."""
    delta_sq = sum(float((expert[k] - base[k]).double().pow(2).sum()) for k in base)
    base_sq = sum(float(base[k].double().pow(2).sum()) for k in base)
    return math.sqrt(delta_sq / base_sq)
