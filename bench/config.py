"""Run configuration: defaults, merging, validation, hashing; suites read with safe YAML.

A run's config is one flat mapping. It is resolved in this order, later entries winning:

    engine defaults ← dataset defaults ← method hyperparameters ← method's recipe for the dataset
                    ← its recipe for the dataset and the arch's family ("cifar10@lipconv")
                    ← suite (defaults, then cell) ← command line (--set key=value)

Keys keep the paper's names where it has them (`eps`, `p`, `lam`, `delta`). Unknown keys are an error with a
did-you-mean, so a typo never silently runs the default.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import yaml

from bench.registry import ARCHS, DATASETS, METHODS, UnknownNameError


class ConfigError(ValueError):
    """A malformed or invalid configuration (reported as a one-line CLI error)."""


ENGINE_DEFAULTS: Dict[str, object] = {
    "epochs": 100,
    "batch_size": 128,
    "optimizer": "adam",          # adam | adamw | sgd
    "lr": 1e-3,
    "weight_decay": 0.0,
    "momentum": 0.9,              # sgd only
    "betas": None,                # Adam/AdamW (β₁, β₂); None: torch's (0.9, 0.999). SLL's recipes: (0.5, 0.9)
    "lr_schedule": "step",        # see bench/optim.py
    "lr_milestones": [],          # epochs of the protocol where lr is multiplied by lr_gamma
    "lr_gamma": 0.1,
    "lr_end": None,               # lr_schedule exp: the final lr
    "lr_more": None,              # lr_schedule exp: epochs (of the protocol) past E/2 before the decay starts
    "protocol_epochs": None,      # the epoch count the milestones refer to; shorter runs scale them
    "power_iter": 5,              # power-iteration steps per training step (supplement B)
    "converge_tol": 1e-9,         # relative tolerance of the epoch-end convergence
    "cert_eps": ["eps"],          # radii CRA is reported at; "eps" means the training ε
    "certify_dtype": "float32",   # float32 | float64: precision of the certifying forward pass
    "eval_every": 1,              # epochs between evaluations logged to metrics.csv
    "eval_tail": None,            # also evaluate the test split at each of the last N epochs (None: off)
    "profile": None,              # a method's named set of config values, e.g. "official" (Method.profiles)
    "amp": None,                  # None | bf16: autocast of the training forward only (bounds, convergence and
                                  # certification stay float32/float64 with TF32 off)
    "compile": None,              # true: torch.compile the network's training forward
    "budget": None,               # training wall clock ("2h", "90m", seconds): epochs derived from the step time
    "lower_bound_pairs": 4000,    # supplement C
    "lower_bound_steps": 1000,
    "lower_bound_lr": 3e-4,
    "train_subset": None,         # train on a fixed, seeded subset of N examples (smoke runs)
    "eval_points_short": None,    # a short run certifies only the first N test points (None: all)
    "data_seed": None,            # None: the run's seed
    "normalize": None,            # None or [mean, std] per channel; 1/min(std) enters K
    "augment": False,
    "drop_last": True,
    "chance_patience": 10,        # epochs at chance accuracy before a run is stopped as diverged (0: off)
    "chance_margin": 0.02,        # "at chance" means accuracy ≤ 1/N + margin·(1 − 1/N)
    "chance_min_steps": 1000,     # ... and the streak must also span this many optimizer steps
    "chance_min_fraction": 0.25,  # ... and this fraction of the run's steps
    # execution only: not part of the config hash
    "device": "auto",
    "threads": None,
    "eval_batch": 4096,
    "checkpoint_every": 1,
    "sync_every": 50,             # steps between host syncs for the non-finite-loss check
    "pack_compile": "auto",       # a pack's step under torch.compile: auto (packs of >= 5,000 steps) | true | false
    "data_root": None,            # where datasets live (--data-root, then BENCH_DATA, then the user cache)
    "download": False,            # fetch a missing dataset through torchvision when the user asks
}
EXECUTION_KEYS = {"device", "threads", "eval_batch", "checkpoint_every", "data_root", "download", "sync_every",
                  "pack_compile"}
NAME_KEYS = ("method", "arch", "dataset")
SUITE_KEYS = {"name", "description", "seeds", "defaults", "cells", "grid", "paper", "table"}


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def known_keys(method: str, dataset: str) -> set:
    m = METHODS.get(method)
    d = DATASETS.get(dataset)
    return set(ENGINE_DEFAULTS) | set(getattr(d, "defaults", {})) | set(m.hparams) | set(NAME_KEYS)


def data_kind(input_shape) -> str:
    """"image" for (C, H, W) inputs, "vector" for flat ones."""
    return "image" if len(tuple(input_shape)) == 3 else "vector"


def resolve(spec: Mapping[str, object]) -> Dict[str, object]:
    """Resolve a run spec (method, arch, dataset and overrides) into the full config. Validates names/keys.
    Without a dataset the architecture's default one is used; an architecture and a dataset of different kinds
    of data (images, vectors) are refused here, before anything is built or written."""
    for key in ("method", "arch"):
        if not spec.get(key):
            raise ConfigError(f"missing {key!r}: a run needs a method, an arch and a dataset")
    try:
        method = METHODS.get(str(spec["method"]))
        # a method may give a short name a meaning of its own (e.g. `--arch xl` with CPL means CPL-XL)
        spec = {**spec, "arch": getattr(method, "arch_aliases", {}).get(str(spec["arch"]), str(spec["arch"]))}
        arch = ARCHS.get(str(spec["arch"]))
        if not spec.get("dataset"):
            spec = {**spec, "dataset": getattr(arch, "default_dataset", None)}
            if not spec["dataset"]:
                raise ConfigError(f"missing 'dataset': architecture {spec['arch']!r} names no default dataset")
        dataset = DATASETS.get(str(spec["dataset"]))
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    takes, gives = getattr(arch, "data", None), getattr(dataset, "input_shape", None)
    if takes and gives is not None and takes != data_kind(gives):
        raise ConfigError(f"architecture {spec['arch']!r} takes {takes}s but dataset {spec['dataset']!r} gives "
                          f"{data_kind(gives)}s (its default dataset is {getattr(arch, 'default_dataset', '?')})")
    families = getattr(method, "families", None)
    if families and getattr(arch, "family", None) not in families:
        raise ConfigError(f"method {spec['method']!r} trains only {', '.join(families)} architectures "
                          f"(e.g. {', '.join(sorted(method.arch_aliases)) or '?'}), not {spec['arch']!r}")
    known = known_keys(spec["method"], spec["dataset"])
    unknown = [k for k in spec if k not in known]
    if unknown:
        raise ConfigError("unknown config key" + ("s " if len(unknown) > 1 else " ") +
                          ", ".join(f"{k!r}{_did_you_mean(k, known)}" for k in unknown))
    cfg: Dict[str, object] = copy.deepcopy(ENGINE_DEFAULTS)
    cfg.update(copy.deepcopy(getattr(dataset, "defaults", {})))
    cfg.update(copy.deepcopy(method.hparams))
    cfg.update(copy.deepcopy(method.protocols.get(str(spec["dataset"]), {})))
    # a recipe for one architecture family on a dataset ("cifar10@lipconv") refines the dataset's recipe
    family = getattr(ARCHS.get(str(spec["arch"])), "family", None)
    if family:
        cfg.update(copy.deepcopy(method.protocols.get(f"{spec['dataset']}@{family}", {})))
    profile = spec.get("profile")
    if profile is not None:
        cfg.update(profile_values(method, str(spec["method"]), str(profile), str(spec["dataset"]), family))
    cfg.update(copy.deepcopy(dict(spec)))
    if cfg.get("budget") is not None:
        budget_seconds(cfg["budget"])   # checked here, before anything is written
    if cfg.get("amp") not in (None, "bf16"):
        raise ConfigError(f"amp must be bf16 or left unset, got {cfg['amp']!r}")
    if cfg.get("pack_compile") not in ("auto", True, False):
        raise ConfigError(f"pack_compile must be auto, true or false, got {cfg['pack_compile']!r}")
    return cfg


def profile_values(method, method_name: str, profile: str, dataset: str,
                   family: Optional[str] = None) -> Dict[str, object]:
    """A method's profile (`Method.profiles[name]`): config values keyed "*" (every run), by dataset (the plain,
    family-less architectures that dataset's recipe is for) and by "<dataset>@<family>" (as the protocols), applied
    over the protocol and under the run's own keys. A profile is only ordinary options: each difference it
    switches is a key with its own default. A profile with nothing for this dataset and family is an error, so
    no run is labelled with a profile it does not follow."""
    profiles = getattr(method, "profiles", {}) or {}
    if profile not in profiles:
        raise ConfigError(f"method {method_name!r} has no profile {profile!r}"
                          + (f"; known: {', '.join(sorted(profiles))}" if profiles else " (it has none)"))
    table = profiles[profile]
    specific = f"{dataset}@{family}" if family else dataset
    if "*" not in table and specific not in table:
        raise ConfigError(f"method {method_name!r}'s profile {profile!r} has no values for {specific} "
                          f"(it covers {', '.join(sorted(table))})")
    out: Dict[str, object] = copy.deepcopy(table.get("*", {}))
    out.update(copy.deepcopy(table.get(specific, {})))
    return out


_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def budget_seconds(value) -> float:
    """A training budget in seconds: a number of seconds, or a string with a unit ("2h", "90m", "1.5d", "300s")."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            m = re.fullmatch(r"\s*([0-9.]+(?:e[-+]?[0-9]+)?)\s*(s|m|min|h|d)?\s*", str(value), re.IGNORECASE)
            if m is None:
                raise ValueError
            seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    except ValueError:
        raise ConfigError(f"budget must be seconds or a duration such as 2h, 90m or 300s, got {value!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"budget must be a positive, finite duration, got {value!r}")
    return seconds


def is_short_run(cfg: Mapping[str, object]) -> bool:
    """Fewer epochs than the protocol, or a training subset: a smoke run, never presented as a reproduction.
    Such runs use the `*_short` budgets where a dataset or method sets them."""
    proto = cfg.get("protocol_epochs")
    if cfg.get("budget") is not None:   # its epochs are what the budget buys: the same in training and audit
        return bool(cfg.get("train_subset"))
    return bool(cfg.get("train_subset")) or bool(proto and int(cfg["epochs"]) < int(proto))


def config_hash(cfg: Mapping[str, object]) -> str:
    """A short hash of everything that changes results (seed and execution keys excluded). Keys left at None are
    left out, so a new option whose default is None (off) keeps every existing run's hash."""
    return _hash({k: v for k, v in cfg.items() if k not in EXECUTION_KEYS and k != "seed" and v is not None})


def config_hashes_accepted(cfg: Mapping[str, object]) -> set:
    """The hashes a stored config.yaml may carry: today's, and the earlier scheme that hashed None values too, so
    run folders written before the change still read as intact."""
    return {config_hash(cfg), _hash({k: v for k, v in cfg.items() if k not in EXECUTION_KEYS and k != "seed"})}


def _hash(semantic: Mapping[str, object]) -> str:
    blob = json.dumps(semantic, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class _NumberLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-6` (no dot) is a string: this loader reads it as the float a user means,
    in `--set` values and suite files alike (so `lam=1e-6` and `lam=1.0e-6` are the same config)."""


_NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str):
    """YAML with exponent numbers read as floats (`_NumberLoader`)."""
    return yaml.load(text, Loader=_NumberLoader)


def parse_set(items: Optional[List[str]]) -> Dict[str, object]:
    """`--set key=value` pairs; values are read as YAML scalars/lists (0.5, 1e-6, [400, 600], 36/255)."""
    out: Dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = read_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"cannot read the value of --set {key}={raw!r}") from None
        if isinstance(value, str) and value.strip().lower() in {"none", "null"}:
            value = None
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------------------
SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


def suite_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} and p.exists():
        return p
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in SUITES_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown suite {name_or_path!r}{_did_you_mean(str(name_or_path), known)}; "
                      f"known: {', '.join(known)}")


def list_suites() -> List[str]:
    return sorted(q.stem for q in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str) -> Dict[str, object]:
    path = suite_path(name_or_path)
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite must be a YAML mapping")
    unknown = [k for k in data if k not in SUITE_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown suite key(s) " +
                          ", ".join(f"{k!r}{_did_you_mean(k, SUITE_KEYS)}" for k in unknown))
    data.setdefault("name", path.stem)
    data["_path"] = str(path)
    return data


def suite_runs(suite: Mapping[str, object], overrides: Optional[Mapping[str, object]] = None) -> List[Dict]:
    """Expand a suite into resolved run configs (one per cell × grid point × seed)."""
    base = dict(suite.get("defaults") or {})
    cells = suite.get("cells") or [{}]
    grid = suite.get("grid") or {}
    if not isinstance(cells, list) or not isinstance(grid, dict):
        raise ConfigError(f"suite {suite.get('name')!r}: 'cells' must be a list and 'grid' a mapping")
    seeds = suite.get("seeds", 1)
    seed_list = list(range(1, int(seeds) + 1)) if isinstance(seeds, int) else [int(s) for s in seeds]
    runs = []
    keys = list(grid)
    for cell in cells:
        for values in itertools.product(*(grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys)):
            spec = {**base, **dict(zip(keys, values)), **(cell or {}), **(overrides or {})}
            seeds_here = spec.pop("seeds", None)
            cfg = resolve(spec)
            for seed in (seed_list if seeds_here is None else list(range(1, int(seeds_here) + 1))):
                runs.append({**cfg, "seed": seed})
    return runs
