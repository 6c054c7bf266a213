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

**Other recipes** (a method's protocol sets `augment` to a mapping of `ImageAugment` arguments that replace the
dataset's, e.g. SLL's `{padding: 4, padding_mode: reflect, jitter: [0.1, [0.5, 2], [0.3, 2], 0.02],
degrees: 0}`; `augment: true` keeps the dataset's pipeline, `false` turns augmentation off):

* `padding_mode: reflect` pads the crop by mirroring (torchvision `RandomCrop(..., padding_mode="reflect")`);
* each `jitter` entry is a number j (brightness, contrast, saturation: factors uniform in [max(0, 1 − j), 1 + j];
  hue: uniform in [−j, j]) or a [lo, hi] pair, as torchvision's `ColorJitter` reads them;
* a fourth entry adds **hue**: the four ops then run in a random order per image (torchvision's `randperm(4)`),
  hue as torchvision's tensor `adjust_hue`: RGB → HSV, h ← (h + f) mod 1, HSV → RGB. The official SLL pipeline
  jitters PIL images, whose hue shift is quantised to multiples of 1/255 (PIL's uint8 HSV) and whose other ops
  round to uint8; here the shift is continuous and the image float throughout.

A three-entry jitter draws exactly what it drew before hue existed (the same generator calls), so runs keep
their augmentation.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
PADDING_MODES = {"constant": "constant", "zeros": "constant", "reflect": "reflect"}


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images [B, 3, H, W] → [B, 1, H, W] (torchvision's rgb_to_grayscale weights)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int, padding_mode: str = "constant") -> torch.Tensor:
    """Per image: pad by `padding` (zeros, or `reflect`), take the H×W window at (top, left), mirror it where
    `flip`."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), mode=PADDING_MODES[padding_mode])
    rows = top[:, None] + torch.arange(h, device=x.device)                      # [B, H]
    cols = left[:, None] + torch.arange(w, device=x.device)                     # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # one gather over the flattened padded image: index row·(W + 2P) + col, the same for every channel
    index = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB images [B, 3, H, W] in [0, 1] with their hue turned by shift[b] (in turns, |shift| ≤ ½): torchvision's
    tensor `adjust_hue` (HSV hexcone model; grey pixels keep h = 0 and s = 0), batched."""
    r, g, b = x.unbind(dim=1)
    v, _ = x.max(dim=1)
    lo, _ = x.min(dim=1)
    delta = v - lo
    grey = delta == 0
    s = torch.where(grey, torch.zeros_like(v), delta / torch.where(grey, torch.ones_like(v), v))
    d = torch.where(grey, torch.ones_like(delta), delta)
    # sector by the channel holding the max, red first, then green (the PIL/torchvision tie order)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + shift.to(x.dtype).view(-1, 1, 1), 1.0)
    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.to(torch.int64).remainder_(6)
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * frac)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - frac))).clamp_(0.0, 1.0)
    # (R, G, B) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q), indices into [v, p, q, t]
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    vpqt = torch.stack((v, p, q, t), dim=1)                        # [B, 4, H, W]
    return vpqt.gather(1, table[:, sector].movedim(0, 1))          # [B, 3, H, W]


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """factors [B, 3] (brightness, contrast, saturation) or [B, 4] (+ hue), order [B, 3] or [B, 4] (a permutation
    of the op indices per image).

    Brightness, contrast and saturation are blends x ← clamp(f·x + (1 − f)·ref) whose reference is 0, the mean
    luma or the luma image; hue is `shift_hue`. Step k applies, to each image, the op order[:, k] names.
    """
    shape = (-1, 1, 1, 1)
    f64 = factors.to(torch.float64)
    for k in range(order.shape[1]):
        op = order[:, k]
        f = f64.gather(1, op[:, None]).squeeze(1)
        has_hue = factors.shape[1] > HUE        # a static shape test: no host sync on the device
        if has_hue:
            hue_op = op == HUE
            is_hue = hue_op & (f != 0)              # a zero shift is the identity (torchvision skips hue=0)
            hued = shift_hue(x, torch.where(is_hue, f, torch.zeros_like(f)))
            f = torch.where(hue_op, torch.ones_like(f), f)   # the blend below leaves these images as they are
        # 1 − f in float64 before the cast, as torchvision's `alpha=(1.0 - ratio)` on a Python float
        keep, mix = f.to(x.dtype).view(shape), (1.0 - f).to(x.dtype).view(shape)
        luma = gray(x)
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
        # the reference by 0/1 weights: exactly luma, mean or 0 for each image
        is_sat, is_con = (op == SATURATION).to(x.dtype).view(shape), (op == CONTRAST).to(x.dtype).view(shape)
        ref = luma.mul_(is_sat).add_(mean * is_con)
        x = x.mul(keep).add_(ref.mul_(mix)).clamp_(0.0, 1.0)
        if has_hue:
            x = torch.where(is_hue.view(shape), hued, x)
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


