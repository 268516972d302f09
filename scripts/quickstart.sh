#!/usr/bin/env bash
# The main job on the embedded default (configs/default.yaml), from a fresh clone:
# environment -> fit (which builds its shards when missing) -> test on the best checkpoint.
# Extra arguments go to `train.py fit` (e.g. --trainer.max_epochs 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# --ckpt_path auto: a second quickstart resumes (or finds the run finished) instead of
# refusing to overwrite the checkpoints of the first.
uv run python train.py fit --ckpt_path auto "$@"
uv run python train.py test --ckpt_path best
