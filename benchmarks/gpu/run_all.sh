#!/usr/bin/env bash
# Every GPU measurement, in one self-contained script (the lent GPU has torch but not Ray, MLflow or
# webdataset, so nothing here needs them). Results land in benchmarks/results/ named after the device.
#   bash benchmarks/gpu/run_all.sh            on the GPU machine
#   DEVICE=cpu bash benchmarks/gpu/run_all.sh the same ratios on a CPU
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON_SET:-}" ] && PYTHON=.venv/bin/python
DEVICE="${DEVICE:-cuda}"
# Pure-Python wheels carried to the device (pip download --no-deps ... -d benchmarks/gpu/wheels).
if [ -d benchmarks/gpu/wheels ]; then "$PYTHON" -m pip install -q --no-deps benchmarks/gpu/wheels/*.whl; fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi
name=$("$PYTHON" -c "import torch,re; print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()) if '$DEVICE'=='cuda' else 'cpu')")
"$PYTHON" benchmarks/gpu/bench_model.py --device "$DEVICE" --out "benchmarks/results/model-throughput-$name.json" ${QUICK:+--quick}
echo "results: benchmarks/results/model-throughput-$name.json"
