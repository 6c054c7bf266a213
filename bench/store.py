"""Run folders, atomic writes, checkpoints and provenance (`git_commit`).

Layout: <results>/<dataset>/<method>/<arch>/<config-hash>/seed-<k>/ holding
    config.yaml     the resolved config (written first)
    metrics.csv     one row per evaluated epoch
    checkpoint.pt   model, optimizer, scheduler, power iterates, RNG states, epoch (atomic, every epoch)
    checkpoint.prev.pt  a packed member's checkpoint before the last one (until the run finishes)
    result.json     the final metrics (written last, atomically; its presence means the run is finished)
"""
from __future__ import annotations

import csv
import functools
import fcntl
import hashlib
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import yaml

from bench.config import config_hash, config_hashes_accepted

RESULT = "result.json"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
LOCK = ".lock"
RUN_LOG = "run.log"     # the traceback of a run that raised


class RunFailedError(RuntimeError):
    """A run raised inside training or certification: one line for the user, the traceback in its run.log."""


class CorruptRunError(ValueError):
    """A run folder whose files are unreadable, truncated or inconsistent."""


def run_dir(results: os.PathLike, cfg: Mapping[str, object]) -> Path:
    return (Path(results) / str(cfg["dataset"]) / str(cfg["method"]) / str(cfg["arch"]) / config_hash(cfg)
            / f"seed-{cfg['seed']}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_config(folder: Path, cfg: Mapping[str, object]) -> None:
    atomic_write_text(folder / CONFIG, yaml.safe_dump(dict(cfg), sort_keys=True))


def read_config(folder: Path) -> Dict[str, object]:
    try:
        cfg = yaml.safe_load((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CorruptRunError(f"{folder}: unreadable {CONFIG}: {e}") from None
    if not isinstance(cfg, dict):
        raise CorruptRunError(f"{folder}: {CONFIG} is not a mapping")
    return cfg


def write_metrics(folder: Path, rows: List[Mapping[str, object]], rendered: Optional["MetricsText"] = None) -> None:
    """Rewrite metrics.csv atomically from all rows so far (a resumed run never duplicates a row). `rendered`
    keeps the text of the rows written before, so that only new rows are formatted (a run writes the file every
    `checkpoint_every` epochs: formatting all rows each time grows with the square of the epochs)."""
    if not rows:
        return
    rendered = MetricsText() if rendered is None else rendered
    atomic_write_text(Path(folder) / METRICS, rendered.update(rows))


class MetricsText:
    """metrics.csv's text for a growing list of rows: the header is the union of the rows' keys in order of first
    appearance, and a row absent a key leaves its cell empty. Appends the rows added since the last `update`; a
    new key or fewer rows than before (a resume) renders all of them again."""

    def __init__(self):
        self.fields: List[str] = []
        self.count, self.body = 0, ""

    def update(self, rows: List[Mapping[str, object]]) -> str:
        new_keys = [k for row in rows[self.count:] for k in row if k not in self.fields]
        if len(rows) < self.count or new_keys:
            self.fields, self.count, self.body = [], 0, ""
            for row in rows:
                self.fields += [k for k in row if k not in self.fields]
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.fields).writerows(rows[self.count:])
        self.body += buf.getvalue()
        self.count = len(rows)
        head = io.StringIO()
        csv.DictWriter(head, fieldnames=self.fields).writeheader()
        return head.getvalue() + self.body


def read_metrics(folder: Path) -> List[Dict[str, str]]:
    path = Path(folder) / METRICS
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_checkpoint(folder: Path, state: Mapping[str, object], keep_previous: bool = False) -> None:
    """Write checkpoint.pt atomically. `keep_previous`: the checkpoint it replaces stays as checkpoint.prev.pt. A
    pack writes its members' checkpoints one after another, so a pack killed between two of them leaves members one
    checkpoint apart; `roll_back_checkpoint` then brings those ahead back, and every member resumes from one
    epoch in one pack, bit for bit as the pack that was killed would have gone on."""
    folder = Path(folder)
    if keep_previous and (folder / CHECKPOINT).exists():
        tmp = folder / (PREVIOUS_CHECKPOINT + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(folder / CHECKPOINT, tmp)   # a second name for the old file: no copy
        except OSError:                         # a file system without hard links
            atomic_write_bytes(tmp, (folder / CHECKPOINT).read_bytes())
        os.replace(tmp, folder / PREVIOUS_CHECKPOINT)
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(folder / CHECKPOINT, buf.getvalue())


def roll_back_checkpoint(folder: Path) -> None:
    """Make checkpoint.prev.pt the run's checkpoint again, or, without one, start the run afresh (metric rows
    beyond the checkpoint's epoch drop on resume)."""
    folder = Path(folder)
    if (folder / PREVIOUS_CHECKPOINT).exists():
        os.replace(folder / PREVIOUS_CHECKPOINT, folder / CHECKPOINT)
    else:
        (folder / CHECKPOINT).unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location="cpu") -> Dict[str, object]:
    """Load tensors and plain containers only (`weights_only=True`): a pickled object is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means the file cannot be trusted)
        raise CorruptRunError(f"{path}: refused or unreadable checkpoint ({type(e).__name__}: {e})") from None


def checkpoint_epoch(folder: Path, previous: bool = False) -> int:
    """The epoch a run folder's checkpoint (`previous`: checkpoint.prev.pt) was written after (0 without one)."""
    path = Path(folder) / (PREVIOUS_CHECKPOINT if previous else CHECKPOINT)
    return int(load_checkpoint(path)["epoch"]) if path.exists() else 0


def file_sha256(path: Path) -> Optional[str]:
    """sha256 of a file's bytes (None when it does not exist): result.json pins the checkpoint it came from."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_checksum(result: Mapping[str, object]) -> str:
    body = {k: v for k, v in result.items() if k != "checksum"}
    blob = json.dumps(body, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def write_result(folder: Path, result: Dict[str, object]) -> Dict[str, object]:
    """Write result.json last and atomically, sealed with a checksum of its content (hand edits show)."""
    result = {k: v for k, v in result.items() if k != "checksum"}
    result["checksum"] = _payload_checksum(json.loads(json.dumps(result, default=_json_default)))
    write_json(Path(folder) / RESULT, result)
    return result


REQUIRED_RESULT_KEYS = ("method", "arch", "dataset", "seed", "config_hash", "status", "epochs", "K_f", "K_hf",
                        "lower_bound", "tightness", "train_seconds", "device", "torch", "commit", "eval")


def read_result(folder: Path) -> Dict[str, object]:
    """A run's result.json, checked against its config; raises CorruptRunError if anything is off."""
    folder = Path(folder)
    try:
        result = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError) as e:
        raise CorruptRunError(f"{folder}: unreadable {RESULT}: {e}") from None
    if not isinstance(result, dict):
        raise CorruptRunError(f"{folder}: {RESULT} is not a JSON object")
    missing = [k for k in REQUIRED_RESULT_KEYS if k not in result]
    if missing:
        raise CorruptRunError(f"{folder}: {RESULT} lacks {', '.join(missing)}")
    if result.get("checksum") != _payload_checksum(result):
        raise CorruptRunError(f"{folder}: {RESULT} does not match its checksum (edited by hand or damaged)")
    cfg = read_config(folder)
    if result["config_hash"] not in config_hashes_accepted(cfg) or folder.parent.name != result["config_hash"]:
        raise CorruptRunError(f"{folder}: config hash mismatch (config.yaml edited or folder moved)")
    if int(cfg.get("seed", -1)) != int(result["seed"]) or folder.name != f"seed-{result['seed']}":
        raise CorruptRunError(f"{folder}: seed mismatch between folder, config and result")
    return result


def find_runs(results: os.PathLike) -> Iterable[Path]:
    """Every run folder (one holding config.yaml) below `results`."""
    root = Path(results)
    if not root.exists():
        return []
    return sorted(p.parent for p in root.rglob(CONFIG))


def result_or_none(folder: Path) -> Optional[Dict[str, object]]:
    return read_result(folder) if (Path(folder) / RESULT).exists() else None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The checkout's commit (+ "-dirty"), read once per process: the code a run trained with, even when the
    checkout moves on while it trains."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_diverged(folder: Path, cfg: Mapping[str, object], reason: str,
                   train_seconds: Optional[float] = None) -> Dict[str, object]:
    """Record a run that diverged: status `diverged` with the reason, no metrics (never aggregated)."""
    import torch as _torch

    result = {"method": cfg["method"], "arch": cfg["arch"], "dataset": cfg["dataset"], "seed": int(cfg["seed"]),
              "config_hash": config_hash(cfg), "status": "diverged", "reason": reason, "epochs": int(cfg["epochs"]),
              "train_subset": cfg.get("train_subset"), "eval": {}, "K_f": None, "K_hf": None, "lower_bound": None,
              "tightness": None, "train_seconds": None if train_seconds is None else round(train_seconds, 3),
              "device": None, "torch": _torch.__version__, "commit": git_commit()}
    write_config(Path(folder), cfg)
    return write_result(Path(folder), result)


