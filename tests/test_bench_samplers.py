"""scripts/bench_samplers.py: a run cut by a time limit resumes from its state file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_samplers import run_one  # noqa: E402 - a script folder, not a package


def test_a_cut_run_resumes_from_its_state_file_with_its_points_and_checkpoints(
    tmp_path: Path,
) -> None:
    state = tmp_path / "run.json"
    first = run_one("random", 0, 24, state=state)  # as if cut after 24 of 48 evaluations
    saved = json.loads(state.read_text())
    assert len(saved["values"]) == 24 and saved["hv"] == first["hv_fraction"]
    resumed = run_one("random", 0, 48, state=state)
    assert resumed["resumed_at"] == 24 and resumed["evaluations"] == 48
    assert len(json.loads(state.read_text())["params"]) == 48
    assert resumed["hv_fraction"]["24"] == first["hv_fraction"]["24"]  # kept, not recomputed
