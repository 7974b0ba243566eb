#!/usr/bin/env bash
# The main job on the built-in default: train (once, cached) the tiny GQA demo model, prune 20%
# of it with Taylor importance, evaluate the pruned and the dense model (held-out perplexity and
# two offline tasks), print both side by side and the command that opens the MLflow UI.
# Extra arguments go to `python -m prune_entry.demo` (--method, --pruning_ratio, --verbose true).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
python -m prune_entry.demo "$@"
