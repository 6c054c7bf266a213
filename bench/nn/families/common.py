"""Building blocks several layer families share: channel padding, the 4×4 sum-pool and the truncation head
(CPL, SLL and Sandwich use them as the official codes do)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
