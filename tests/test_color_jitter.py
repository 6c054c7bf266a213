"""The four-op ColorJitter (with hue) and the reflect-padded crop of bench/data/augment.py against torchvision:
image by image with replayed parameters, and in distribution against torchvision's own per-image draws."""
import itertools

import pytest
import torch
from torchvision.transforms import ColorJitter, RandomCrop
from torchvision.transforms.v2 import functional as TF

from bench.data.augment import ImageAugment, color_jitter, crop_flip, jitter_ranges, shift_hue

SLL = {"padding": 4, "padding_mode": "reflect", "jitter": [0.1, [0.5, 2.0], [0.3, 2.0], 0.02], "degrees": 0.0}
ADJUST = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}


def images(n, side=32, seed=0):
    """Smooth colourful images with some pure greys and saturated pixels (HSV edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side // 4, side // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    x[:, :, :2, :2] = x[:, :1, :2, :2]      # grey corner: max = min
    x[:, 0, -2:, -2:] = 1.0                  # saturated red corner
    return x.clamp(0, 1)


@pytest.mark.parametrize("shift", [-0.5, -0.02, -0.013, 0.0071, 0.02, 0.25, 0.5])
def test_hue_matches_torchvision(shift):
    x = images(6)
    out = shift_hue(x, torch.full((6,), shift, dtype=torch.float64))
    for b in range(len(x)):
        torch.testing.assert_close(out[b], TF.adjust_hue(x[b], shift), rtol=0, atol=2e-6)


def test_four_ops_in_random_order_match_torchvision_chain():
    aug = ImageAugment(32, 8).configured(SLL)
    x = images(48)
    p = aug.sample(48, torch.Generator().manual_seed(1))
    assert p["factors"].shape == (48, 4) and p["order"].shape == (48, 4)
    out = color_jitter(x, p["factors"], p["order"])
    for b in range(len(x)):
        ref = x[b]
        for op in p["order"][b].tolist():
            ref = ADJUST[op](ref, float(p["factors"][b, op]))
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


def test_neutral_factors_are_the_identity():
    x = images(8)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1]):
        factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 8, dtype=torch.float64)
        assert torch.equal(color_jitter(x, factors, torch.tensor([order] * 8)), x)
    aug = ImageAugment(32, 0, jitter=(0.0, 0.0, 0.0, 0.0), degrees=0.0, flip=False)
    assert not aug.jitters
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), x)


def test_ranges_and_draws_are_torchvision_s():
    cj = ColorJitter(brightness=0.1, contrast=(0.5, 2.0), saturation=(0.3, 2.0), hue=0.02)
    aug = ImageAugment(32, 4).configured(SLL)
    assert aug.ranges == [tuple(cj.brightness), tuple(cj.contrast), tuple(cj.saturation), tuple(cj.hue)]
    p = aug.sample(20_000, torch.Generator().manual_seed(2))
    for k, (lo, hi) in enumerate(aug.ranges):
        f = p["factors"][:, k]
        assert f.min() >= lo and f.max() <= hi
        assert abs(float(f.mean()) - (lo + hi) / 2) < 0.01 * (hi - lo)            # uniform
        assert abs(float(f.std()) - (hi - lo) / 12 ** 0.5) < 0.01 * (hi - lo)
    orders = [tuple(o) for o in p["order"].tolist()]
    assert set(orders) == set(itertools.permutations(range(4)))                    # randperm(4)
    assert max(orders.count(o) for o in set(orders)) < 20_000 / 24 * 1.2
    assert set(p["top"].tolist()) == set(range(9))
    with pytest.raises(ValueError):
        jitter_ranges([0.1, 0.1, 0.1, 0.6])    # torchvision: hue within [−0.5, 0.5]
    with pytest.raises(ValueError, match="unknown augment option"):
        ImageAugment(32, 4).configured({"hue": 0.02})


def per_image_stats(x, source=None):
    """Per-image brightness, contrast and colourfulness (mean, std, mean channel spread), a colour balance and,
    given the source images, the hue turn (median over coloured pixels of the wrapped hue difference, computed
    by matplotlib: the other three ops keep the hue, so this is the drawn hue factor)."""
    spread = x.max(dim=1).values - x.min(dim=1).values
    stats = [x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), spread.mean(dim=(1, 2)),
             x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))]
    if source is not None:
        from matplotlib.colors import rgb_to_hsv
        h_out, h_in = (rgb_to_hsv(y.permute(0, 2, 3, 1).double().numpy()) for y in (x, source))
        turn = torch.from_numpy((h_out[..., 0] - h_in[..., 0] + 0.5) % 1.0 - 0.5)
        coloured = torch.from_numpy((h_out[..., 1] > 0.2) & (h_in[..., 1] > 0.2) & (h_out[..., 2] < 0.99))
        stats.append(torch.stack([t[m].median() for t, m in zip(turn, coloured)]).to(x.dtype))
    return torch.stack(stats, dim=1)


def ks_statistic(a, b):
    """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b|."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b.sort().values, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def test_distribution_matches_torchvision_color_jitter_per_image():
    """Per-image statistics of our batched jitter and of torchvision's ColorJitter (its own draws, image by
    image) on the same 600 images: two-sample KS below the α = 0.001 critical value 1.95·√(2/n), means within
    4 standard errors."""
    n = 600
    x = images(n, seed=3)
    cj = ColorJitter(brightness=0.1, contrast=(0.5, 2.0), saturation=(0.3, 2.0), hue=0.02)
    torch.manual_seed(4)
    ref = torch.stack([cj(img) for img in x])
    aug = ImageAugment(32, 4).configured(SLL)
    p = aug.sample(n, torch.Generator().manual_seed(5))
    ours = color_jitter(x, p["factors"], p["order"])
    a, b = per_image_stats(ours, x).double(), per_image_stats(ref, x).double()
    se = (a.var(0) / n + b.var(0) / n).sqrt()
    assert bool(((a.mean(0) - b.mean(0)).abs() <= 4 * se).all()), (a.mean(0), b.mean(0), se)
    assert float(a[:, 4].abs().max()) <= 0.0201 and float(a[:, 4].std()) == pytest.approx(0.04 / 12 ** 0.5, rel=0.1)
    critical = 1.95 * (2 / n) ** 0.5
    for k in range(a.shape[1]):
        assert ks_statistic(a[:, k], b[:, k]) < critical, k
    # and the jitter does something: its spread of per-image statistics is far above the input's
    assert float(a[:, 1].std()) > 1.5 * float(per_image_stats(x)[:, 1].double().std())
    assert ks_statistic(a[:, 1], per_image_stats(x)[:, 1].double()) > critical


