"""Sparse 4-D tokens: every modality becomes patches with integer (t, x, y, z) coordinates, packed.

Images and videos are cut into (t, h, w) = (4, 16, 16) RGB patches (3072 values, ordered t, h, w, c so
that the first frame's 768 values are laid out exactly as SigLIP2's (h, w, c) patches). An image is a
video of one frame, zero-padded to 4. A 3D asset is its occupied voxels of a 64³ grid, each carrying a
768-d feature (a 16x16 RGB patch of its nearest view) zero-padded to 3072.

Samples of any modality and size are concatenated into one sequence (NaViT-style packing); a
`sample_ids` vector keeps them apart in attention, so nothing is padded to the largest sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

IMAGE, VIDEO, VOXELS = "image", "video", "voxels"


@dataclass(frozen=True)
class SampleLayout:
    """How one sample's tokens map back to its pixels or voxels."""
    modality: str
    grid: tuple[int, int, int]  # (T', H', W') latent grid for images/videos; (V, 0, 0) for voxels
    frames: int  # real frames before temporal padding (1 for an image, 0 for voxels)


@dataclass
class PackedBatch:
    patches: torch.Tensor  # (N, 3072) float
    coords: torch.Tensor  # (N, 4) int64: t, x, y, z
    sample_ids: torch.Tensor  # (N,) int64, sample index of each token, non-decreasing
    layouts: list[SampleLayout]
    captions: list[str] | None = None  # one per sample, for the understanding losses

    @property
    def num_samples(self) -> int:
        return len(self.layouts)

    @property
    def patch_dim(self) -> int:
        return self.patches.shape[1]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(to_device(self.patches, device), to_device(self.coords, device),
                           to_device(self.sample_ids, device), self.layouts, self.captions)

    def modality_mask(self, modality: str) -> torch.Tensor:
        """(N,) bool: the tokens of samples of one modality."""
        flags = to_device(torch.tensor([layout.modality == modality for layout in self.layouts]),
                          self.sample_ids.device)
        return flags[self.sample_ids]


@dataclass
class FramePack:
    """Images and clips packed on the host as their uint8 frames, patchified on the device by `to`.

    Why not a PackedBatch on the host: its float patch rows carry the temporal padding (an image's 3072-value
    row is 3/4 zeros) at 4 bytes a value, 16x an image's uint8 bytes. Measured on 512-px JPEG crops: patchify
    took 3.3 ms a sample and its 3.9 MB per sample crossed from the loader processes and was concatenated
    again on the training thread; uint8 frames are 0.25 MB and are patchified where the model runs."""
    frames: list[torch.Tensor]  # per sample (T, 3, H, W) uint8 in [0, 255], H and W multiples of the patch
    layouts: list[SampleLayout]
    captions: list[str] | None = None
    patch: int = 16
    temporal: int = 4

    @property
    def num_samples(self) -> int:
        return len(self.layouts)

    @property
    def token_count(self) -> int:
        return sum(t * h * w for t, h, w in (layout.grid for layout in self.layouts))

    @property
    def patch_dim(self) -> int:
        return self.temporal * self.patch * self.patch * 3

    def to(self, device: torch.device | str) -> PackedBatch:
        """The packed batch on `device`: values in [-1, 1], as `pack` of `patchify_video` makes them."""
        samples = [patchify_video(to_device(frames, device).float() / 127.5 - 1.0, self.patch, self.temporal)
                   for frames in self.frames]  # each (T'·H'·W', 3072)
        batch = pack(samples)
        batch.captions = self.captions
        return batch

    @staticmethod
    def concat(packs: list[FramePack]) -> FramePack:
        captions = None if any(p.captions is None for p in packs) else [c for p in packs for c in p.captions]
        return FramePack([f for p in packs for f in p.frames], [layout for p in packs for layout in p.layouts],
                         captions, packs[0].patch, packs[0].temporal)


