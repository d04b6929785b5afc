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


def load_siglip2(cls, folder: str, **overrides):
    """A tokenizer whose encoder and pooling head are SigLIP2's; the decoder and latent heads start fresh."""
    from atoken.train.model.tokenizer import TokenizerConfig

    path = Path(folder)
    raw = json.loads((path / CONFIG_NAME).read_text())
    vision = raw.get("vision_config", raw)  # a full Siglip2Model config or a vision-only one
    if vision.get("patch_size", 16) != 16 and "patch_size" not in overrides:
        overrides["patch_size"] = vision["patch_size"]
    grid = int(round(vision.get("num_patches", 256) ** 0.5))
    settings = dict(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                    heads=vision["num_attention_heads"], mlp_width=vision["intermediate_size"],
                    layer_norm_eps=vision.get("layer_norm_eps", 1e-6), position_grid=grid)
    model = cls(TokenizerConfig(**{**settings, **overrides}))

    prefix = "vision_model."
    weights = {name.removeprefix(prefix): tensor for name, tensor in _read_siglip2_weights(path).items()
               if not name.startswith("text_model.") and name not in ("logit_scale", "logit_bias")}
    patch_weight = weights.pop("embeddings.patch_embedding.weight")  # (width, 768): one frame, (h, w, c)
    grown = torch.zeros(model.config.width, model.config.patch_dim, dtype=patch_weight.dtype)
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
    return model
