"""Batched on-device augmentation against torchvision's definitions, image by image, with the same parameters."""
import itertools

import pytest
import torch
from torchvision.transforms import ColorJitter, InterpolationMode, RandomCrop, RandomRotation
from torchvision.transforms.v2 import functional as TF

from bench.data.augment import ImageAugment, color_jitter, crop_flip, gray, rotate

ADJUST = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}


def images(n=24, side=32, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def params(aug, n, seed=1):
    return aug.sample(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side,padding", [(32, 4), (64, 8)])
def test_crop_and_flip_match_torchvision_exactly(side, padding):
    x = images(12, side)
    p = params(ImageAugment(side, padding), 12)
    out = crop_flip(x, p["top"], p["left"], p["flip"], padding)
    for b in range(len(x)):
        ref = TF.crop(TF.pad(x[b], [padding]), int(p["top"][b]), int(p["left"][b]), side, side)
        if p["flip"][b]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[b], ref)


def test_each_jitter_op_matches_its_torchvision_definition():
    x = images(6)
    for op, fn in ADJUST.items():
        for f in (0.75, 0.9, 1.13, 1.25):
            factors = torch.full((6, 3), f, dtype=torch.float64)
            order = torch.full((6, 1), op)
            out = color_jitter(x, factors, order)
            for b in range(len(x)):
                torch.testing.assert_close(out[b], fn(x[b], f), rtol=0, atol=1e-6)


def test_gray_is_torchvision_luma():
    x = images(4)
    for b in range(4):
        torch.testing.assert_close(gray(x[b:b + 1])[0], TF.rgb_to_grayscale(x[b]), rtol=0, atol=1e-7)


def test_color_jitter_in_random_order_matches_torchvision_chain():
    x = images(24)
    p = params(ImageAugment(32, 4), 24)
    out = color_jitter(x, p["factors"], p["order"])
    for b in range(len(x)):
        ref = x[b]
        for op in p["order"][b].tolist():
            ref = ADJUST[op](ref, float(p["factors"][b, op]))
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("side", [32, 64])
def test_rotation_matches_torchvision_nearest_zero_fill_exactly(side):
    x = images(10, side)
    angles = torch.tensor([-2.0, -1.3, -0.4, 0.0, 0.25, 0.9, 1.7, 2.0, 30.0, -45.0], dtype=torch.float64)
    out = rotate(x, angles)
    for b in range(len(x)):
        ref = TF.rotate(x[b], float(angles[b]), interpolation=InterpolationMode.NEAREST, fill=0)
        assert torch.equal(out[b], ref), float(angles[b])


def test_whole_pipeline_matches_torchvision_applied_per_image():
    """crop → flip → jitter → rotation, the official configs' order, with the sampled parameters replayed."""
    aug = ImageAugment(32, 4)
    x = images(16)
    p = params(aug, 16)
    out = aug.apply(x, p)
    for b in range(len(x)):
        ref = TF.crop(TF.pad(x[b], [4]), int(p["top"][b]), int(p["left"][b]), 32, 32)
        if p["flip"][b]:
            ref = TF.horizontal_flip(ref)
        for op in p["order"][b].tolist():
            ref = ADJUST[op](ref, float(p["factors"][b, op]))
        ref = TF.rotate(ref, float(p["angle"][b]), interpolation=InterpolationMode.NEAREST, fill=0)
        # nearest sampling moves whole pixels, so jitter's 1e-7 rounding stays 1e-7
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-6)


def test_parameters_are_drawn_as_torchvision_draws_them():
    aug = ImageAugment(32, 4)
    p = params(aug, 20_000)
    assert set(p["top"].tolist()) == set(range(9)) == set(p["left"].tolist())   # RandomCrop: 0..2·padding
    assert abs(p["flip"].float().mean().item() - 0.5) < 0.02                    # RandomHorizontalFlip(p=0.5)
    jitter = ColorJitter(0.25, 0.25, 0.25)
    for k, rng in enumerate((jitter.brightness, jitter.contrast, jitter.saturation)):
        assert rng == (0.75, 1.25)
        assert p["factors"][:, k].min() >= rng[0] and p["factors"][:, k].max() <= rng[1]
        assert p["factors"][:, k].min() < 0.76 and p["factors"][:, k].max() > 1.24
    assert {tuple(o) for o in p["order"].tolist()} == set(itertools.permutations(range(3)))
    assert RandomRotation(2).degrees == [-2.0, 2.0]
    assert p["angle"].abs().max() <= 2.0 and p["angle"].min() < -1.9 and p["angle"].max() > 1.9
    assert RandomCrop(32, padding=4).padding == 4


def test_seeded_by_the_generator_and_output_stays_in_range():
    aug = ImageAugment(32, 4)
    x = images(8)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="expects 32"):
        aug(images(2, 64), torch.Generator())
