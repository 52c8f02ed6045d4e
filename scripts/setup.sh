#!/usr/bin/env bash
# Installs amrseg and its test tools into the current Python.
# torch goes first so that the package's `torch>=` requirement is already met: on a CPU-only
# machine an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "[setup] installing CUDA torch"
        "$PY" -m pip install torch
    else
        echo "[setup] installing CPU torch ${TORCH_SPEC:=torch==2.13.0}"
        "$PY" -m pip install "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
    fi
fi

# Fashion-MNIST, the source of the second demo (`amrseg run fashion`; the tests never need it).
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -z "${AMRSEG_FMNIST:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing dataset-fashion-mnist"
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
            || echo "[setup] could not install dataset-fashion-mnist; the demo needs the Fashion-MNIST IDX files: set AMRSEG_FMNIST=DIR"
    else
        echo "[setup] Fashion-MNIST not found: 'sudo apt-get install dataset-fashion-mnist', or download the four"
        echo "        *-ubyte.gz files from github.com/zalandoresearch/fashion-mnist and set AMRSEG_FMNIST=DIR"
    fi
fi

"$PY" -m pip install -q --no-build-isolation -e ".[dev,crf,viz]"
