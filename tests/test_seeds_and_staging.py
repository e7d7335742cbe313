"""The shared seed formula and the staging-folder helper."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeopt.seeds import derive_seed
from mergeopt.staging import STAGING_MARK, staged_folder


def test_derived_seeds_are_the_formula_studies_were_run_with() -> None:
    # Stored trial seeds and resumed CMA-ES generations depend on these exact values.
    assert derive_seed(0, 5) == 5
    assert derive_seed(7, 3) == (7 * 1_000_003 + 3) % 2**31
    assert derive_seed(12345, 9, bits=32) == (12345 * 1_000_003 + 9) % 2**32
    assert derive_seed(2**40, 1) < 2**31
    assert len({derive_seed(1, stream) for stream in range(1000)}) == 1000


def test_a_staged_folder_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with staged_folder(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(f".out{STAGING_MARK}")
        (staging / "file").write_text("x")
        assert not target.exists()
    assert (target / "file").read_text() == "x"
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target, replace=True) as staging:
        (staging / "new").write_text("new")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old"]
    with staged_folder(target, replace=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OSError), staged_folder(target) as staging:  # no replace: refused
        (staging / "newer").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
