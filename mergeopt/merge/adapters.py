"""LoRA references of a mergekit config (``MODEL+ADAPTER``): the PEFT adapter applied to its
model first, as mergekit does (the model loaded by its architecture's auto class in its stored
dtype, ``PeftModel.from_pretrained``, ``merge_and_unload``, saved as safetensors), into a folder
that the merge then reads like any model, with the model's other files (its tokenizer) beside
the merged weights. Needs ``peft`` (the ``lora`` extra)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError


def apply_adapter(model: Path, adapter: Path, into: Path, where: str) -> Path:
    """The folder (under ``into``) of ``model`` with the LoRA ``adapter`` merged into its
    weights; made once per (model, adapter) pair and run."""
    key = hashlib.sha256(f"{model}\0{adapter}".encode()).hexdigest()[:16]
    folder = into / f"{model.name}+{adapter.name}-{key}"
    if folder.is_dir():
        return folder
    try:
        import peft
    except ImportError:
        raise UserError(
            f"{where}: LoRA references (model+adapter) need peft: pip install 'mergeopt[lora]'"
        ) from None
    import transformers

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{where}: {adapter} is not a PEFT adapter (no adapter_config.json)")
    try:  # an adapter of another model: shape mismatches, missing modules, bad configs
        config = transformers.AutoConfig.from_pretrained(str(model))
        auto_class = _auto_class(transformers, (config.architectures or [""])[0])
        loaded = auto_class.from_pretrained(str(model), low_cpu_mem_usage=True)
        merged = peft.PeftModel.from_pretrained(loaded, str(adapter), is_trainable=False)
        merged = merged.merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(
            f"{where}: adapter {adapter} does not apply to model {model}: {first_line}"
        ) from None
    merged.save_pretrained(str(folder), safe_serialization=True)
    for path in model.iterdir():  # its tokenizer and the like: mergekit reads them from model
        if path.is_file() and not (folder / path.name).exists() and not _is_weights(path.name):
            shutil.copy2(path, folder / path.name)
    return folder


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))


def _auto_class(transformers: Any, architecture: str) -> Any:
    """The class that loads ``architecture``: its own, else an auto class by the name's
    ending (a causal LM otherwise), as mergekit chooses."""
    if architecture and isinstance(getattr(transformers, architecture, None), type):
        return getattr(transformers, architecture)
    for ending, name in (
        ("ForMaskedLM", "AutoModelForMaskedLM"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
    ):
        if architecture.endswith(ending):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM
