"""train/losses: each term against an independent formula or library, and its behaviour at the fixed points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from atoken.train.losses.perceptual import PerceptualLosses, gram_matrix
from atoken.train.losses.render import composite_views, viewmats_from_blender
from atoken.train.losses.semantic import caption_matches, distillation_loss, sigmoid_loss
from atoken.train.losses.ssim import ssim


def test_ssim_matches_scikit_image_gaussian_convention():
    generator = np.random.default_rng(0)
    x = generator.random((2, 3, 40, 48))
    y = np.clip(x + generator.normal(0, 0.1, x.shape), 0, 1)
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0)
    for i in range(2):
        reference = structural_similarity(x[i], y[i], channel_axis=0, data_range=1.0, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
        # scikit-image averages over the full image with reflected borders cropped by (win - 1) / 2: the same
        # valid windows as our unpadded convolution.
        assert float(ours[i]) == pytest.approx(reference, abs=1e-6)
    assert torch.allclose(ssim(torch.from_numpy(x), torch.from_numpy(x)), torch.ones(2, dtype=torch.float64))


def test_sigmoid_loss_matches_the_siglip_formula_with_repeated_captions():
    torch.manual_seed(0)
    images, texts = torch.randn(5, 8), torch.randn(5, 8)
    captions = ["cat", "dog", "cat", "shoe", "dog"]
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    loss = sigmoid_loss(images, texts, caption_matches(captions), scale, bias)
    a = images / images.norm(dim=1, keepdim=True)
    b = texts / texts.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if captions[i] == captions[j] else -1.0
            logit = 10.0 * float(a[i] @ b[j]) - 10.0
            expected += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    assert float(loss) == pytest.approx(expected / 5, rel=1e-5)


def test_sigmoid_loss_rewards_aligned_pairs():
    torch.manual_seed(1)
    texts = torch.randn(4, 16)
    matches = caption_matches(["a", "b", "c", "d"])
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-5.0)
    aligned = sigmoid_loss(texts.clone(), texts, matches, scale, bias)
    shuffled = sigmoid_loss(texts[[1, 2, 3, 0]], texts, matches, scale, bias)
    assert aligned < shuffled


def test_distillation_is_zero_when_student_equals_teacher_and_matches_kl():
    torch.manual_seed(2)
    teacher, text = torch.randn(6, 8), torch.randn(3, 8)
    assert float(distillation_loss(teacher.clone(), teacher, text)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(6, 8)
    tau, scale = 2.0, 100.0
    norm = torch.nn.functional.normalize
    p = torch.softmax(scale * norm(teacher, dim=-1) @ norm(text, dim=-1).T / tau, dim=-1).double()
    q = torch.softmax(scale * norm(student, dim=-1) @ norm(text, dim=-1).T / tau, dim=-1).double()
    expected = float((p * (p.log() - q.log())).sum(-1).mean()) * tau**2
    assert float(distillation_loss(student, teacher, text, tau, scale)) == pytest.approx(expected, rel=1e-4)


def test_gram_matrix_is_the_correlation_of_unit_features():
    features = torch.randn(2, 3, 4, 5)
    unit = features / features.norm(dim=1, keepdim=True)
    flat = unit.reshape(2, 3, 20)
    expected = torch.einsum("bcn,bdn->bcd", flat, flat) / 20
    assert torch.allclose(gram_matrix(features), expected, atol=1e-5)
    assert torch.allclose(torch.diagonal(gram_matrix(features), dim1=1, dim2=2).sum(-1), torch.ones(2), atol=1e-5)


def test_perceptual_terms_vanish_on_identical_images_and_grow_with_blur():
    losses = PerceptualLosses(resolution=64)
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    same = losses(images, images)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in same.values())
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    different = losses(images, blurred)
    assert set(different) == {"lpips", "gram", "clip_perceptual"}
    assert all(float(v) > 1e-4 for v in different.values())
    # The render loss asks for LPIPS alone: the same value, and no other term computed.
    only = losses(images, blurred, terms=("lpips",))
    assert set(only) == {"lpips"} and torch.allclose(only["lpips"], different["lpips"])
    reconstruction = blurred.clone().requires_grad_(True)
    sum(losses(images, reconstruction).values()).backward()
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0
    assert set(losses.stand_ins) == {"lpips", "clip_perceptual"}


def test_blender_cameras_become_opencv_viewmats():
    # A Blender camera at +z looking down at the origin: the origin is 2 units ahead (OpenCV +z).
    c2w = torch.eye(4)
    c2w[2, 3] = 2.0
    viewmat = viewmats_from_blender(c2w[None])[0]
    origin = viewmat @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(origin[:3], torch.tensor([0.0, 0.0, 2.0]))
    # Blender's +y (image up) is OpenCV's −y (rows grow downwards).
    up = viewmat @ torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert up[1] < 0


def test_composite_views_over_white():
    rgba = np.zeros((1, 1, 2, 4), dtype=np.uint8)
    rgba[0, 0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 0, 1] = (0, 0, 0, 0)  # transparent
    out = composite_views(rgba)
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out[0, 0, 1], torch.ones(3))
