#!/usr/bin/env bash
# Sets up this checkout on one Linux machine: a .venv with igpt_jax and its test extras at the versions the tests
# pass with (constraints.txt), plus Debian's Fashion-MNIST (the offline default data set) when apt is available.
# Idempotent: rerunning only checks.
# Usage: bash launch/setup_local.sh [EXTRAS]   (EXTRAS default: test; "data" is enough to train)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install dataset-fashion-mnist; the Fashion-MNIST config will need TFDS online" >&2
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
echo "setup: ready; activate with: source .venv/bin/activate"
