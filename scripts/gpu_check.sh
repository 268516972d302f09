#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU checks and the GPU benchmark in one command,
# printed as one table (details in bench_out/gpu_check/). CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if ! uv run python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA GPU visible to torch: run this on a machine with an NVIDIA GPU" >&2
  exit 2
fi
uv run python -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
if [ ! -f scripts/gpu_check.py ]; then
  echo "error: scripts/gpu_check.py (the GPU checks, which train the examples) is not in this checkout" >&2
  exit 2
fi
uv run python scripts/gpu_check.py
