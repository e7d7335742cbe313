"""The merge engine's Triton kernels, tested on a machine without a GPU (CI): their tests run
in a child pytest under ``TRITON_INTERPRET=1`` with triton from ``.cache/triton-interpreter``
(installed there by ``scripts/setup.sh``, outside the venv, so that vLLM and torch never import
it). On a CUDA machine those tests run directly and this one has nothing to add."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRITON_FOLDER = REPO / ".cache" / "triton-interpreter"
# the files holding the kernels' tests (marked ``kernels``; the child runs only those: the rest
# of these files already ran in this session)
KERNEL_TEST_FILES = ("tests/test_merge_methods.py", "tests/test_merge_engine.py")


@pytest.mark.slow
def test_the_merge_kernels_pass_their_tests_under_the_triton_interpreter() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the kernel tests directly")
    if not (TRITON_FOLDER / "triton").is_dir():
        pytest.skip("no triton in .cache/triton-interpreter (scripts/setup.sh installs it)")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(TRITON_FOLDER), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", "kernels",
            *KERNEL_TEST_FILES,
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "skipped" not in summary, result.stdout[-4000:]  # the interpreter ran them all
    assert " passed" in summary
