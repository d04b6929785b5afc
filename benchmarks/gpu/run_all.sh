#!/usr/bin/env bash
# Every GPU measurement, in one self-contained script. The lent GPU has torch but not Ray, MLflow or
# webdataset: the model, block-mask and path checks need only einops; what reads shards (the loader, the timed
# training run, the host-sync check) needs webdataset too. Carry them as wheels (pure Python):
#   pip download --no-deps einops webdataset braceexpand -d benchmarks/gpu/wheels     (on the CPU machine)
#   bash benchmarks/gpu/run_all.sh                             (on the GPU machine)
#   DEVICE=cpu bash benchmarks/gpu/run_all.sh                  (the same ratios on a CPU, small models)
# Results land in benchmarks/results/, named after the device.
# The timed training run (issue 7: `base` for 10 minutes on real images and clips, PSNR curve, tokens/s, MFU with
# data loading on) needs shards carried in benchmarks/gpu/data (ignored by git; carry it, ~40 MB):
#   .venv/bin/python benchmarks/gpu/bench_train.py --prepare benchmarks/gpu/data    (CPU machine)
# and, since one device command may run 10 minutes at most, runs as its own call:
#   PART=train bash benchmarks/gpu/run_all.sh       (PART=model: the model benchmark only; default: both)
PART="${PART:-all}"
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
if [ "$PART" = train ] || [ "$PART" = all ]; then
  if [ -d benchmarks/gpu/data/images ]; then
    minutes=10; preset=base
    [ "$DEVICE" = cpu ] && { minutes=1; preset=tiny; }
    videos=(); [ -d benchmarks/gpu/data/videos ] && "$PYTHON" -c "import av" 2>/dev/null && \
      videos=(--videos benchmarks/gpu/data/videos)
    "$PYTHON" benchmarks/gpu/bench_train.py --images benchmarks/gpu/data/images "${videos[@]}" --preset "$preset" \
      --minutes "$minutes" --device "$DEVICE" --out "benchmarks/results/train-$preset-$name.json"
  else
    echo "no benchmarks/gpu/data: skipping the training run (see the top of this file)"
  fi
  [ "$PART" = train ] && exit 0
fi
# Issue 17 item 4: the evaluation suite at 5k and 50k samples with the real Inception network on the GPU
# (peak RSS flat, time linear); needs pyarrow, scikit-image and PIL, skipped with the reason where they are absent.
if "$PYTHON" -c "import pyarrow, skimage, PIL" 2>/dev/null; then
  sizes="5000 50000"; [ "$DEVICE" = cpu ] && sizes="100 1000"
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/eval_memory.py --inception "$DEVICE" --sizes $sizes --before-sizes \
    --out "benchmarks/results/eval-memory-$name.json" || echo "eval_memory failed (see above)"
else
  echo "skipping benchmarks/eval_memory.py: pyarrow, scikit-image or PIL is not installed on this machine"
fi
# Issue 19: the training loader on this node's own cores, feeding the base stand-in from 8 loader processes (the
# budget per GPU, no scaling; the CPU machine has 2 cores and scales the stand-in's sleep instead).
"$PYTHON" benchmarks/loader.py --stand-in-processes 8 --out "benchmarks/results/loader-$name-node.json" || \
  echo "loader benchmark failed (see above)"
# Issue 15: the training paths only a GPU runs (bf16 FSDP2 on NCCL, compile, deterministic, compiled flex, host
# syncs per step of the real loop), each passed or failed with its numbers. Host syncs need webdataset (carry its
# wheel with einops: pip download --no-deps einops webdataset braceexpand) and benchmarks/gpu/data.
"$PYTHON" benchmarks/gpu/check_paths.py --device "$DEVICE" --out "benchmarks/results/gpu-paths-$name.json" || \
  echo "check_paths failed (see above)"
out="benchmarks/results/model-throughput-$name.json"
"$PYTHON" benchmarks/gpu/bench_model.py --device "$DEVICE" --out "$out"
echo "results: $out"
# Issue 15 item 5: FlexAttention's block mask per so400m forward, 54 create_block_mask calls vs one structured build.
"$PYTHON" benchmarks/block_mask.py --device "$DEVICE" --out "benchmarks/results/block-mask-$name.json"
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
