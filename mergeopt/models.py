"""Model references as a study sees them at creation: where they are and whether mergeopt may
read them (safetensors only unless pickle is allowed, no remote code unless opted in).

Pickle-only checkpoints that a study opts into are converted once into a safetensors copy in
``$MERGEOPT_CACHE`` (default ``~/.cache/mergeopt``); :func:`resolve_model` hands that copy to
workers and exports on the same machine, so nothing after ``study create`` unpickles.

Reading tensors and checking that experts fit the base is ``checkpoints.py``'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from mergeopt.errors import UserError
from mergeopt.staging import staged_folder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CACHE_ENV = "MERGEOPT_CACHE"


def resolve_model(reference: str) -> Path:
    """A local folder for a folder path or a hub id already in the local Hugging Face cache."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return _converted_or_self(path.resolve())
    if path.exists():
        raise UserError(f"model {reference}: not a folder")
    looks_like_hub_id = reference.count("/") == 1 and not reference.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(reference, local_files_only=True))
        except Exception:  # noqa: BLE001 - any hub failure means "not available offline"
            raise UserError(
                f"model {reference}: no such folder, and not in the local Hugging Face cache "
                "(download it first with `hf download`)"
            ) from None
    raise UserError(f"model {reference}: folder not found")


def check_model_folder(
    reference: str, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> Path:
    """Resolve a model and refuse what mergeopt must not load: remote code unless opted in,
    pickle-only checkpoints unless opted in (unpickling runs code; accepted ones are converted
    to safetensors, and the returned folder is the conversion), folders without weights."""
    path = resolve_model(reference)
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"model {path}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path}: unreadable config ({exc.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"model {path}: config.json asks for remote code (auto_map); refused unless "
            "--trust-remote-code (models.trust_remote_code: true)"
        )
    converted = path.is_relative_to(cache_root())  # resolve_model found an earlier conversion
    source = Path(reference).expanduser().resolve() if converted else path
    if converted or not any(path.glob("*.safetensors")):
        pickled = pickle_checkpoints(source)
        if pickled and not allow_pickle:  # also when converted before: the opt-in is per study
            raise UserError(
                f"model {source}: only pickle checkpoints ({pickled[0].name}); refused, since "
                "unpickling runs code: convert them to safetensors, or accept them with "
                "--allow-pickle (models.allow_pickle: true)"
            )
        if converted:
            return path
        if pickled:
            return convert_pickle_checkpoint(path, pickled)
        raise UserError(f"model {path}: no *.safetensors weights")
    return path


def pickle_checkpoints(folder: Path) -> list[Path]:
    """The pickle weight files of a folder (``pytorch_model.bin``, its shards, ``*.pt``...)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def cache_root() -> Path:
    """Where converted checkpoints live: ``$MERGEOPT_CACHE`` or ``~/.cache/mergeopt``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergeopt"
    return Path(root).expanduser().resolve() / "safetensors"


def _conversion_folder(folder: Path, pickled: list[Path]) -> Path:
    """The cache folder of one pickle checkpoint: keyed by its path, file sizes and mtimes, so
    a changed checkpoint is converted again."""
    digest = hashlib.sha256(str(folder).encode())
    for file in pickled:
        stat = file.stat()
        digest.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return cache_root() / f"{folder.name}-{digest.hexdigest()[:16]}"


def _unpickling_problem(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return f"it calls {match.group(1)}, which weights-only loading refuses"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{exc.__class__.__name__}: {first[:160]}" if first else exc.__class__.__name__


def _converted_or_self(folder: Path) -> Path:
    """A pickle-only folder's safetensors conversion when ``study create --allow-pickle`` made
    one on this machine, else the folder itself (workers and exports call this)."""
    if any(folder.glob("*.safetensors")):
        return folder
    try:
        pickled = pickle_checkpoints(folder)
    except OSError:
        return folder
    if not pickled:
        return folder
    converted = _conversion_folder(folder, pickled)
    return converted if (converted / "model.safetensors").is_file() else folder


def convert_pickle_checkpoint(folder: Path, pickled: list[Path]) -> Path:
    """Convert an opted-in pickle checkpoint to one ``model.safetensors`` in the cache.

    The files are read with ``torch.load(weights_only=True)`` (tensors and plain containers
    only), tied tensors are stored once each, and every other file of the folder (config,
    tokenizer) is copied beside them. The folder is written under a temporary name and renamed,
    so a failed conversion leaves nothing that looks finished.
    """
    target = _conversion_folder(folder, pickled)
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for file in pickled:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise UserError(
                f"{file}: not a loadable PyTorch state dict ({_unpickling_problem(exc)})"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise UserError(f"{file}: expected a state dict of named tensors")
        tensors.update({name: tensor.contiguous().clone() for name, tensor in state.items()})
    try:
        with staged_folder(target) as staging:
            for file in folder.iterdir():
                if (
                    file.is_file()
                    and file.suffix not in PICKLE_SUFFIXES
                    and not file.name.endswith(".bin.index.json")
                ):
                    shutil.copy2(file, staging / file.name)
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    except OSError as exc:
        raise UserError(
            f"model {folder}: cannot write its safetensors conversion to {target.parent} "
            f"({exc.strerror or exc.__class__.__name__}); set ${CACHE_ENV} to a writable folder"
        ) from None
    return target
