#!/usr/bin/env bash
# The test suite (set-up included). Tests that need ../shared skip with a reason when it is absent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec python -m pytest -q -rs "$@"
