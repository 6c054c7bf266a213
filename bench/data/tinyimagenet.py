"""Tiny-ImageNet (Le & Yang 2015): 200 classes of 64×64 images, 100,000 for training and the 10,000-image
validation set as the test set (the labelled split; the paper's Table 1 reports on it, as the official CLL
code's `TinyImageNetDataset(mode='val')`).

The standard `tiny-imagenet-200` folder (`wnids.txt`, `train/<wnid>/images/*.JPEG`, `val/images/*.JPEG`,
`val/val_annotations.txt`) is decoded once into an uncompressed uint8 array file
`tiny-imagenet-200-uint8.npz` (NCHW), written next to the folder, or into the user cache when that place is
not writable; later runs read the array file. Labels are the line numbers of `wnids.txt` (the official
`ids.index(nid)`), or the sorted class folders when it is missing; grayscale JPEGs are replicated to RGB.

Augmentation (supplement B): the CIFAR pipeline with random crop 64 and padding 8.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch

from bench.data.augment import ImageAugment
from bench.data.base import DataBundle
from bench.data.cifar import IMAGE_DEFAULTS
from bench.data.root import DatasetFormatError, default_root, find, not_found, read_arrays
from bench.registry import register_dataset

FOLDER = "tiny-imagenet-200"
CACHE = "tiny-imagenet-200-uint8.npz"
SIDE = 64
SHAPE = (3, SIDE, SIDE)
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetFormatError(f"cannot decode {path}: {e}") from None
    if arr.shape != (SIDE, SIDE, 3):
        raise DatasetFormatError(f"{path}: expected a {SIDE}×{SIDE} image, got {arr.shape[1]}×{arr.shape[0]}")
    return arr.transpose(2, 0, 1)


def class_ids(folder: Path) -> List[str]:
    wnids = folder / "wnids.txt"
    if wnids.is_file():
        ids = [line.strip() for line in wnids.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if not ids:
        raise DatasetFormatError(f"{folder}: no classes (wnids.txt or train/<wnid>/ folders)")
    return ids


def _stack(paths: List[Path]) -> np.ndarray:
    x = np.empty((len(paths), *SHAPE), dtype=np.uint8)
    for i, p in enumerate(paths):
        x[i] = _read_image(p)
    return x


def convert_folder(folder: Path) -> Dict[str, np.ndarray]:
    """Decode a tiny-imagenet-200 folder into uint8 NCHW arrays (train, and val as test)."""
    ids = class_ids(folder)
    index = {nid: i for i, nid in enumerate(ids)}
    train_paths, train_labels = [], []
    for nid in ids:
        images = sorted((folder / "train" / nid / "images").glob("*.JPEG"))
        if not images:
            raise DatasetFormatError(f"{folder}: no images in train/{nid}/images")
        train_paths += images
        train_labels += [index[nid]] * len(images)
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetFormatError(f"{folder}: missing val/val_annotations.txt")
    val_paths, val_labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetFormatError(f"{annotations}:{n}: expected '<file> <wnid> ...' with a known wnid")
        val_paths.append(folder / "val" / "images" / fields[0])
        val_labels.append(index[fields[1]])
    return {"x_train": _stack(train_paths), "y_train": np.asarray(train_labels, dtype=np.int64),
            "x_test": _stack(val_paths), "y_test": np.asarray(val_labels, dtype=np.int64),
            "wnids": np.asarray(ids)}


def _write_cache(arrays: Dict[str, np.ndarray], targets: List[Path]) -> Path:
    """Write the array file atomically to the first writable target; returns where it went."""
    errors = []
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return target
        except OSError as e:
            errors.append(f"{target}: {e.strerror or e}")
    raise DatasetFormatError("cannot write the Tiny-ImageNet array file: " + "; ".join(errors))


def read_cache(path: Path) -> Dict[str, np.ndarray]:
    arrays = read_arrays(path, hint="; delete it to convert the folder again")
    for split in ("train", "test"):
        x = arrays.get(f"x_{split}")
        if x is None or x.dtype != np.uint8 or x.shape[1:] != SHAPE or f"y_{split}" not in arrays:
            raise DatasetFormatError(f"{path}: not a Tiny-ImageNet array file; delete it to convert again")
    return arrays


def locate_arrays(cfg: Mapping[str, object]) -> Tuple[Dict[str, np.ndarray], Path]:
    path, looked = find(cfg, [(CACHE, False), (FOLDER, True)])
    if path is None:
        raise not_found("tinyimagenet", looked,
                        f"download {URL} and unzip it into a data root (--data-root, BENCH_DATA or "
                        f"{default_root()})")
    if path.is_file():
        return read_cache(path), path
    folder = path
    # the array file goes next to the folder, or into the user cache when that place is read-only
    targets = [folder.parent / CACHE, default_root() / CACHE]
    for cached in targets:
        if cached.is_file():
            return read_cache(cached), cached
    print(f"lipbench: converting {folder} once into {CACHE} (uint8 arrays) ...", file=sys.stderr)
    arrays = convert_folder(folder)
    where = _write_cache(arrays, targets)
    print(f"lipbench: wrote {where}", file=sys.stderr)
    return arrays, where


@register_dataset("tinyimagenet")
def load_tinyimagenet(cfg, seed: int) -> DataBundle:
    """Tiny-ImageNet: 100,000 training images, the 10,000 validation images as test set, 200 classes."""
    arrays, source = locate_arrays(cfg)
    num_classes = len(arrays["wnids"]) if "wnids" in arrays else 200
    info = {"source": str(source)}
    return DataBundle(
        "tinyimagenet", torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]),
        torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]),
        num_classes=num_classes, input_shape=SHAPE, domain=(0.0, 1.0), scale=255.0,
        augment=ImageAugment(SIDE, 8, jitter=(0.25, 0.25, 0.25), degrees=2.0).configured(cfg.get("augment")),
        info=info)


load_tinyimagenet.input_shape = SHAPE
# The official 8C2F configs run the lower bound in batches of 1000 every 200 epochs; the counts are the same.
load_tinyimagenet.defaults = dict(IMAGE_DEFAULTS)
