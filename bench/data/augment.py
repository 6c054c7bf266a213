"""Batched image augmentation on the training device (supplement B, "data augmentations").

The official CLL configs apply, per image with PIL inside DataLoader workers:

    RandomCrop(S, padding=P) → RandomHorizontalFlip() → ColorJitter(.25, .25, .25) → RandomRotation(2)

(S, P) = (32, 4) on CIFAR and (64, 8) on Tiny-ImageNet. Here the same four transforms run on a whole batch
of float images in [0, 1] on the device the data lives on, in the same order, with each image's parameters
drawn as torchvision draws them:

* crop: top and left offsets uniform in {0, …, 2P} of the zero-padded image;
* flip: with probability 1/2;
* colour jitter: brightness, contrast and saturation factors uniform in [1 − 0.25, 1 + 0.25], applied in a
  random order per image (torchvision's `randperm`); each is torchvision's tensor definition:
  brightness  x ← clamp(b·x),
  contrast    x ← clamp(c·x + (1 − c)·mean(gray(x))),
  saturation  x ← clamp(s·x + (1 − s)·gray(x)),     gray = 0.2989 R + 0.587 G + 0.114 B, clamp to [0, 1];
* rotation: angle uniform in [−2°, 2°] about the image centre, nearest-neighbour sampling, zero fill
  (torchvision's RandomRotation defaults), on torchvision's sampling grid.

All parameters are drawn on the CPU from the torch.Generator the trainer passes, so a seed gives the same
augmentation on every device. The official pipeline rounds to uint8 after each PIL step; here the image stays
float between steps (the same transforms without the intermediate quantisation).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images [B, 3, H, W] → [B, 1, H, W] (torchvision's rgb_to_grayscale weights)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Per image: zero-pad by `padding`, take the H×W window at (top, left), mirror it where `flip`."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=x.device)                      # [B, H]
    cols = left[:, None] + torch.arange(w, device=x.device)                     # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # one gather over the flattened padded image: index row·(W + 2P) + col, the same for every channel
    index = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """factors [B, 3] (brightness, contrast, saturation), order [B, 3] (a permutation of 0, 1, 2 per image).

    Every step is a blend x ← clamp(f·x + (1 − f)·ref) whose reference is 0 (brightness), the mean luma
    (contrast) or the luma image (saturation); step k applies, to each image, the op order[:, k] names.
    """
    shape = (-1, 1, 1, 1)
    f64 = factors.to(torch.float64)
    for k in range(order.shape[1]):
        op = order[:, k]
        f = f64.gather(1, op[:, None]).squeeze(1)
        # 1 − f in float64 before the cast, as torchvision's `alpha=(1.0 - ratio)` on a Python float
        keep, mix = f.to(x.dtype).view(shape), (1.0 - f).to(x.dtype).view(shape)
        luma = gray(x)
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
        # the reference by 0/1 weights: exactly luma, mean or 0 for each image
        is_sat, is_con = (op == SATURATION).to(x.dtype).view(shape), (op == CONTRAST).to(x.dtype).view(shape)
        ref = luma.mul_(is_sat).add_(mean * is_con)
        x = x.mul(keep).add_(ref.mul_(mix)).clamp_(0.0, 1.0)
    return x


def rotation_grid(angle_deg: torch.Tensor, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """torchvision's rotate grid (expand=False, centre of the image) for each angle: [B, H, W, 2].

    The inverse map of a counter-clockwise rotation by a sends output pixel (x, y) (centred coordinates) to
    (cos a·x − sin a·y, sin a·x + cos a·y), normalised by (W/2, H/2) for grid_sample(align_corners=False).
    """
    a = angle_deg.to(torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(-1, 2, 3).to(dtype)
    device = angle_deg.device
    base = torch.empty(1, h, w, 3, dtype=dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=device)
    return base.view(1, h * w, 3).expand(len(a), -1, -1).bmm(scaled).view(-1, h, w, 2)


def rotate(x: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle (degrees): nearest sampling, zero fill."""
    grid = rotation_grid(angle_deg.to(x.device), x.shape[-2], x.shape[-1], x.dtype)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class ImageAugment:
    """RandomCrop(size, padding) → HorizontalFlip → ColorJitter(b, c, s) → RandomRotation(degrees), batched.

    `aug(x, generator)` draws every image's parameters from `generator` (on the CPU) and applies them on
    x's device. `sample` and `apply` are the two halves, so a test can replay the parameters per image.
    """

    def __init__(self, size: int, padding: int, jitter: Sequence[float] = (0.25, 0.25, 0.25),
                 degrees: float = 2.0, flip: bool = True):
        self.size, self.padding = int(size), int(padding)
        self.jitter = tuple(float(j) for j in jitter)
        self.degrees, self.flip = float(degrees), bool(flip)

    def __repr__(self) -> str:
        return (f"ImageAugment(crop={self.size}, padding={self.padding}, flip={self.flip}, "
                f"jitter={self.jitter}, degrees={self.degrees:g})")

    def sample(self, n: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        span = 2 * self.padding + 1
        lo = torch.tensor([max(0.0, 1.0 - j) for j in self.jitter], dtype=torch.float64)
        hi = torch.tensor([1.0 + j for j in self.jitter], dtype=torch.float64)
        return {
            "top": torch.randint(0, span, (n,), generator=generator),
            "left": torch.randint(0, span, (n,), generator=generator),
            "flip": (torch.rand(n, generator=generator) < 0.5) & self.flip,
            "factors": lo + (hi - lo) * torch.rand(n, 3, generator=generator, dtype=torch.float64),
            "order": torch.rand(n, 3, generator=generator).argsort(dim=1),
            "angle": (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * self.degrees,
        }

    def apply(self, x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"{self!r} expects {self.size}×{self.size} images, got {tuple(x.shape[-2:])}")
        dev = x.device
        x = crop_flip(x, p["top"].to(dev), p["left"].to(dev), p["flip"].to(dev), self.padding)
        if any(self.jitter):
            x = color_jitter(x, p["factors"].to(dev), p["order"].to(dev))
        if self.degrees:
            x = rotate(x, p["angle"].to(dev))
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), generator))
