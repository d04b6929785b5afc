"""Pixel reconstruction terms (paper §3.3). The curriculum issue adds LPIPS, Gram and semantics."""

from __future__ import annotations

import torch

# The paper's fixed KL weight (1e-8) is for a transformer latent of a different scale; the config
# issue will move these weights into the config with the curriculum.
LOSS_WEIGHTS = {"l1": 1.0, "kl": 1e-8}


def reconstruction_losses(
    pixels: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor
) -> dict[str, torch.Tensor]:
    l1 = (reconstruction - pixels).abs().mean()
    # KL(N(mean, var) || N(0, 1)) per latent element, averaged
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return {"l1": l1, "kl": kl}


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float] = LOSS_WEIGHTS) -> torch.Tensor:
    return sum(weights[name] * value for name, value in terms.items())


def packed_reconstruction_losses(batch, patches: torch.Tensor, mean: torch.Tensor,
                                 logvar: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 over the real pixels of a packed batch: an image's patch is one frame plus three frames of zero
    padding, which the decoder need not reproduce (spec: images are zero-padded to 4 frames)."""
    from atoken.train.model.tokens import IMAGE

    error = (patches - batch.patches).abs()  # (N, 3072)
    frame_values = batch.patches.shape[1] // 4
    real = torch.ones_like(error, dtype=torch.bool)
    real[batch.modality_mask(IMAGE), frame_values:] = False
    l1 = error[real].mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return {"l1": l1, "kl": kl}
