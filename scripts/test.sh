#!/usr/bin/env bash
# The whole test suite (what CI runs). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m slow` for the long multi-process scenarios.
#
# With the embedded examples here (examples.txt lists their paths), it runs in two parts:
# the machinery's tests in a copy of this checkout with those paths deleted, set up from
# scratch as a fork would be (the proof that a fork keeps a working template), then the
# examples' own tests (tests/examples) in this checkout. A fork that deleted the examples
# runs its whole suite here.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

pytest_allowing_none() {  # pytest's status 5 (no test selected, e.g. by -m) is no failure
  local status=0
  uv run pytest "$@" || status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 5 ]
}

if [ ! -f examples.txt ]; then
  uv run pytest "$@"
  exit
fi

fork=$(mktemp -d "${TMPDIR:-/tmp}/template-fork.XXXXXX")
trap 'rm -rf "$fork"' EXIT
# The files git lists (committed or not; ignored ones such as .venv and data left out),
# then the examples removed: what a fork keeps.
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$fork"
grep -v '^#' examples.txt | while read -r path; do
  [ -n "$path" ] && rm -rf "${fork:?}/${path}"
done
status=0
echo "== the machinery's tests, in a copy without the examples: $fork"
(cd "$fork" && source scripts/env.sh && pytest_allowing_none "$@") || status=$?
echo "== the examples' tests"
pytest_allowing_none tests/examples "$@" || status=$?
exit "$status"
