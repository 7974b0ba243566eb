#!/usr/bin/env bash
# Idempotent set-up: a virtual env in .venv with torch (CPU build when no GPU) and gqaprune.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (re-installs only when
# pyproject.toml changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GQAPRUNE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "[setup] creating virtual env $VENV"
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.gqaprune-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  # pip's and setuptools' own notices (e.g. the editable-install BuildBackendWarning) go to a log,
  # shown only when an install fails.
  LOG="$VENV/pip-install.log"
  : >"$LOG"
  "$PY" -m pip install -q --upgrade pip >>"$LOG" 2>&1 || true
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      echo "[setup] GPU found: installing torch (CUDA build)"
      "$PY" -m pip install -q "torch>=2.3,<3" >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
    else
      # No GPU: a CPU build. The PyTorch CPU index is tried first (small wheels); where it is
      # unreachable, a pinned release from the default index (a CPU wheel may lie on disk).
      echo "[setup] no GPU: installing a CPU build of torch"
      "$PY" -m pip install -q --retries 0 --timeout 10 torch==2.13.0 \
          --index-url https://download.pytorch.org/whl/cpu >>"$LOG" 2>&1 \
        || "$PY" -m pip install -q torch==2.13.0 >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
    fi
  fi
  echo "[setup] installing gqaprune and its dependencies (a few minutes the first time; log: $LOG)"
  if ! "$PY" -m pip install -q -e "$ROOT[test,distributed]" >>"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "[setup] error: pip install failed (full log above, also in $LOG)" >&2
    exit 1
  fi
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
