#!/usr/bin/env bash
# Runs tests/test_real_mmagic_s38.py against a real MMagic 1.2.0 install (optional,
# not part of .ci/run: it downloads about 1 GB of packages from PyPI).
# Usage: bash .ci/mmagic_check.sh [venv dir, default /tmp/pygan_mmagic_venv]
# Needs .venv (make build): pygan_optim runs from this tree with its built extension.
# mmcv-lite has no compiled ops and PyPI's torchvision 0.28 is a CUDA build whose ops do
# not load here; the test file stubs those (only where the real import fails).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/pygan_mmagic_venv}"
pip() { "$venv/bin/pip" install -q "$@"; }
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
  pip torch==2.13.0                     # the CPU build, first: nothing may pull another torch
  pip mmengine==0.10.7
  pip mmcv-lite==2.1.0                  # MMagic 1.2 asserts 2.0.0 <= mmcv < 2.2.0
  pip --no-deps mmagic==1.2.0
  pip --no-deps torchvision==0.28.0
  pip click==8.1.8 requests==2.34.2 numpy==1.26.4 opencv-python==4.10.0.84 einops==0.8.1 \
      safetensors==0.8.0 tqdm==4.70.1 importlib_metadata==10.2.0 regex==2026.12.2 \
      scipy==1.13.1 pandas==2.2.3 pytest==8.3.5 hypothesis==6.131.0 expecttest==0.3.0
  # MMagic 1.2 uses np.bool8 (numpy < 2); diffusers 0.24 needs transformers' classes.
  pip --no-deps diffusers==0.24.0 huggingface-hub==0.19.4 transformers==4.36.2 \
      tokenizers==0.15.2 imageio==2.34.2 lpips==0.1.4 resize-right==0.0.2
fi
so=$(ls .venv/lib/python3.11/site-packages/pygan_optim/_C*.so)
PYTHONPATH="$PWD" PYGAN_OPTIM_EXTENSION="$PWD/$so" TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_real_mmagic_s38.py
