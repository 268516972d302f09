#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone:
# environment -> fit (which builds the digits shards when missing) -> test on the best checkpoint.
# Extra arguments go to `train.py fit` (e.g. --trainer.max_epochs 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# --ckpt_path auto: a second quickstart resumes (or finds the run finished) instead of
# refusing to overwrite the checkpoints of the first.
uv run python train.py fit --config configs/default.yaml --ckpt_path auto "$@"
uv run python train.py test --config configs/default.yaml --ckpt_path best
