#!/usr/bin/env bash
# Set up (idempotent) and run the end-to-end demo on real Fashion-MNIST; extra args go to `vqtok demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/vqtok demo "$@"