class RunLock:
    """An exclusive lock on a run folder (flock on <folder>/.lock), held while a process trains the run, so
    two launches of one suite never train the same run twice. The OS drops it when the holder dies."""

    def __init__(self, folder: os.PathLike):
        self.path = Path(folder) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def is_running(folder: os.PathLike) -> bool:
    """True while some process holds the run's lock."""
    if not (Path(folder) / LOCK).exists():
        return False
    probe = RunLock(folder)
    if probe.acquire():
        probe.release()
        return False
    return True


RUN_STATES = ("complete", "diverged", "running", "partial", "missing", "corrupt")


def run_state(folder: os.PathLike) -> Tuple[str, str]:
    """(state, detail) of a run folder: complete, diverged, running (its lock is held), partial (interrupted,
    resumable from a checkpoint), missing, or corrupt (unreadable or inconsistent files)."""
    folder = Path(folder)
    if (folder / RESULT).exists():
        try:
            result = read_result(folder)
        except CorruptRunError as e:
            return "corrupt", str(e)
        if result["status"] == "diverged":
            return "diverged", str(result.get("reason", ""))
        return str(result["status"]), ""
    epochs = len(read_metrics(folder)) if (folder / METRICS).exists() else 0
    if is_running(folder):
        return "running", f"epoch {epochs}"
    if (folder / CHECKPOINT).exists():
        return "partial", f"checkpoint after epoch {epochs}"
    return "missing", ""
