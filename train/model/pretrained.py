"""Saving and loading tokenizers: our own folders (safetensors + config JSON) and SigLIP2 checkpoints.

A SigLIP2 naflex vision checkpoint in Hugging Face format (config.json + model.safetensors, or a sharded
index) initialises the encoder, its position table and the pooling head by parameter name. The patch
embedding grows from 768 inputs (one 16x16 RGB frame) to 3072 (4 frames): SigLIP2's weights go to the
first frame's slot and the other three start at zero, so an image (zero-padded in time) gets exactly
SigLIP2's features at initialisation. Only safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_pretrained(model, folder: str) -> None:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps({"atoken": asdict(model.config)}, indent=2))


def load_pretrained(cls, folder: str):
    from atoken.train.model.tokenizer import TokenizerConfig

    path = Path(folder)
    raw = json.loads((path / CONFIG_NAME).read_text())
    if "atoken" not in raw:
        raise ValueError(f"{path / CONFIG_NAME} is not an atoken tokenizer config (from_siglip2 loads SigLIP2)")
    settings = raw["atoken"]
    settings["fsq_levels"] = tuple(settings["fsq_levels"])
    model = cls(TokenizerConfig(**settings))
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return model


def _read_siglip2_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            weights.update(load_file(str(path / name)))
        return weights
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or model.safetensors.index.json (safetensors only)")
    return load_file(str(path / WEIGHTS_NAME))


def siglip2_settings(folder: str | Path) -> dict:
    """The tokenizer sizes a SigLIP2 vision checkpoint implies (width, depth, heads, MLP, position table)."""
    raw = json.loads((Path(folder) / CONFIG_NAME).read_text())
    vision = raw.get("vision_config", raw)  # a full Siglip2Model config or a vision-only one
    settings = dict(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                    heads=vision["num_attention_heads"], mlp_width=vision["intermediate_size"],
                    layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
                    position_grid=int(round(vision.get("num_patches", 256) ** 0.5)),
                    patch_size=vision.get("patch_size", 16))
    return settings


def load_siglip2(cls, folder: str, **overrides):
    """A tokenizer whose encoder and pooling head are SigLIP2's; the decoder and latent heads start fresh."""
    from atoken.train.model.tokenizer import TokenizerConfig

    model = cls(TokenizerConfig(**{**siglip2_settings(folder), **overrides}))
    load_siglip2_weights(model, folder)
    return model


def load_siglip2_weights(model, folder: str | Path) -> list[str]:
    """SigLIP2's encoder, position table and pooling head into an existing tokenizer (the curriculum's first
    stage, `train.model.init_from`), in place; returns the names loaded. The decoder and latent heads keep their
    initialisation. A checkpoint of other sizes than the model's is refused in one line."""
    path = Path(folder)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face SigLIP2 folder (no {CONFIG_NAME})")
    expected = siglip2_settings(path)
    config = model.config
    differing = [f"{name} {expected[name]} (model: {getattr(config, name)})" for name in
                 ("width", "depth", "heads", "mlp_width", "position_grid", "patch_size")
                 if name in expected and expected[name] != getattr(config, name)]
    if differing:
        raise ValueError(f"{path}: the SigLIP2 checkpoint does not fit train.model: {', '.join(differing)}")
    prefix = "vision_model."
    weights = {name.removeprefix(prefix): tensor for name, tensor in _read_siglip2_weights(path).items()
               if not name.startswith("text_model.") and name not in ("logit_scale", "logit_bias")}
    patch_weight = weights.pop("embeddings.patch_embedding.weight")  # (width, 768): one frame, (h, w, c)
    grown = torch.zeros(config.width, config.patch_dim, dtype=patch_weight.dtype)
    grown[:, : patch_weight.shape[1]] = patch_weight  # frame 0 of the (t, h, w, c) patch layout
    weights["embeddings.patch_embedding.weight"] = grown
    ours = model.state_dict()
    unknown = sorted(set(weights) - set(ours))
    if unknown:
        raise ValueError(f"{path}: SigLIP2 weights with no place in the tokenizer: {unknown[:5]}")
    missing_encoder = sorted(n for n in ours if n.startswith(("embeddings.", "encoder.", "post_layernorm."))
                             and n not in weights)
    if missing_encoder:
        raise ValueError(f"{path}: the checkpoint lacks encoder weights {missing_encoder[:5]}")
    model.load_state_dict(weights, strict=False)
    return sorted(weights)
