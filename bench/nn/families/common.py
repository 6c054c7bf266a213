"""Building blocks several layer families share: channel padding, the 4×4 sum-pool and the truncation head
(CPL, SLL and Sandwich use them as the official codes do), and the one head builder every family's network uses
(`make_head`: LLN, an unconstrained linear layer, or the family's own 1-Lipschitz head)."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.bound import NormalizedLinear


class ChannelPad(nn.Module):
    """Zero-pads the channels to C (official `PaddingChannels(mode="zero")`): an isometry."""

    lipschitz_one = True

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))


class SumPool(nn.Module):
    """Non-overlapping 4×4 sums divided by 4 (official `AvgPool2d(4, divisor_override=4)`): 1-Lipschitz,
    since ‖Σ of 16 entries‖ ≤ 4·‖entries‖."""

    lipschitz_one = True

    def forward(self, x):
        return F.avg_pool2d(x, 4, divisor_override=4)


class Truncate(nn.Module):
    """The 1-Lipschitz last layer: the first N coordinates (official `PoolingLinear(agg="trunc")`)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x[:, :self.num_classes]

    def train_bound(self, n_iter: int) -> torch.Tensor:
        return torch.ones(())

    def converge(self, tol: float = 1e-9) -> float:
        return 1.0

    def certified_bound(self) -> torch.Tensor:
        return torch.ones((), dtype=torch.float64)

    power_bound = certified_bound


def truncate_head(in_features: int, num_classes: int) -> Truncate:
    """The truncation head for `in_features` features (CPL's and SLL's "trunc")."""
    if num_classes > in_features:
        raise ValueError(f"truncation needs at least {num_classes} features, got {in_features}")
    return Truncate(num_classes)


class FlattenLinear(nn.Linear):
    """The unconstrained last layer (the reference paper's CLL runs): z = W·flatten(x) + b. Its rows `.weight`
    give the exact pairwise constant ‖W_i − W_j‖ (bench/nn/bound.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)


#: the heads every family offers besides its own 1-Lipschitz ones
SHARED_HEADS = ("lln", "linear")


def make_head(kind: str, in_features: int, num_classes: int,
              own: Mapping[str, Callable[[int, int], nn.Module]], family: str) -> Tuple[nn.Module, bool]:
    """(classifier, last_layer_one_lipschitz) for head `kind`: "lln" (NormalizedLinear, pairwise ‖ŵ_i − ŵ_j‖),
    "linear" (FlattenLinear, pairwise ‖W_i − W_j‖), or one of the family's own 1-Lipschitz heads `own`
    (name → factory(in_features, num_classes): CPL/SLL "trunc", SOC "soc", Sandwich "lin"), certified with √2."""
    if kind in own:
        return own[kind](in_features, num_classes), True
    if kind == "lln":
        return NormalizedLinear(in_features, num_classes), False
    if kind == "linear":
        return FlattenLinear(in_features, num_classes), False
    raise ValueError(f"unknown {family} head {kind!r}; use {', '.join([*own, *SHARED_HEADS])}")


def padded_residual_stack(input_shape: Sequence[int], family: str, channels: int, conv_layer: Callable[[], nn.Module],
                          depth: int, dense_layer: Callable[[int], nn.Module], depth_dense: int) -> Tuple[nn.Sequential, int]:
    """The network layout of the official CPL and SLL codes: zero-pad the input channels to `channels`, `depth`
    conv layers at full resolution, a 4×4 sum-pool, flatten, `depth_dense` dense layers on the flattened
    features. Returns (features, flattened width) for the head."""
    if len(input_shape) != 3:
        raise ValueError(f"the {family} network needs images (C, H, W), got input shape {tuple(input_shape)}")
    c, h, w = input_shape
    if channels < c or h % 4 or w % 4:
        raise ValueError(f"{family} pads {c} channels up to {channels} and sum-pools 4×4: got input "
                         f"{tuple(input_shape)}")
    flat = channels * (h // 4) * (w // 4)
    layers = [ChannelPad(channels)] + [conv_layer() for _ in range(depth)]
    layers += [SumPool(), nn.Flatten()] + [dense_layer(flat) for _ in range(depth_dense)]
    return nn.Sequential(*layers), flat
