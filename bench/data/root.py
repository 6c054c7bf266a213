"""Where datasets live, and the one-line error when one is missing.

Roots are searched in this order: the run's `data_root` (`--data-root`), the environment variable
`BENCH_DATA`, then `lipbench` under the user's cache ($XDG_CACHE_HOME, else ~/.cache). Every root that is set
is searched, so a dataset fetched into the user cache is found even when `--data-root` points elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bench.data.base import DatasetNotFoundError

ENV_VAR = "BENCH_DATA"


class DatasetFormatError(DatasetNotFoundError):
    """A dataset file or folder exists but does not hold what its format promises."""


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "lipbench"


def candidate_roots(cfg: Mapping[str, object]) -> List[Tuple[str, Path]]:
    """(where it came from, root) in search order, without duplicates."""
    out: List[Tuple[str, Path]] = []
    if cfg.get("data_root"):
        out.append(("--data-root", Path(str(cfg["data_root"])).expanduser()))
    if os.environ.get(ENV_VAR):
        out.append((ENV_VAR, Path(os.environ[ENV_VAR]).expanduser()))
    out.append(("user cache", default_root()))
    seen, unique = set(), []
    for label, root in out:
        key = str(root.resolve()) if root.exists() else str(root)
        if key not in seen:
            seen.add(key)
            unique.append((label, root))
    return unique


def download_root(cfg: Mapping[str, object]) -> Path:
    """Where a download goes: the first root that is set (--data-root, then BENCH_DATA, then the user cache)."""
    return candidate_roots(cfg)[0][1]


def find(cfg: Mapping[str, object], entries: Sequence[Tuple[str, bool]]) -> Tuple[Optional[Path], List[Path]]:
    """The first existing `root/name` over roots (outer) and (name, is_dir) entries (inner, in order), and
    every path looked at. A root given on the command line therefore wins over the user cache."""
    looked: List[Path] = []
    for _, root in candidate_roots(cfg):
        for name, is_dir in entries:
            path = root / name
            looked.append(path)
            if (path.is_dir() if is_dir else path.is_file()):
                return path, looked
    return None, looked


def not_found(dataset: str, looked: Sequence[Path], how_to_fetch: str) -> DatasetNotFoundError:
    """One line: the dataset, every place looked in, and how to get it."""
    places = ", ".join(str(p) for p in looked)
    return DatasetNotFoundError(f"dataset {dataset!r} not found; looked in: {places}; {how_to_fetch}")


def read_arrays(path: Path, hint: str = "") -> Dict[str, np.ndarray]:
    """Every array of an npz file (no pickled objects); an unreadable file is a one-line DatasetFormatError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e}{hint}") from None