def frame_layout(frames: torch.Tensor, patch: int = 16, temporal: int = 4) -> tuple[torch.Tensor, SampleLayout]:
    """(T, 3, H, W) frames centre-cropped to multiples of `patch` (as `patchify_video` crops), and the layout
    of their tokens."""
    count, _, height, width = frames.shape
    crop_h, crop_w = height // patch * patch, width // patch * patch
    if crop_h == 0 or crop_w == 0:
        raise ValueError(f"a {height}x{width} frame is smaller than one {patch}x{patch} patch")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    frames = frames[:, :, top:top + crop_h, left:left + crop_w]  # (T, 3, H', W')
    grid = (-(-count // temporal), crop_h // patch, crop_w // patch)
    return frames, SampleLayout(IMAGE if count == 1 else VIDEO, grid, count)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without blocking, so that the copy does not make
    the host wait for the GPU's queue (a copy from pageable memory does)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def patchify_video(video: torch.Tensor, patch: int = 16, temporal: int = 4) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   SampleLayout]:
    """video (T, 3, H, W) → patches (T'·H'·W', temporal·patch·patch·3), coords (·, 4), layout.

    H and W are centre-cropped to multiples of `patch`; T is zero-padded to a multiple of `temporal`."""
    frames, _, height, width = video.shape
    crop_h, crop_w = height // patch * patch, width // patch * patch
    if crop_h == 0 or crop_w == 0:
        raise ValueError(f"a {height}x{width} frame is smaller than one {patch}x{patch} patch")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    video = video[:, :, top:top + crop_h, left:left + crop_w]  # (T, 3, H, W)
    padded_frames = -(-frames // temporal) * temporal
    if padded_frames != frames:
        pad = video.new_zeros(padded_frames - frames, *video.shape[1:])
        video = torch.cat([video, pad])  # (T_pad, 3, H, W)
    patches = rearrange(video, "(tt pt) c (hh ph) (ww pw) -> (tt hh ww) (pt ph pw c)", pt=temporal, ph=patch, pw=patch)
    grid = (padded_frames // temporal, crop_h // patch, crop_w // patch)
    coords = grid_coords(grid, video.device)
    modality = IMAGE if frames == 1 else VIDEO
    return patches, coords, SampleLayout(modality, grid, frames)


def patchify_image(image: torch.Tensor, patch: int = 16, temporal: int = 4):
    """image (3, H, W) → the tokens of a one-frame video (zero-padded in time)."""
    return patchify_video(image[None], patch, temporal)


def grid_coords(grid: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(T'·H'·W', 4) coordinates (t, x, y, z=0) in the raster order of `patchify_video`."""
    t, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij")
    return torch.stack([t, x, y, torch.zeros_like(t)], dim=-1).reshape(-1, 4)


def voxel_tokens(voxels: torch.Tensor, features: torch.Tensor, patch_dim: int = 3072):
    """voxels (V, 3) int (x, y, z) in the 64³ grid, features (V, F ≤ patch_dim) → zero-padded patches.

    The spec puts 3D at t = 0 (the authors' release uses t = 1; a config-free choice we document)."""
    if features.shape[-1] > patch_dim:
        raise ValueError(f"voxel features have {features.shape[-1]} values, more than a {patch_dim}-d patch")
    patches = torch.nn.functional.pad(features, (0, patch_dim - features.shape[-1]))  # (V, 3072)
    coords = torch.cat([torch.zeros_like(voxels[:, :1]), voxels], dim=-1).long()  # (V, 4): t=0, x, y, z
    return patches, coords, SampleLayout(VOXELS, (voxels.shape[0], 0, 0), 0)


def pack(samples: list[tuple[torch.Tensor, torch.Tensor, SampleLayout]]) -> PackedBatch:
    """Concatenate per-sample (patches, coords, layout) into one sequence."""
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    patches = torch.cat([s[0] for s in samples])  # (N, 3072)
    coords = torch.cat([s[1] for s in samples])  # (N, 4)
    sizes = torch.tensor([s[0].shape[0] for s in samples], device=patches.device)
    sample_ids = torch.repeat_interleave(torch.arange(len(samples), device=patches.device), sizes)  # (N,)
    return PackedBatch(patches, coords, sample_ids, [s[2] for s in samples])


def concat_packed(batches: list[PackedBatch]) -> PackedBatch:
    """Several packed batches as one sequence (sample ids renumbered, captions concatenated)."""
    offsets = torch.tensor([0] + [b.num_samples for b in batches[:-1]]).cumsum(0).tolist()
    captions = None if any(b.captions is None for b in batches) else [c for b in batches for c in b.captions]
    return PackedBatch(torch.cat([b.patches for b in batches]), torch.cat([b.coords for b in batches]),
                       torch.cat([b.sample_ids + offset for b, offset in zip(batches, offsets, strict=True)]),
                       [layout for b in batches for layout in b.layouts], captions)


def tokens_per_sample(batch: PackedBatch) -> list[int]:
    """Each sample's token count from its layout (host arithmetic: no device sync)."""
    return [layout.grid[0] if layout.modality == VOXELS else layout.grid[0] * layout.grid[1] * layout.grid[2]
            for layout in batch.layouts]


def pack_images(images: torch.Tensor, patch: int = 16, temporal: int = 4) -> PackedBatch:
    """images (B, 3, H, W) → a packed batch of B one-frame samples (vectorised `patchify_image`)."""
    batch, _, height, width = images.shape
    rows, cols = height // patch, width // patch
    top, left = (height - rows * patch) // 2, (width - cols * patch) // 2
    images = images[:, :, top:top + rows * patch, left:left + cols * patch]  # (B, 3, H', W')
    frame = rearrange(images, "b c (hh ph) (ww pw) -> (b hh ww) (ph pw c)", ph=patch, pw=patch)  # (N, 768)
    # Frame 0 leads the (t, h, w, c) layout: the zero frames of the temporal padding follow it.
    patches = torch.nn.functional.pad(frame, (0, (temporal - 1) * frame.shape[1]))  # (N, 3072)
    coords = grid_coords((1, rows, cols), images.device).repeat(batch, 1)  # (N, 4)
    sample_ids = torch.arange(batch, device=images.device).repeat_interleave(rows * cols)  # (N,)
    return PackedBatch(patches, coords, sample_ids, [SampleLayout(IMAGE, (1, rows, cols), 1)] * batch)


def unpack_images(patches: torch.Tensor, batch: PackedBatch, patch: int = 16) -> torch.Tensor:
    """(N, 3072) patches of a batch made by `pack_images` → images (B, 3, H, W)."""
    _, rows, cols = batch.layouts[0].grid
    frame = patches[:, : patch * patch * 3]  # (N, 768): frame 0
    return rearrange(frame, "(b hh ww) (ph pw c) -> b c (hh ph) (ww pw)", hh=rows, ww=cols, ph=patch, pw=patch)


def unpatchify(patches: torch.Tensor, layout: SampleLayout, patch: int = 16, temporal: int = 4) -> torch.Tensor:
    """One sample's (T'·H'·W', 3072) patches → video (frames, 3, H, W), temporal padding dropped."""
    grid_t, grid_h, grid_w = layout.grid
    video = rearrange(patches, "(tt hh ww) (pt ph pw c) -> (tt pt) c (hh ph) (ww pw)", tt=grid_t, hh=grid_h,
                      ww=grid_w, pt=temporal, ph=patch, pw=patch)
    return video[: layout.frames]


def split_samples(values: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Per-token values (N, ...) → one tensor per sample, in sample order."""
    counts = torch.bincount(batch.sample_ids, minlength=batch.num_samples).tolist()
    return list(values.split(counts))