JitterEntry = Union[float, Sequence[float]]


def jitter_ranges(jitter: Sequence[JitterEntry]) -> List[Tuple[float, float]]:
    """(lo, hi) of each jitter factor as torchvision's `ColorJitter` reads its arguments: a number j gives
    [max(0, 1 − j), 1 + j] (brightness, contrast, saturation) or [−j, j] (hue); a pair is the range itself."""
    if not 0 < len(jitter) <= 4:
        raise ValueError(f"jitter takes 1 to 4 entries (brightness, contrast, saturation, hue), got {jitter!r}")
    out = []
    for k, entry in enumerate(jitter):
        if isinstance(entry, (int, float)):
            j = float(entry)
            if j < 0:
                raise ValueError(f"jitter entry {k} must be non-negative, got {j}")
            lo, hi = (-j, j) if k == HUE else (max(0.0, 1.0 - j), 1.0 + j)
        else:
            lo, hi = (float(v) for v in entry)
        if lo > hi or (k == HUE and not -0.5 <= lo <= hi <= 0.5) or (k != HUE and lo < 0):
            raise ValueError(f"jitter entry {k}: invalid range [{lo}, {hi}]")
        out.append((lo, hi))
    return out


class ImageAugment:
    """RandomCrop(size, padding, padding_mode) → HorizontalFlip → ColorJitter(b, c, s[, h]) →
    RandomRotation(degrees), batched.

    `aug(x, generator)` draws every image's parameters from `generator` (on the CPU) and applies them on
    x's device. `sample` and `apply` are the two halves, so a test can replay the parameters per image.
    """

    #: the arguments a config's `augment` mapping may set (`configured`)
    OPTIONS = ("padding", "padding_mode", "jitter", "degrees", "flip")

    def __init__(self, size: int, padding: int, jitter: Sequence[JitterEntry] = (0.25, 0.25, 0.25),
                 degrees: float = 2.0, flip: bool = True, padding_mode: str = "constant"):
        self.size, self.padding = int(size), int(padding)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {padding_mode!r}; use one of {sorted(PADDING_MODES)}")
        self.padding_mode = PADDING_MODES[padding_mode]
        self.jitter = tuple(float(j) if isinstance(j, (int, float)) else tuple(float(v) for v in j) for j in jitter)
        self.ranges = jitter_ranges(self.jitter)
        neutral = [(0.0, 0.0) if k == HUE else (1.0, 1.0) for k in range(len(self.ranges))]
        self.jitters = self.ranges != neutral
        self.degrees, self.flip = float(degrees), bool(flip)

    def __repr__(self) -> str:
        pad = "" if self.padding_mode == "constant" else f", padding_mode={self.padding_mode}"
        return (f"ImageAugment(crop={self.size}, padding={self.padding}{pad}, flip={self.flip}, "
                f"jitter={self.jitter}, degrees={self.degrees:g})")

    def configured(self, setting: Optional[Union[bool, Mapping[str, object]]]) -> "ImageAugment":
        """This pipeline with a config's `augment` mapping applied (its keys replace these arguments); itself
        for true/false/None (the trainer reads falsy as "off")."""
        if not isinstance(setting, Mapping):
            return self
        unknown = sorted(set(setting) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"unknown augment option(s) {unknown}; use {list(self.OPTIONS)}")
        args = {"padding": self.padding, "padding_mode": self.padding_mode, "jitter": self.jitter,
                "degrees": self.degrees, "flip": self.flip, **dict(setting)}
        return ImageAugment(self.size, **args)

    def sample(self, n: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        span = 2 * self.padding + 1
        lo = torch.tensor([r[0] for r in self.ranges], dtype=torch.float64)
        hi = torch.tensor([r[1] for r in self.ranges], dtype=torch.float64)
        k = len(self.ranges)
        return {
            "top": torch.randint(0, span, (n,), generator=generator),
            "left": torch.randint(0, span, (n,), generator=generator),
            "flip": (torch.rand(n, generator=generator) < 0.5) & self.flip,
            "factors": lo + (hi - lo) * torch.rand(n, k, generator=generator, dtype=torch.float64),
            "order": torch.rand(n, k, generator=generator).argsort(dim=1),
            "angle": (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * self.degrees,
        }

    def apply(self, x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"{self!r} expects {self.size}×{self.size} images, got {tuple(x.shape[-2:])}")
        dev = x.device
        x = crop_flip(x, p["top"].to(dev), p["left"].to(dev), p["flip"].to(dev), self.padding, self.padding_mode)
        if self.jitters:
            x = color_jitter(x, p["factors"].to(dev), p["order"].to(dev))
        if self.degrees:
            x = rotate(x, p["angle"].to(dev))
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), generator))
