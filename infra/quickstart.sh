#!/usr/bin/env bash
# README command 1: install, then train the embedded default job (bundled MiniLM + tweet sentiment,
# LoRA, local Ray, local MLflow in ./mlflow.db) and register the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
exec .venv/bin/onebase run jobs/tweet-sentiment-lora.yaml "$@"
