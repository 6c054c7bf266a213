"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), as the reference paper trains on them (supplement B).

Pixels are kept as uint8 NCHW tensors and fed to the model in [0, 1] with no mean/std normalisation (the
official configs: ToTensor only, `data_std: [1, 1, 1]`). Training augmentation is supplement B's: random crop
32 with padding 4, horizontal flip, colour jitter 0.25, rotation up to 2° (bench/data/augment.py).

Each root (bench/data/root.py) is searched for, in this order:
1. the torchvision folder (`cifar-10-batches-py`, `cifar-100-python`: pickled batches, rows of 3072 bytes
   R|G|B), fetched through torchvision only when the user asks (`--download`);
2. an npz archive (`cifar10.npz`, `cifar100.npz`) with `x_train`, `y_train`, `x_test`, `y_test` (HWC
   uint8) and optionally `test_lossless` (a bool mask over the test set, reported as `test_lossless`) and
   `class_names`.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import torch

from bench.data.augment import ImageAugment
from bench.data.base import DataBundle
from bench.data.root import DatasetFormatError, download_root, find, not_found, read_arrays
from bench.registry import register_dataset

SPECS = {
    "cifar10": {"folder": "cifar-10-batches-py", "npz": "cifar10.npz", "classes": 10,
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "labels": "labels", "meta": ("batches.meta", "label_names"), "torchvision": "CIFAR10"},
    "cifar100": {"folder": "cifar-100-python", "npz": "cifar100.npz", "classes": 100,
                 "train": ["train"], "test": ["test"],
                 "labels": "fine_labels", "meta": ("meta", "fine_label_names"), "torchvision": "CIFAR100"},
}
SHAPE = (3, 32, 32)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # the archives were pickled by Python 2
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetFormatError(f"cannot read CIFAR batch {path}: {e}") from None


def read_torchvision_folder(folder: Path, name: str) -> Dict[str, np.ndarray]:
    """The pickled batches of a torchvision CIFAR folder → arrays (x as NCHW uint8)."""
    spec = SPECS[name]
    out: Dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for fname in spec[split]:
            batch = _unpickle(folder / fname)
            if "data" not in batch or spec["labels"] not in batch:
                raise DatasetFormatError(f"{folder / fname}: expected keys 'data' and {spec['labels']!r}")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, *SHAPE))
            ys.append(np.asarray(batch[spec["labels"]], dtype=np.int64))
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    meta_file, key = spec["meta"]
    if (folder / meta_file).is_file():
        out["class_names"] = np.asarray(_unpickle(folder / meta_file).get(key, []))
    return out


def read_npz(path: Path) -> Dict[str, np.ndarray]:
    """An npz with x_* as NHWC uint8 → arrays with x as NCHW uint8."""
    arrays = read_arrays(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DatasetFormatError(f"{path}: missing array(s) {', '.join(missing)}")
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
            raise DatasetFormatError(f"{path}: x_{split} must be uint8 of shape (N, 32, 32, 3), "
                                     f"got {x.dtype} {x.shape}")
        arrays[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return arrays


def _download(name: str, cfg: Mapping[str, object]) -> Path:
    import torchvision

    root = download_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        getattr(torchvision.datasets, SPECS[name]["torchvision"])(str(root), train=train, download=True)
    return root / SPECS[name]["folder"]


def locate(name: str, cfg: Mapping[str, object]):
    """("folder" | "npz", path) of the first copy found; downloads when cfg['download'] and none is found."""
    spec = SPECS[name]
    path, looked = find(cfg, [(spec["folder"], True), (spec["npz"], False)])
    if path is not None:
        return ("folder" if path.is_dir() else "npz"), path
    if cfg.get("download"):
        return "folder", _download(name, cfg)
    raise not_found(name, looked,
                    f"fetch it with `bench run ... --dataset {name} --download` (torchvision, into "
                    f"{download_root(cfg)}) or put {spec['npz']} in a data root")


def load_cifar(name: str, cfg: Mapping[str, object]) -> DataBundle:
    spec = SPECS[name]
    kind, path = locate(name, cfg)
    arrays = read_torchvision_folder(path, name) if kind == "folder" else read_npz(path)
    y_all = np.concatenate([arrays["y_train"], arrays["y_test"]])
    if len(y_all) and (y_all.min() < 0 or y_all.max() >= spec["classes"]):
        raise DatasetFormatError(f"{path}: labels must lie in 0..{spec['classes'] - 1}")
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DatasetFormatError(f"{path}: x_{split} and y_{split} differ in length")
    subsets = {}
    if "test_lossless" in arrays:
        mask = np.asarray(arrays["test_lossless"], dtype=bool)
        if mask.shape != arrays["y_test"].shape:
            raise DatasetFormatError(f"{path}: test_lossless must be a bool mask over the test set")
        subsets["lossless"] = torch.from_numpy(mask)
    info = {"source": str(path), "format": kind}
    if "class_names" in arrays and len(arrays["class_names"]) == spec["classes"]:
        info["class_names"] = [str(c) for c in arrays["class_names"]]
    return DataBundle(
        name, torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=spec["classes"], input_shape=SHAPE, domain=(0.0, 1.0), scale=255.0,
        augment=ImageAugment(32, 4, jitter=(0.25, 0.25, 0.25), degrees=2.0).configured(cfg.get("augment")),
        test_subsets=subsets, info=info)


#: Dataset defaults shared by the image datasets. CRA at the paper's three radii (Tables 1–2); training
#: augmentation on (supplement B); evaluation every 10 epochs (a 10k-image certified pass each time; the
#: final evaluation always runs). The empirical lower bound keeps supplement C's 4000 pairs × 1000 Adam
#: steps for full runs; a short run (fewer epochs than its protocol, or a train subset) uses the smaller
#: `lower_bound_*_short` budget instead, and result.json records the counts actually used.
IMAGE_DEFAULTS = {
    "cert_eps": ["36/255", "72/255", "108/255"],
    "augment": True,
    "eval_every": 10,
    "lower_bound_pairs": 4000,
    "lower_bound_steps": 1000,
    "lower_bound_pairs_short": 128,
    "lower_bound_steps_short": 50,
}


@register_dataset("cifar10")
def load_cifar10(cfg, seed: int) -> DataBundle:
    """CIFAR-10: 50,000 training and 10,000 test images, 10 classes (the data does not depend on the seed)."""
    return load_cifar("cifar10", cfg)


@register_dataset("cifar100")
def load_cifar100(cfg, seed: int) -> DataBundle:
    """CIFAR-100: 50,000 training and 10,000 test images, 100 fine classes."""
    return load_cifar("cifar100", cfg)


for _loader in (load_cifar10, load_cifar100):
    _loader.input_shape = SHAPE
    _loader.defaults = dict(IMAGE_DEFAULTS)
