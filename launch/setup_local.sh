#!/usr/bin/env bash
# Sets up a fresh Linux machine (or CI) for cmae_jax: the Fashion-MNIST IDX files from
# Debian's dataset-fashion-mnist package, then the Python requirements, the package and
# what its tests need.
# Usage: bash launch/setup_local.sh   (from the repository root; re-running is harmless)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"
elif command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist (needs root)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist \
    || { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q dataset-fashion-mnist; }
else
  echo "Fashion-MNIST: no apt-get here; pass --config.dataset.idx_dir=FOLDER with the four"
  echo "IDX files, or --config.dataset.allow_tfds_download=True where TFDS can download."
fi

PYTHON="${PYTHON:-python3}"
# The runtime requirements (requirements.txt), this package in editable mode and the
# test extra (pytest, notebook runner, torch + transformers for the parity tests).
"$PYTHON" -m pip install -q -e ".[test]"
echo "cmae_jax installed for $("$PYTHON" --version)"
