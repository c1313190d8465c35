#!/usr/bin/env bash
# A local cluster on 127.0.0.1 for trying the cluster commands: a Ray head, a second Ray node joined
# to it, and an MLflow server (sqlite + artifacts on disk, --serve-artifacts). Free ports are picked
# at start; the state (stack.json, logs, mlflow.db, mlartifacts/) lives in --dir (./.onebase/stack).
#
#   bash infra/local-stack.sh start [--dir DIR] [--cpus 2] [--worker-cpus 2]   # prints the addresses
#   bash infra/local-stack.sh status [--dir DIR] [--json]
#   bash infra/local-stack.sh stop [--dir DIR]        # stops only this stack, checks nothing is left
#
# Then: export RAY_ADDRESS=<jobs/dashboard URL>; onebase submit jobs/tweet-sentiment-lora.yaml
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
  py="$repo/.venv/bin/python"
else
  py=python3
fi
exec "$py" -m onebase.cluster.stack "$@"
