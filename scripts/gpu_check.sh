#!/usr/bin/env bash
# GPU check (needs CUDA): train a few hundred steps with NCCL + bf16, tokenize 60k Fashion-MNIST
# images on accelerator workers, print images/s, the accelerator-busy fraction and the share of
# codes equal to a CPU run. Install the torch build for your CUDA first (setup.sh keeps it).
# Usage: bash scripts/gpu_check.sh [--workdir DIR] [--steps N] [--cpu-images N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python benchmarks/gpu_check.py "$@"
