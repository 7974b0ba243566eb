#!/usr/bin/env bash
# The main job on the built-in default: train (once, cached) the tiny GQA demo model, prune 20%
# of it with Taylor importance through `mlflow run`, and print where the results are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
mlflow run . -e prune -P model=demo -P method=taylor -P pruning_ratio=0.2 --env-manager local "$@"
