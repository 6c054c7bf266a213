"""Losses shared by several methods (a method file never imports another).

**Offset cross-entropy** (AOL, Prach & Lampert ECCV 2022; the certified losses of SLL and LBDN, official
`LossXent` / `Xent`):

    ℓ(z, y) = t · CE((z − u·onehot(y)) / t, y),   u = 3√2/2 ≈ 2.121 (the offset), t = 0.25 (the temperature).

Subtracting u from the true logit asks for a margin of u before the loss saturates; √2·ε·L is the margin a
1-Lipschitz net needs at radius ε, so u = 3√2/2 aims at ε = 1.5. It is CLL's loss with a fixed temperature and
no calibration (reference paper, supplement D).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.method import Method

OFFSET_U = 1.5 * math.sqrt(2.0)
TEMPERATURE_T = 0.25


def offset_cross_entropy(logits: torch.Tensor, y: torch.Tensor, offset: float = OFFSET_U,
                         temperature: float = TEMPERATURE_T) -> torch.Tensor:
    """t · CE((z − u·onehot(y))/t, y), averaged over the batch."""
    shifted = logits - offset * F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return temperature * F.cross_entropy(shifted / temperature, y)


class OffsetCrossEntropyMethod(Method):
    """A method whose loss is the offset cross-entropy (SLL, LBDN): hyperparameters `offset` (u) and
    `temperature` (t). Subclasses add their recipes. No scalars are logged (a float() per step would sync the
    device; the engine logs the loss)."""

    hparams = {"offset": OFFSET_U, "temperature": TEMPERATURE_T}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.offset = float(cfg["offset"])
        self.temperature = float(cfg["temperature"])

    def loss(self, logits, y, bound, progress):
        return offset_cross_entropy(logits, y, self.offset, self.temperature), {}
