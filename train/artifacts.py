"""What a finished stage shows in MLflow: an image reconstruction grid, a video clip (original | decoded) and a
turntable of decoded Gaussians, each made from the first samples of the stage's own training streams."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from atoken.pipeline.tracking import grid_png
from atoken.train.model.tokens import VIDEO, split_samples, unpatchify
from atoken.train.streams import task_batches

TURNTABLE_FRAMES = 12


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] → (..., H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def gif(frames: list[np.ndarray], seconds_per_frame: float = 0.25) -> bytes:
    buffer = io.BytesIO()
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(seconds_per_frame * 1000), loop=0)
    return buffer.getvalue()


def orbit_c2w(radius: float, elevation_degrees: float, frames: int) -> torch.Tensor:
    """(F, 4, 4) cameras circling the z axis (Blender's up) and looking at the origin, OpenGL camera frame."""
    poses = []
    elevation = math.radians(elevation_degrees)
    for index in range(frames):
        azimuth = 2 * math.pi * index / frames
        position = torch.tensor([math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                                 math.sin(elevation)]) * radius
        back = position / position.norm()  # the camera looks down its −z
        right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
        right = right / right.norm()
        up = torch.linalg.cross(back, right)
        pose = torch.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, back, position
        poses.append(pose)
    return torch.stack(poses)


@torch.no_grad()
def log_stage_artifacts(job, model: torch.nn.Module, tasks: dict, samples: int = 8) -> None:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shards = {"image": job.shards.image, "video": job.shards.video, "3d": job.shards.objects}
    for name, task in tasks.items():
        batch, _ = next(task_batches(task, shards[name], job.storage, job.seed))
        batch = batch.to(device)
        if name == "image" and hasattr(batch, "pixels"):
            pixels = batch.pixels[:samples]
            decoded = model(pixels, sample=False)["reconstruction"]
            rows = [list(to_uint8(pixels)), list(to_uint8(decoded))]
            job.tracker.log_bytes(job.run_id, grid_png(rows), f"{job.stage.name}/image_reconstruction.png")
        elif name == "video":
            out = model(batch, sample=False)
            patches = split_samples(out["patches"], batch)
            originals = split_samples(batch.patches, batch)
            for index, layout in enumerate(batch.layouts):
                if layout.modality != VIDEO:
                    continue
                real, fake = (to_uint8(unpatchify(p[index], layout)) for p in (originals, patches))  # (T, H, W, 3)
                frames = [np.concatenate([a, b], axis=1) for a, b in zip(real, fake, strict=True)]
                job.tracker.log_bytes(job.run_id, gif(frames), f"{job.stage.name}/video_reconstruction.gif")
                break
        elif name == "3d":
            from atoken.train.losses.render import render_views

            out = model(batch.packed, sample=False)
            gaussians = out["gaussians"]
            first = torch.bincount(batch.packed.sample_ids)[0]
            mine = {k: v[gaussians["token_index"] < first] for k, v in gaussians.items() if k != "token_index"}
            view = batch.views[0]
            radius = float(view["c2w"][0, :3, 3].norm())
            height, width = view["target"].shape[1:3]
            poses = orbit_c2w(radius, 20.0, TURNTABLE_FRAMES).to(device)
            intrinsics = view["intrinsics"][:1].expand(TURNTABLE_FRAMES, 3, 3)
            rendered = render_views(mine, poses, intrinsics, width, height)  # (F, H, W, 3) in [0, 1]
            frames = list((rendered.clamp(0, 1) * 255).round().byte().cpu().numpy())
            job.tracker.log_bytes(job.run_id, gif(frames), f"{job.stage.name}/gaussian_turntable.gif")
    model.train(was_training)
