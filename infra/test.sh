#!/usr/bin/env bash
# README command 2 (and CI): install if needed, lint, then the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# Ray, MLflow and DeepSpeed write under HOME and TMPDIR: keep them inside the checkout.
export ONEBASE_CACHE="$PWD/.onebase/cache"
export TORCH_EXTENSIONS_DIR="$ONEBASE_CACHE/torch_extensions"
export MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
.venv/bin/ruff check platform tests bench
exec .venv/bin/python -m pytest "$@"