def test_reflect_crop_matches_torchvision_exactly():
    x = images(12)
    aug = ImageAugment(32, 4).configured(SLL)
    p = aug.sample(12, torch.Generator().manual_seed(6))
    out = crop_flip(x, p["top"], p["left"], p["flip"], 4, "reflect")
    for b in range(len(x)):
        ref = TF.crop(TF.pad(x[b], [4], padding_mode="reflect"), int(p["top"][b]), int(p["left"][b]), 32, 32)
        if p["flip"][b]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[b], ref)
    assert RandomCrop(32, padding=4, padding_mode="reflect").padding_mode == "reflect"


def test_whole_sll_pipeline_replayed_and_seeded():
    aug = ImageAugment(64, 8).configured(SLL)      # Tiny-ImageNet: the official crop keeps padding 4
    assert (aug.size, aug.padding, aug.degrees) == (64, 4, 0.0)
    x = images(6, side=64)
    p = aug.sample(6, torch.Generator().manual_seed(7))
    out = aug.apply(x, p)
    for b in range(len(x)):
        ref = TF.crop(TF.pad(x[b], [4], padding_mode="reflect"), int(p["top"][b]), int(p["left"][b]), 64, 64)
        if p["flip"][b]:
            ref = TF.horizontal_flip(ref)
        for op in p["order"][b].tolist():
            ref = ADJUST[op](ref, float(p["factors"][b, op]))
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(aug(x, g1), aug(x, g2))
    assert ImageAugment(32, 4).configured(True).jitter == (0.25, 0.25, 0.25)
