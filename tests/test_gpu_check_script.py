"""benchmarks/gpu/check_paths.py, the GPU-only training paths' checks that run_all.sh runs on a lent device, run here
on the CPU: the checks a CPU can do (bf16 FSDP2 on gloo, deterministic training) pass, the others are named as not
run, and the script's record is what a lent session commits."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_the_gpu_checks_run_on_cpu_and_pass_what_a_cpu_can_check(tmp_path):
    out = tmp_path / "paths.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "check_paths.py"), "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    checks = record["checks"]
    assert set(checks) == {"fsdp_bf16", "deterministic"} and "compile, flex and host_syncs" in record["not_run"]
    assert all(check["passed"] for check in checks.values()), checks
    fsdp = checks["fsdp_bf16"]
    assert fsdp["block_weight_dtype"] == "torch.bfloat16" and fsdp["logit_scale_dtype"] == "torch.float32"
    assert checks["deterministic"]["tensors_differing_deterministic"] == 0
