"""The AToken tokenizer: one transformer encoder/decoder for images, videos and 3D in a sparse 4-D latent.

    packed tokens ─► embeddings (patch linear + SigLIP2's 2-D position table, resized per sample)
                  ─► encoder (SigLIP2 blocks + 4-D RoPE) ─► post_layernorm ─┬─► head: one embedding per sample
                                                                            └─► KL head: mean, logvar (C per token)
    latent (C per token, optionally FSQ-quantized) ─► decoder_in ─► decoder (RMSNorm, QK-norm, no bias)
                  ─► pixel_head (3072 per token: a 4x16x16 RGB patch) | gaussian_head (32 Gaussians per voxel)

Sizes are data (PRESETS); the paper's figures are in ../shared/reference/atoken-spec.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from atoken.train.model.gaussians import GaussianHead
from atoken.train.model.pooling import AttentionPooling
from atoken.train.model.quantizers import FSQ, KLHead
from atoken.train.model.rope import rope_angles
from atoken.train.model.tokens import VOXELS, PackedBatch, pack_images, tokens_per_sample, unpack_images
from atoken.train.model.transformer import KVCache, Stack, TokenInfo


@dataclass
class TokenizerConfig:
    width: int
    depth: int
    heads: int
    mlp_width: int
    latent_channels: int = 48  # 32 in curriculum stage 1, 48 from stage 2 (FSQ needs 48)
    patch_size: int = 16
    temporal_patch: int = 4
    position_grid: int = 16  # SigLIP2 naflex: 256 learned positions = a 16x16 table
    tile_latent_frames: int = 4  # temporal tiles of 16 frames
    # How many earlier tiles a tile attends to (None: all). A window bounds the KV cache, so memory depends
    # on the tile size and the window, not on the video's length.
    cache_tiles: int | None = None
    rope: bool = True
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-6
    gaussians_per_voxel: int = 32
    voxel_grid: int = 64
    fsq_groups: int = 8
    fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    attention_backend: str = "auto"  # auto (flex on CUDA, masked elsewhere), flex, masked
    # The frozen text encoder's width. None: the pooled embedding is already in the text space (a SigLIP2
    # encoder beside SigLIP2's text tower); otherwise a linear projection maps it there (e.g. 384 for MiniLM).
    text_dim: int | None = None

    @property
    def patch_dim(self) -> int:
        return self.temporal_patch * self.patch_size * self.patch_size * 3


PRESETS: dict[str, dict] = {
    # Trains in minutes on 2 CPU cores (the quickstart).
    "tiny": dict(width=96, depth=2, heads=4, mlp_width=384),
    # Twice tiny's width, twice its depth: still minutes on a CPU.
    "small": dict(width=192, depth=4, heads=4, mlp_width=768),
    # SigLIP2-B/16 shapes (~192M encoder + decoder in the paper).
    "base": dict(width=768, depth=12, heads=12, mlp_width=3072),
    # SigLIP2-So400m/16 shapes: head_dim 72 → 9 RoPE frequency pairs per axis.
    "so400m": dict(width=1152, depth=27, heads=16, mlp_width=4304),
}


class Embeddings(nn.Module):
    """SigLIP2's vision embeddings (same names), generalised to (t, x, y, z) tokens."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.patch_dim, config.width)
        self.position_embedding = nn.Embedding(config.position_grid**2, config.width)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.patch_embedding(batch.patches) + self.positions(batch)  # (N, width)

    def positions(self, batch: PackedBatch) -> torch.Tensor:
        """(N, width): the learned table resized to each sample's grid (SigLIP2 naflex's antialiased bilinear
        resize) and read at the token's (y, x). Voxels read the table resized to the voxel grid."""
        grid = self.config.position_grid
        table = self.position_embedding.weight.reshape(grid, grid, -1)  # (G, G, D)
        resized: dict[tuple[int, int], torch.Tensor] = {}
        out = []
        counts = tokens_per_sample(batch)
        # Samples are contiguous runs: slices from the layouts' counts (host arithmetic) when they describe
        # every token; a tile of a video (encode_tiled) holds fewer, and is cut by its sample ids instead.
        whole = sum(counts) == batch.patches.shape[0]
        starts = [0, *itertools.accumulate(counts)]
        for index, layout in enumerate(batch.layouts):
            size = (self.config.voxel_grid,) * 2 if layout.modality == VOXELS else layout.grid[1:]
            if size not in resized:
                rows, cols = (resize_weights(grid, n, table.device) for n in size)  # (h, G), (w, G)
                resized[size] = torch.einsum("ig,jk,gkd->ijd", rows, cols, table.float()).to(table.dtype)  # (h, w, D)
            coords = (batch.coords[starts[index]:starts[index + 1]] if whole
                      else batch.coords[batch.sample_ids == index])  # (n, 4)
            # index_select, not resized[size][y, x]: advanced indexing backs off into index_put_(accumulate) with
            # atomic adds on CPU, whose order varies with timing (measured: two quickstart runs side by side ended
            # stage 4 with different position-embedding gradients); index_select's backward (index_add_) does not.
            flat = coords[:, 2] * size[1] + coords[:, 1]  # (n,) row-major into (h, w)
            out.append(resized[size].reshape(-1, resized[size].shape[-1]).index_select(0, flat))  # (n, D)
        return torch.cat(out)  # (N, D)


