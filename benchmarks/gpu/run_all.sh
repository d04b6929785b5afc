#!/usr/bin/env bash
# Every GPU measurement, in one self-contained script. The lent GPU has torch but not Ray, MLflow or
# webdataset, so nothing here needs them; carry einops (pure Python) as a wheel:
#   pip download --no-deps einops -d benchmarks/gpu/wheels     (on the CPU machine, before the run)
#   bash benchmarks/gpu/run_all.sh                             (on the GPU machine)
#   DEVICE=cpu bash benchmarks/gpu/run_all.sh                  (the same ratios on a CPU, small models)
# Results land in benchmarks/results/, named after the device.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
DEVICE="${DEVICE:-cuda}"
if compgen -G "benchmarks/gpu/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-deps benchmarks/gpu/wheels/*.whl
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi
name=$("$PYTHON" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') if '$DEVICE' == 'cuda' else 'cpu')")
out="benchmarks/results/model-throughput-$name.json"
"$PYTHON" benchmarks/gpu/bench_model.py --device "$DEVICE" --out "$out"
echo "results: $out"
# Issue 5's reader goal (>= 2x the samples/s `base` consumes, one loader worker per core): the reader's
# per-core rate from benchmarks/results/preprocess-cpu.json (256-px photo shards) times this node's cores,
# next to base's samples/s just measured. An estimate where this node's cores differ from the CPU machine's.
"$PYTHON" - "$out" <<'PY'
import json, os, sys
model = json.load(open(sys.argv[1]))["tokenizer"].get("base")
reader = json.load(open("benchmarks/results/preprocess-cpu.json")).get("reader", {})
per_core = reader.get("reader_samples_per_second_per_core")
if model and per_core:
    consumed = model["samples_per_step"] / model["seconds_per_step"]
    supplied = per_core * os.cpu_count()
    print(f"reader {supplied:.0f} samples/s ({os.cpu_count()} cores x {per_core:.1f}) vs base {consumed:.0f} "
          f"samples/s: {supplied / consumed:.2f}x (goal >= 2x)")
PY
