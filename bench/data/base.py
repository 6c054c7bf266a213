"""The in-memory dataset every run trains on.

A `DataBundle` holds whole splits as tensors (images as uint8 NCHW, other data as float), so batches are
sliced and augmented on the training device with no loader workers. `inputs(x)` turns stored values into the
model's data units ([0,1] for images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing; the message names every place looked in and how to fetch it."""


@dataclass
class DataBundle:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, ...]
    #: the input domain (lo, hi) for clamping adversarial/lower-bound search; None means unbounded
    domain: Optional[Tuple[float, float]] = None
    #: divide stored values by this to get data units (255 for uint8 images)
    scale: float = 1.0
    #: batched augmentation: (x in data units, torch.Generator) → x
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    #: named boolean masks over the test split, reported as extra evaluation subsets
    test_subsets: Dict[str, torch.Tensor] = field(default_factory=dict)
    info: Dict[str, object] = field(default_factory=dict)

    def inputs(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = x.to(dtype)
        return x / self.scale if self.scale != 1.0 else x

    def split(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")

    def to(self, device) -> "DataBundle":
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        subsets = {k: m.to(device) for k, m in self.test_subsets.items()}
        return DataBundle(**{**self.__dict__, **moved, "test_subsets": subsets})

    def subset_train(self, n: int, seed: int) -> "DataBundle":
        """A fixed, seeded subset of n training examples (smoke runs on small machines)."""
        if n >= len(self.y_train):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.y_train), generator=g)[:n].sort().values.to(self.y_train.device)
        return DataBundle(**{**self.__dict__, "x_train": self.x_train[idx], "y_train": self.y_train[idx]})
