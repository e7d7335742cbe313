"""Model references as a study sees them at creation: where they are and whether mergeopt may
read them (safetensors only unless pickle is allowed, no remote code unless opted in).

Reading tensors and checking that experts fit the base is ``checkpoints.py``'s job.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergeopt.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model(reference: str) -> Path:
    """A local folder for a folder path or a hub id already in the local Hugging Face cache."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve()
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
    pickle-only checkpoints (unpickling runs code), folders without safetensors weights."""
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
            "models.trust_remote_code: true"
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled and not allow_pickle:
            raise UserError(
                f"model {path}: only pickle checkpoints ({pickled[0]}); refused, since unpickling "
                "runs code: convert them to safetensors, or set models.allow_pickle: true"
            )
        if pickled:
            raise UserError(
                f"model {path}: mergeopt merges safetensors only; convert {pickled[0]} with "
                "transformers' save_pretrained(safe_serialization=True)"
            )
        raise UserError(f"model {path}: no *.safetensors weights")
    return path
