"""Task files and objective entries the objective tests write (JSONL, one record per line)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def objective(task: Path, name: str = "acc", **fields: object) -> SimpleNamespace:
    """An objective entry of a spec (the fields the evaluator reads), with the spec's
    defaults: generation accuracy on ``task``, last number extracted, all records."""
    defaults = dict(
        name=name,
        task=str(task),
        kind="generation",
        metric="accuracy",
        direction="maximize",
        extract="last_number",
        pattern=None,
        limit=None,
        subsample_seed=0,
        heldout=None,
        normalize=False,
        evalscope=None,
    )
    return SimpleNamespace(**{**defaults, **fields})
