"""Tiny real models the tests build: a Qwen2 over a character vocabulary (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def build_tiny_model(
    folder: Path, *, seed: int = 0, num_layers: int = 2, task_vector_seed: int | None = None
) -> Path:
    """A random Qwen2 model (head_dim 64, as vLLM's CPU attention needs) over a character
    vocabulary, saved with its tokenizer as an HF folder. ``seed`` draws the weights;
    ``task_vector_seed`` adds a task vector (N(0, 0.1) per weight) drawn from it, so models
    of one ``seed`` and different task-vector seeds are experts fine-tuned from one base."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    specials = ("<pad>", "<eos>", "<unk>")
    characters = string.digits + string.ascii_letters + string.punctuation + " \n"
    vocab = {token: index for index, token in enumerate((*specials, *characters))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so greedy text varies
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
        if task_vector_seed is not None:
            generator = torch.Generator().manual_seed(task_vector_seed)
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=1, pad_token_id=0, do_sample=False
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
