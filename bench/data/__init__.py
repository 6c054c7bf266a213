"""Datasets (registered by name) and batched on-device augmentation."""
from bench.data import moons  # noqa: F401  (registers "moons")
from bench.data import cifar, tinyimagenet  # noqa: F401  (registers "cifar10", "cifar100", "tinyimagenet")
from bench.data.base import DataBundle, DatasetNotFoundError

__all__ = ["DataBundle", "DatasetNotFoundError"]
