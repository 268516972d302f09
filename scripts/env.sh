# Sourced by quickstart.sh and test.sh: makes sure uv exists and .venv matches uv.lock.
# Needs only Python 3.10+ with pip; uv is installed with pip when it is missing.
if command -v uv >/dev/null 2>&1; then
  uv() { command uv "$@"; }
else
  if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "installing uv with pip ..."
    python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv
  fi
  uv() { python3 -m uv "$@"; }
fi
echo "syncing .venv with uv.lock (the first time downloads PyTorch, several GB) ..."
# Precompiled bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI) every process would
# otherwise recompile lightning and torch from source (11 s instead of 5 s per import).
uv sync --locked --compile-bytecode