def resize_weights(source: int, target: int, device: torch.device) -> torch.Tensor:
    """(target, source) weights of a 1-D antialiased linear resize (align_corners=False), as SigLIP2 naflex
    computes them. Written out because F.interpolate(antialias=True) disagrees with it when one output
    side is 1 pixel (measured: up to 0.87 off for a 4x4 table resized to 3x1)."""
    scale = source / target
    support = max(scale, 1.0)
    centers = (torch.arange(target, device=device, dtype=torch.float32) + 0.5) * scale - 0.5  # (target,)
    taps = torch.arange(source, device=device, dtype=torch.float32)  # (source,)
    weights = (1 - (taps[None, :] - centers[:, None]).abs() / support).clamp(min=0)  # (target, source)
    return weights / weights.sum(-1, keepdim=True)


class SigmoidLogits(nn.Module):
    """SigLIP's learnable temperature and bias of the sigmoid loss, at SigLIP's initialisation (spec), shape (1,)
    as SigLIP2's own (FSDP2 cannot shard a 0-d parameter). A module of their own so that bf16 FSDP2 gives them a
    float32 policy (train/parallel.py): in bf16, log(10) rounds to 2.297 (exp: 9.94) and the bias moves in steps of
    1/16. `forward` returns copies, so that DDP and FSDP2 see them leave through a forward."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([math.log(10.0)]))
        self.bias = nn.Parameter(torch.tensor([-10.0]))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.clone(), self.bias.clone()  # (1,), (1,)


# Names in weights files written before SigmoidLogits, read as they are now.
LEGACY_NAMES = {"logit_scale": "logits.scale", "logit_bias": "logits.bias"}


def rename_legacy(state_dict: dict, prefix: str = "") -> dict:
    """`state_dict` with the names of older weights files renamed, in place (and returned)."""
    for old, new in LEGACY_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    return state_dict


def _rename_legacy_on_load(module, state_dict, prefix, *_args) -> None:
    rename_legacy(state_dict, prefix)


class Tokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.register_load_state_dict_pre_hook(_rename_legacy_on_load)
        self.config = c = config
        backend = c.attention_backend
        self.embeddings = Embeddings(c)
        self.encoder = Stack(c.depth, c.width, c.heads, c.mlp_width, siglip=True, eps=c.layer_norm_eps,
                             backend=backend)
        self.post_layernorm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.head = AttentionPooling(c.width, c.heads, c.mlp_width, layer_norm_eps=c.layer_norm_eps)
        self.text_projection = nn.Linear(c.width, c.text_dim, bias=False) if c.text_dim else None
        self.logits = SigmoidLogits()
        self.kl = KLHead(c.width, c.latent_channels)
        fsq_channels = c.fsq_groups * len(c.fsq_levels)
        self.fsq = FSQ(fsq_channels, c.fsq_groups, tuple(c.fsq_levels)) if c.latent_channels == fsq_channels else None
        self.decoder_in = nn.Linear(c.latent_channels, c.width, bias=False)
        self.decoder = Stack(c.depth, c.width, c.heads, c.mlp_width, siglip=False, eps=c.layer_norm_eps,
                             backend=backend)
        self.decoder_norm = nn.RMSNorm(c.width, eps=c.layer_norm_eps)
        self.pixel_head = nn.Linear(c.width, c.patch_dim, bias=False)
        self.gaussian_head = GaussianHead(c.width, c.gaussians_per_voxel, c.voxel_grid)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Tokenizer:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(TokenizerConfig(**{**PRESETS[name], **overrides}))

    @classmethod
    def from_pretrained(cls, folder: str) -> Tokenizer:
        from atoken.train.model.pretrained import load_pretrained

        return load_pretrained(cls, folder)

    def save_pretrained(self, folder: str) -> None:
        from atoken.train.model.pretrained import save_pretrained

        save_pretrained(self, folder)

    @classmethod
    def from_siglip2(cls, path: str, **overrides) -> Tokenizer:
        from atoken.train.model.pretrained import load_siglip2

        return load_siglip2(cls, path, **overrides)

    def config_dict(self) -> dict:
        return asdict(self.config)

    # -- the model ---------------------------------------------------------------------------------

    def token_info(self, batch: PackedBatch) -> TokenInfo:
        tiles = batch.coords[:, 0] // self.config.tile_latent_frames  # (N,): images and 3D are tile 0
        head_dim = self.config.width // self.config.heads
        rope = rope_angles(batch.coords, head_dim, self.config.rope_base) if self.config.rope else None
        return TokenInfo(batch.sample_ids, tiles, rope, self.config.cache_tiles)

    def encode(self, batch: PackedBatch, info: TokenInfo | None = None) -> dict[str, torch.Tensor]:
        """→ hidden (N, width) after post_layernorm, mean and logvar (N, C). `info`: the batch's `token_info`, when
        the caller shares one with `decode` (and so one attention mask)."""
        info = self.token_info(batch) if info is None else info
        hidden = self.post_layernorm(self.encoder(self.embeddings(batch), info))
        mean, logvar = self.kl(hidden)
        return {"hidden": hidden, "mean": mean, "logvar": logvar}

    def decode(self, latent: torch.Tensor, batch: PackedBatch, info: TokenInfo | None = None) -> dict[str, object]:
        """latent (N, C) → patches (N, 3072) for every token, and Gaussians for the voxel tokens."""
        info = self.token_info(batch) if info is None else info
        hidden = self.decoder_norm(self.decoder(self.decoder_in(latent), info))  # (N, width)
        out: dict[str, object] = {"patches": self.pixel_head(hidden)}
        if any(layout.modality == VOXELS for layout in batch.layouts):  # decided on the host: no device sync
            voxels = batch.modality_mask(VOXELS)
            out["gaussians"] = self.gaussian_head(hidden[voxels], batch.coords[voxels][:, 1:])
        return out

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (N, 48) → FSQ-quantized latent (N, 48) and codes (N, 8), each in [0, 4096)."""
        if self.fsq is None:
            raise ValueError(f"FSQ needs a {self.config.fsq_groups * len(self.config.fsq_levels)}-channel latent, "
                             f"this model has {self.config.latent_channels}")
        return self.fsq(latent)

    def embed(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One embedding per sample (S, text_dim or width), in the text encoder's space; pass the encoder's
        `hidden` (N, width) when it is already computed."""
        hidden = self.encode(batch)["hidden"] if hidden is None else hidden
        pooled = self.head(hidden, batch.sample_ids, batch.num_samples)  # (S, width)
        return pooled if self.text_projection is None else self.text_projection(pooled)

    def forward_packed(self, batch: PackedBatch, sample: bool = True, quantize: bool = False,
                       embed: bool = False, noise=None) -> dict[str, object]:
        """`noise`: a callable giving ε (N, C) for the posterior draw (the training loop draws it per data
        stream, so the draw does not depend on how streams are spread over workers); None: the global RNG."""
        # One TokenInfo for encoder and decoder: they attend over the same tokens, so the flex path builds its
        # block mask once per batch instead of once per layer.
        info = self.token_info(batch)
        encoded = self.encode(batch, info)
        mean, logvar = encoded["mean"], encoded["logvar"]
        if sample:
            epsilon = noise(mean) if noise is not None else torch.randn_like(mean)  # (N, C)
            latent = mean + torch.exp(0.5 * logvar) * epsilon  # (N, C)
        else:
            latent = mean
        out: dict[str, object] = dict(encoded)
        if embed:
            out["embedding"] = self.embed(batch, hidden=encoded["hidden"])  # (S, text_dim or width)
            # The sigmoid loss's temperature and bias leave through forward, as non-leaf tensors: DDP finds
            # unused parameters by walking the outputs' autograd graph, and a parameter read off the module
            # instead is "marked ready twice" (once as unused, once by its gradient hook). A loss that does not
            # need them must still touch them (losses/terms.py: `untouched_logits`), or DDP waits for their gradients.
            out["logit_scale"], out["logit_bias"] = self.logits()
        if quantize:
            latent, out["codes"] = self.quantize(latent)
        out |= self.decode(latent, batch, info)
        out["latent"] = latent
        return out

    def forward(self, pixels: torch.Tensor | PackedBatch, sample: bool = True, quantize: bool = False,
                embed: bool = False, noise=None) -> dict[str, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] → reconstruction (B, 3, H, W), mean, logvar (and embedding): the image
        contract the pipeline's stages use for every model. A PackedBatch goes to `forward_packed` (through
        `forward`, so that DistributedDataParallel sees the call)."""
        if isinstance(pixels, PackedBatch):
            return self.forward_packed(pixels, sample=sample, quantize=quantize, embed=embed, noise=noise)
        batch = pack_images(pixels, self.config.patch_size, self.config.temporal_patch)
        out = self.forward_packed(batch, sample=sample, quantize=quantize, embed=embed, noise=noise)
        images = unpack_images(out["patches"], batch, self.config.patch_size)  # (B, 3, H, W)
        result = {"reconstruction": images, "mean": out["mean"], "logvar": out["logvar"]}
        if embed:
            result |= {name: out[name] for name in ("embedding", "logit_scale", "logit_bias")}
        return result

    # -- long videos ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_tiled(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """The same result as `encode`, computed one temporal tile at a time with a KV cache, so a long video
        never holds more than one tile's activations (the cache holds keys and values only)."""
        info = self.token_info(batch)
        hidden = torch.empty(batch.patches.shape[0], self.config.width, device=batch.patches.device)
        cache = KVCache()
        for tile in info.tiles.unique(sorted=True).tolist():
            chosen, part_info = _tile(info, tile, cache)
            part = PackedBatch(batch.patches[chosen], batch.coords[chosen], batch.sample_ids[chosen], batch.layouts)
            hidden[chosen] = self.post_layernorm(self.encoder(self.embeddings(part), part_info, cache))
        mean, logvar = self.kl(hidden)
        return {"hidden": hidden, "mean": mean, "logvar": logvar}

    @torch.no_grad()
    def decode_tiled(self, latent: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Pixel patches (N, 3072) of `decode`, one temporal tile at a time with a KV cache."""
        info = self.token_info(batch)
        patches = torch.empty(latent.shape[0], self.config.patch_dim, device=latent.device)
        cache = KVCache()
        for tile in info.tiles.unique(sorted=True).tolist():
            chosen, part_info = _tile(info, tile, cache)
            hidden = self.decoder(self.decoder_in(latent[chosen]), part_info, cache)
            patches[chosen] = self.pixel_head(self.decoder_norm(hidden))
        return patches


def _tile(info: TokenInfo, tile: int, cache: KVCache) -> tuple[torch.Tensor, TokenInfo]:
    """The tokens of one temporal tile, and the cache trimmed to the tiles they may attend to."""
    if info.window is not None:
        cache.drop_before(tile - info.window)
    chosen = info.tiles == tile  # (N,) bool
    rope = None if info.rope is None else (info.rope[0][chosen], info.rope[1][chosen])
    return chosen, TokenInfo(info.samples[chosen], info.tiles[chosen], rope, info.window)

