#!/usr/bin/env bash
# The whole default test suite (what CI runs). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the long multi-process scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
uv run pytest "$@"
