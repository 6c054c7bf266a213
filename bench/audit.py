"""`bench audit RUN_OR_SUITE`: are a run's certificates real?

A reviewer who receives a run folder (config.yaml, checkpoint.pt, result.json) re-derives every claim it makes
from the checkpoint alone and tries to break the certificates:

1. **Checkpoint identity.** checkpoint.pt's sha256 against result.json's `checkpoint_sha256` (when recorded).
2. **Re-certification.** The checkpoint is loaded, every layer's bound is converged from scratch (stored bounds
   are never trusted; `load_state_dict` drops them) and the test split (the train split too where it is small,
   and the named test subsets) is certified again in float64 with TF32 off. Clean accuracy, `cra` (guaranteed
   bounds) and `cra_power` (converged power iteration) per ε are compared with result.json; an aggregate that
   differs by more than 0.5/n is a disagreement, and at least round(|Δ|·n) points changed status. Two kinds are
   notes, not findings: `cra_power` (it rests on a stopping rule and may move with the code version), and a
   float32-certified run whose record float32 reproduces (the points float64 certifies differently are counted).
3. **Attack.** Each certified-and-correct test point (certified at the smallest reported ε; all of them or a
   seeded sample of `points`) is attacked inside its full certified radius r = min_i (f_y − f_i)/K_yi under the
   guaranteed bound, by L2 PGD with random restarts on the margin: untargeted (max_{i≠y} f_i − f_y) and
   targeted at the `targets` runner-up classes with the smallest pairwise radius (f_i − f_y directly). Iterates
   live in float64, are projected onto the ball (and clamped to the data domain, a projection that never
   leaves the ball) and the best one per row is re-evaluated on a float64 copy of the model. A point is
   *broken* only if that float64 check finds ‖x′ − x‖₂ ≤ r and max_{i≠y} f_i(x′) − f_y(x′) > 0 (beyond a
   forward-rounding allowance of 1e-12 of the logit scale).
4. **Layers.** Each bounded layer's guaranteed constant is recomputed and compared with result.json's
   `layer_bounds` (a stored bound below the recomputed one is a finding). Where the layer's linear operator is
   small enough to form (input dim × output dim ≤ `max_layer_entries`), its exact spectral norm is computed in
   float64 (impulse responses of `layer.operator` with the float64 weight, then eigvalsh of the smaller Gram)
   and must not exceed the guaranteed operator-norm bound (`norm_upper`); the power-iteration estimate
   (`norm_power`) is reported against it (it should sit below).

audit.json is written beside result.json (atomically). The CLI exits 1 when any audited run has a finding
(checkpoint mismatch, disagreement, broken certificate, violated or under-stated bound), 2 on bad input
(unknown suite or folder, a corrupt run, an unfinished run named directly) and 0 otherwise. Unfinished and
diverged runs met in a folder or suite are listed as skipped.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from bench import certify, store

AUDIT = "audit.json"

#: relative tolerance for comparing a stored bound with the recomputed one, and an exact norm with its bound
BOUND_RTOL = 1e-9
#: a float64 margin must be below −MARGIN_ROUNDING·(logit scale) for a point to count as broken
MARGIN_ROUNDING = 1e-12
#: the train split is re-certified by default when it holds at most this many input values (moons: 4,000)
TRAIN_SPLIT_MAX_VALUES = 5_000_000
#: findings of one kind printed per run on stderr (audit.json holds them all)
MAX_PRINTED_PER_KIND = 10
#: a certified radius that is not finite (K_ji = 0) is attacked at this radius
MAX_ATTACK_RADIUS = 1e6


@dataclass
class AuditOptions:
    points: int = 100            # certified points attacked per run (0: all)
    restarts: int = 3
    steps: int = 50
    targets: int = 1             # targeted runner-up classes per point (0: all)
    seed: int = 0
    device: Optional[str] = None
    data_root: Optional[str] = None
    max_layer_entries: float = 2e7
    batch: Optional[int] = None  # attack rows per batch (default: by input size; 256 for CIFAR on CPU)
    train: Optional[bool] = None  # re-certify the train split (None: when it is small)

    def as_dict(self) -> Dict[str, object]:
        return dict(self.__dict__)


@dataclass
class Finding:
    kind: str  # checkpoint, disagreement, broken, bound_violation, stored_bound_below, layer_count, load
    message: str
    detail: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "message": self.message, **self.detail}


# ---------------------------------------------------------------------------------------------------------
# Which run folders
# ---------------------------------------------------------------------------------------------------------
def resolve_runs(target: str, results: str = "results") -> Tuple[List[Path], str]:
    """The run folders named by `target`: a run folder, a folder of runs (any depth), or a suite name (its runs
    under `results`, short --epochs / --train-subset variants included, as `bench table --suite` finds them).
    Raises FileNotFoundError / ConfigError (exit 2) when nothing matches."""
    from bench.config import ConfigError, load_suite

    path = Path(target)
    if path.is_dir():
        if (path / store.CONFIG).is_file():
            return [path], str(path)
        runs = list(store.find_runs(path))
        if not runs:
            raise FileNotFoundError(f"no run folders (config.yaml) below {path}")
        return runs, str(path)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        pass  # a suite file
    elif "/" in target or path.exists():
        raise FileNotFoundError(f"{target} is not a run folder, a results folder or a suite")
    try:
        suite = load_suite(target)
    except ConfigError as e:
        raise ConfigError(f"{target} is not a run folder; {e}") from None
    from bench.report.tables import cell_key, suite_cell_keys

    root = Path(results)
    if not root.exists():
        raise FileNotFoundError(f"no results folder {root}")
    wanted = suite_cell_keys(suite)
    runs = []
    for folder in store.find_runs(root):
        try:
            cfg = store.read_config(folder)
        except store.CorruptRunError:
            continue
        if cell_key(cfg) in wanted:
            runs.append(folder)
    if not runs:
        raise FileNotFoundError(f"no run folders of suite {suite['name']} under {root}")
    return runs, f"suite {suite['name']} in {root}"


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def pick_audit_device(requested: Optional[str], cfg_device: str) -> torch.device:
    """--device if given; else the run's device, falling back to what this machine has (a run trained on
    cuda:3 audits on the CPU of a laptop)."""
    from bench.train import pick_device

    if requested:
        device = pick_device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            from bench.config import ConfigError

            raise ConfigError(f"--device {requested}: no CUDA device on this machine")
        return device
    device = pick_device(str(cfg_device or "auto"))
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        device = pick_device("auto")
    return device


def load_model(folder: Path, cfg: Dict[str, object], data, device: torch.device):
    """The run's network with the checkpoint's weights, in eval mode, bounds not yet converged."""
    from bench import train as engine

    model = engine.build_model(cfg, data, device)
    state = store.load_checkpoint(Path(folder) / store.CHECKPOINT, map_location=device)
    model.load_state_dict(state["model"])
    model.eval()
    return model


def bounded_layers(model) -> list:
    """Every layer whose bound the certificate multiplies in (a 1-Lipschitz head included)."""
    if hasattr(model, "_bounded"):
        return list(model._bounded())
    from bench.nn.bound import bounded_layers as walk

    return list(walk(model.features))


# ---------------------------------------------------------------------------------------------------------
# Re-certification
# ---------------------------------------------------------------------------------------------------------
def _compare(rec, new, n: int) -> Dict[str, object]:
    entry = {"recorded": rec, "recomputed": new}
    if rec is None:
        entry["agree"] = None
        return entry
    delta = abs(float(rec) - float(new))
    entry["agree"] = bool(delta <= 0.5 / max(n, 1))
    entry["points_differ_at_least"] = int(round(delta * n))
    return entry


#: a recorded constant this far above the recomputed one is noted (the bounds are deterministic given the weights)
LOOSER_RTOL = 1e-6
#: values per float64 re-certification batch (2^19: 170 CIFAR images, 42 Tiny-ImageNet images)
RECERTIFY_VALUES = 2 ** 19


class ProgressReport:
    """Progress of the audit's long steps as plain lines on `stream` (a terminal or a log): at most one every
    `every` seconds, and none for a step that ends sooner. A float64 re-certification runs for hours on a CPU
    (SOC's LipConv-10 at ~0.6 s per CIFAR-10 image)."""

    def __init__(self, stream, prefix: str, every: float = 30.0, clock=time.monotonic):
        self.stream, self.prefix, self.every, self.clock = stream, prefix, every, clock
        self.last = clock()
        self.started: Dict[str, float] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        now = self.clock()
        t0 = self.started.setdefault(what, now)
        if now - self.last < self.every or now - t0 < self.every or done <= 0:
            return
        self.last = now
        left = (now - t0) / done * (total - done)
        print(f"{self.prefix}: {what}: {done:,}/{total:,} points, {_minutes(now - t0)} so far, ~{_minutes(left)} "
              "left", file=self.stream, flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def recertify(model, data, cfg, result, splits: Sequence[str],
              report: Optional[ProgressReport] = None) -> Dict[str, object]:
    """Clean accuracy, CRA (guaranteed), CRA (power) and, where the family has one, CRA under its published rule,
    per ε on each split and test subset, recomputed in float64 through the one certification path
    (`certify.certify_split`), side by side with result.json. `report` hears of each batch."""
    from bench.train import evaluation_split, resolve_eps_names

    eps = resolve_eps_names(cfg)
    recorded_eval = result.get("eval") or {}
    # float64 activations of a whole eval batch of a wide net (SLL-S: 4096 images) exceed a 24 GB machine: the
    # re-certification batches by input size (the batch does not change any certificate)
    # (an input-aware certificate's iterations stop batch-wide, so it keeps the run's own batch)
    batch = int(cfg.get("eval_batch") or 4096)
    if not getattr(model, "input_aware", False):
        batch = min(batch, max(16, RECERTIFY_VALUES // max(1, math.prod(int(d) for d in data.input_shape))))
    out: Dict[str, object] = {}
    for split in splits:
        x, y, subsets, _ = evaluation_split(data, cfg, split)   # the points the run certified
        y = y.cpu()
        # the bounds are the checkpoint model's; the forward runs on an exact float64 up-cast of it
        sc = certify.certify_split(model, x, eps, torch.float64, batch, to_input=data.inputs, rules=certify.RULES,
                                  converge_tol=float(cfg["converge_tol"]),
                                  progress=None if report is None else
                                  lambda done, total, split=split: report(f"float64 re-certification of {split}",
                                                                          done, total))
        sc32 = None
        for key, mask in subsets.items():
            yy = y if mask is None else y[mask]
            n = len(yy)
            rec = recorded_eval.get(key) or {}
            ev = sc.summary(y, "sound", mask)
            evp = sc.summary(y, "power", mask)["cra"]
            entry: Dict[str, object] = {"n": n, "recorded": bool(rec), "cra": {}, "cra_power": {},
                                        "clean": _compare(rec.get("clean"), ev["clean"], n)}
            rec_cra, rec_pow = rec.get("cra") or {}, rec.get("cra_power")
            for name in eps:
                entry["cra"][name] = _compare(rec_cra.get(name) if rec else None, ev["cra"][name], n)
                if rec and name not in rec_cra:
                    entry["cra"][name]["agree"] = False
                    entry["cra"][name]["missing"] = True
                entry["cra_power"][name] = _compare(None if rec_pow is None else rec_pow.get(name), evp[name], n)
            extra = sorted(set(rec_cra) - set(eps))
            if extra:
                entry["unexpected_eps"] = extra
            if "published" in sc.certified and "cra_published" in rec:
                published = sc.summary(y, "published", mask)["cra"]
                entry["cra_published"] = {k: _compare(rec["cra_published"].get(k), v, n) for k, v in published.items()}
            disagree = [m for m in _metric_entries(entry) if m[2].get("agree") is False]
            if disagree and str(cfg.get("certify_dtype", "float64")) != "float64":
                # the run certified in a coarser dtype: does that dtype reproduce the record, and how many points
                # does it certify differently from float64?
                if sc32 is None:
                    dtype = certify.DTYPES[str(cfg["certify_dtype"])]
                    sc32 = certify.certify_split(model, x, eps, dtype, batch, to_input=data.inputs, rules=("sound",),
                                                 converge_tol=float(cfg["converge_tol"]))
                ev32 = sc32.summary(y, "sound", mask)
                correct64 = (sc.logits.argmax(1) == y) if mask is None else (sc.logits.argmax(1) == y)[mask]
                correct32 = (sc32.logits.argmax(1) == y) if mask is None else (sc32.logits.argmax(1) == y)[mask]

                def flags(s, name):
                    f = s.certified["sound"][name]
                    return f if mask is None else f[mask]

                entry["certify_dtype"] = {
                    "dtype": str(cfg["certify_dtype"]),
                    "clean": ev32["clean"], "cra": ev32["cra"],
                    "reproduces_record": all(_compare(rec_cra.get(k), v, n)["agree"] for k, v in ev32["cra"].items())
                    and bool(_compare(rec.get("clean"), ev32["clean"], n)["agree"]),
                    "points_differ_from_float64": {
                        k: int(((flags(sc, k) & correct64) != (flags(sc32, k) & correct32)).sum()) for k in eps},
                }
            out[key] = entry
        if split == "test":
            out["_test"] = (x, y, sc)  # for the attack (dropped before writing)
    return out


def _metric_entries(entry: Dict[str, object]):
    """(metric, ε, comparison) of the certificate claims of one split entry (clean, cra, cra_power)."""
    yield "clean", None, entry["clean"]
    for metric in ("cra", "cra_power"):
        for name, cmp in entry[metric].items():
            yield metric, name, cmp


# ---------------------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------------------
def _objective(out: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """f_t − f_y for targeted rows (t ≥ 0), max_{i≠y} f_i − f_y for untargeted rows (t = −1)."""
    is_y = torch.zeros_like(out, dtype=torch.bool).scatter(1, y[:, None], True)
    true = out.gather(1, y[:, None]).squeeze(1)
    untargeted = out.masked_fill(is_y, float("-inf")).amax(dim=1)
    targeted = out.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    return torch.where(target >= 0, targeted, untargeted) - true


class _frozen:
    """Parameters without gradients for the duration (the attack differentiates with respect to inputs)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)


def margin_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
               radius: torch.Tensor, steps: int = 50, restarts: int = 3,
               domain: Optional[Tuple[float, float]] = None, generator: Optional[torch.Generator] = None,
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2 PGD on the margin with a radius per row. x is float64 (iterates stay float64; the model runs in its
    own dtype). Row b maximises f_{t_b} − f_{y_b} (t_b ≥ 0) or max_{i≠y_b} f_i − f_{y_b} (t_b = −1) over
    ‖x′ − x_b‖ ≤ radius_b (and the data domain). Restart 0 starts at x, the others uniformly at random in the
    ball's radii along a random direction. Returns the best iterate per row (float64) and its objective (in the
    model's dtype, up-cast; a float64 re-check decides)."""
    dtype = next(model.parameters()).dtype
    view = (-1,) + (1,) * (x.dim() - 1)
    radius = radius.to(x)
    shrink = (radius * (1.0 - 1e-12)).view(view)          # projected iterates stay strictly inside the ball
    alpha = (2.5 * radius / max(steps, 1)).view(view)
    best_obj = torch.full((len(x),), float("-inf"), dtype=torch.float64, device=x.device)
    best = x.clone()

    def project(delta):
        norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).view(view)
        delta = delta * torch.clamp(shrink / norm.clamp_min(1e-300), max=1.0)
        if domain is not None:   # projection onto a box that holds x: never farther from x
            delta = (x + delta).clamp(*domain) - x
        return delta

    with _frozen(model):
        for r in range(max(restarts, 1)):
            if r == 0:
                delta = torch.zeros_like(x)
            else:
                d = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
                d = d / torch.linalg.vector_norm(d.flatten(1), dim=1).clamp_min(1e-300).view(view)
                u = torch.rand(len(x), generator=generator, dtype=torch.float64).to(x.device)
                delta = project(d * (radius * u).view(view))
            for it in range(steps + 1):
                z = (x + delta).to(dtype).requires_grad_(True)
                obj = _objective(model(z), y, target)
                with torch.no_grad():
                    o64 = obj.detach().double()
                    better = o64 > best_obj
                    best_obj = torch.where(better, o64, best_obj)
                    best[better] = (x + delta)[better]
                if it == steps:
                    break
                (grad,) = torch.autograd.grad(obj.sum(), z)
                with torch.no_grad():
                    g = grad.double()
                    g = g / torch.linalg.vector_norm(g.flatten(1), dim=1).clamp_min(1e-300).view(view)
                    delta = project(delta + alpha * g)
    return best, best_obj


def attack_plan(sc: "certify.SplitCertificates", y: torch.Tensor, eps_by_name: Dict[str, float], bound,
                num_classes: int):
    """(radius, certified ∧ correct, pairwise radius for choosing targets) per test point. A global bound gives
    each point its exact certified radius min_i (f_y − f_i)/K_yi; an input-aware certificate holds per ε, so a
    point's radius is the largest named ε it is certified at (sound rule) and the targets are the runner-ups by
    logit gap."""
    logits, y = sc.logits, y.cpu()
    correct = logits.argmax(1) == y
    if bound is not None:
        radius = certify.certified_radius(logits, bound, num_classes)
        cert = certify.certified(logits, bound, min(eps_by_name.values()), num_classes) & correct
        _, gap, K = certify.margins(logits, bound, num_classes)
        pair_radius = torch.where(K > 0, gap / K.clamp_min(1e-300), torch.full_like(gap, float("inf")))
    else:
        radius = torch.zeros(len(y), dtype=torch.float64)
        for name, e in eps_by_name.items():
            radius = torch.where(sc.certified["sound"][name], torch.clamp(radius, min=e), radius)
        cert = (radius > 0) & correct
        pair_radius = (logits.gather(1, logits.argmax(1, keepdim=True)) - logits).clone()
    pair_radius.scatter_(1, y[:, None], float("inf"))
    return radius, cert, pair_radius


def attack_certified(model, model64, data, x_all: torch.Tensor, y_all: torch.Tensor, plan, eps_min: float,
                     opts: AuditOptions, device: torch.device) -> Dict[str, object]:
    """Attack certified-and-correct test points at their certified radius (module docstring, step 3); `plan` is
    attack_plan's (radius, certified ∧ correct, pairwise radius)."""
    t0 = time.perf_counter()
    num_classes = data.num_classes
    y_all = y_all.cpu()
    radius, cert, pair_radius = plan
    candidates = torch.nonzero(cert).flatten()
    gen = torch.Generator().manual_seed(int(opts.seed))
    if opts.points and len(candidates) > opts.points:
        candidates = candidates[torch.randperm(len(candidates), generator=gen)[:opts.points]].sort().values
    # rows per point: the untargeted margin (unless there is a single runner-up) and the `targets` runner-ups
    # with the smallest pairwise certified radius (f_y − f_i)/K_yi
    n_targets = num_classes - 1 if not opts.targets else min(int(opts.targets), num_classes - 1)
    untargeted = num_classes > 2
    rows_per_point = n_targets + int(untargeted)
    numel = max(1, math.prod(int(d) for d in data.input_shape))
    batch = opts.batch or (min(16384, max(1024, 2 ** 23 // numel)) if device.type == "cuda"
                           else min(8192, max(256, 2 ** 19 // numel)))
    points_per_batch = max(1, batch // rows_per_point)

    broken: List[Dict[str, object]] = []
    ratios = []
    lo_hi = tuple(data.domain) if data.domain is not None else None
    for start in range(0, len(candidates), points_per_batch):
        idx = candidates[start:start + points_per_batch]
        xb = data.inputs(x_all[idx.to(x_all.device)], torch.float64).to(device)
        yb = y_all[idx]
        rb = radius[idx]
        tgt = pair_radius[idx].argsort(dim=1)[:, :n_targets]                       # [P, T]
        cols = ([torch.full((len(idx), 1), -1, dtype=torch.long)] if untargeted else []) + [tgt]
        target = torch.cat(cols, dim=1).reshape(-1)                                  # [P·R]
        rep = lambda t: t.repeat_interleave(rows_per_point, dim=0)  # noqa: E731
        xr, yr, rr = rep(xb), rep(yb).to(device), rep(rb)
        r_att = rr.clamp(max=MAX_ATTACK_RADIUS)
        with certify.exact_matmul():
            found, _ = margin_pgd(model, xr, yr, target.to(device), r_att, opts.steps, opts.restarts, lo_hi, gen)
            with torch.no_grad():
                out64 = model64(found).double()
                out_x = model64(xb).double()
        # the float64 re-check: distance in float64, margin f_y − max_{i≠y} f_i in float64
        dist = torch.linalg.vector_norm((found - xr).flatten(1), dim=1).cpu()
        out64 = out64.cpu()
        is_y = torch.zeros_like(out64, dtype=torch.bool).scatter(1, yr.cpu()[:, None], True)
        true = out64.gather(1, yr.cpu()[:, None]).squeeze(1)
        other = out64.masked_fill(is_y, float("-inf"))
        runner_val, runner = other.max(dim=1)
        margin = true - runner_val
        scale = out64.abs().amax(dim=1).clamp_min(1.0)
        inside = dist <= rr.cpu()
        hit = inside & (margin < -MARGIN_ROUNDING * scale)
        # the original float64 margin at x, for how far the attack got
        out_x = out_x.cpu()
        margin_x = rep(out_x.gather(1, yb[:, None]).squeeze(1)
                       - out_x.masked_fill(torch.zeros_like(out_x, dtype=torch.bool).scatter(1, yb[:, None], True),
                                           float("-inf")).amax(1))
        ratio = torch.where(margin_x > 0, margin / margin_x, torch.zeros_like(margin))
        ratio = torch.where(inside, ratio, torch.full_like(ratio, float("inf")))
        per_point = ratio.view(len(idx), rows_per_point)
        ratios.append(per_point.amin(dim=1))
        for p in range(len(idx)):
            rows = torch.nonzero(hit.view(len(idx), rows_per_point)[p]).flatten()
            if len(rows) == 0:
                continue
            k = p * rows_per_point + int(rows[margin.view(len(idx), rows_per_point)[p, rows].argmin()])
            broken.append({"index": int(idx[p]), "label": int(yb[p]), "radius": float(rb[p]),
                           "distance": float(dist[k]), "margin": float(margin[k]),
                           "margin_at_x": float(margin_x[k]), "predicted_at_x_prime": int(runner[k]),
                           "target": None if int(target[k]) < 0 else int(target[k])})
    ratios_t = torch.cat(ratios) if ratios else torch.empty(0, dtype=torch.float64)
    finite = ratios_t[torch.isfinite(ratios_t)]
    return {
        "split": "test", "eps_min": eps_min, "certified_correct": int(cert.sum()), "attacked": int(len(candidates)),
        "sampled": bool(opts.points and int(cert.sum()) > opts.points), "restarts": opts.restarts,
        "steps": opts.steps, "rows_per_point": rows_per_point, "untargeted": untargeted, "targets": n_targets,
        "seed": opts.seed, "radius_median": float(radius[candidates].median()) if len(candidates) else None,
        "margin_ratio_min": float(finite.min()) if len(finite) else None,
        "margin_ratio_median": float(finite.median()) if len(finite) else None,
        "n_broken": len(broken), "broken": broken, "seconds": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------
def operator_matrix(layer, weight: torch.Tensor, in_shape: Sequence[int], chunk_values: int = 4_000_000
                    ) -> torch.Tensor:
    """The [out, in] float64 matrix of `layer.operator(·, weight)` from its impulse responses, built a chunk of
    basis vectors at a time (bench/nn/verify.impulse_jacobian, without its n × n identity at once)."""
    from bench.nn.verify import impulse_jacobian

    n = math.prod(int(d) for d in in_shape)
    device = weight.device
    out_dim = layer.operator(torch.zeros(1, *in_shape, dtype=torch.float64, device=device), weight).numel()
    step = max(1, chunk_values // max(n + out_dim, 1))
    cols = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        if start == 0 and stop == n:
            return impulse_jacobian(lambda b: layer.operator(b.to(device), weight), in_shape)
        basis = torch.zeros(stop - start, n, dtype=torch.float64, device=device)
        basis[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1.0
        with torch.no_grad():
            cols.append(layer.operator(basis.reshape(stop - start, *in_shape), weight).reshape(stop - start, -1).T)
    return torch.cat(cols, dim=1)


def exact_operator_norm(J: torch.Tensor) -> float:
    """σ_max of an explicit matrix: the top eigenvalue (float64 eigvalsh) of its smaller Gram matrix."""
    G = J @ J.T if J.shape[0] <= J.shape[1] else J.T @ J
    return math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0))


def check_layers(model, result: Dict[str, object], max_entries: float) -> Tuple[List[Dict[str, object]], List[Finding]]:
    """Recomputed guaranteed constants against result.json, and exact norms of the small operators (step 4)."""
    findings: List[Finding] = []
    names = {id(m): n for n, m in model.named_modules()}
    recorded = result.get("layer_bounds")
    recorded_power = result.get("layer_bounds_power")
    n_recorded_layers = len(getattr(model, "_layers", []))
    if isinstance(recorded, list) and len(recorded) != n_recorded_layers:
        findings.append(Finding("layer_count", f"result.json lists {len(recorded)} layer bounds, the "
                                f"network has {n_recorded_layers} bounded layers",
                                {"recorded": len(recorded), "layers": n_recorded_layers}))
    rows = []
    for k, layer in enumerate(bounded_layers(model)):
        row: Dict[str, object] = {"index": k, "name": names.get(id(layer), "?"), "type": type(layer).__name__,
                                  "bound": float(layer.certified_bound()), "power": float(layer.power_bound())}
        if isinstance(recorded, list) and k < len(recorded) and k < n_recorded_layers:
            row["bound_recorded"] = recorded[k]
            if recorded[k] is None or float(recorded[k]) < row["bound"] * (1.0 - BOUND_RTOL):
                findings.append(Finding("stored_bound_below",
                                        f"layer {k} ({row['name']}, {row['type']}): stored bound {recorded[k]!r} "
                                        f"is below the recomputed {row['bound']!r}",
                                        {"layer": k, "recorded": recorded[k], "recomputed": row["bound"]}))
        if isinstance(recorded_power, list) and k < len(recorded_power) and k < n_recorded_layers:
            row["power_recorded"] = recorded_power[k]
        if not (hasattr(layer, "operator") and hasattr(layer, "norm_upper")):
            row["checked_exactly"] = False
            row["reason"] = "no linear operator (a nominal constant)"
            rows.append(row)
            continue
        row["norm_upper"], row["norm_power"] = float(layer.norm_upper), float(layer.norm_power)
        in_shape = tuple(int(d) for d in layer.operator_input_shape)
        w64 = layer.weight.detach().double()
        with torch.no_grad():
            out_dim = layer.operator(torch.zeros(1, *in_shape, dtype=torch.float64, device=w64.device), w64).numel()
        n_in = math.prod(in_shape)
        row["operator_shape"] = [int(out_dim), int(n_in)]
        if n_in * out_dim > max_entries:
            row["checked_exactly"] = False
            row["reason"] = f"{out_dim}×{n_in} operator exceeds --max-layer-entries {max_entries:g}"
            rows.append(row)
            continue
        exact = exact_operator_norm(operator_matrix(layer, w64, in_shape))
        row.update({"checked_exactly": True, "exact": exact,
                    "exact_over_bound": exact / row["norm_upper"] if row["norm_upper"] > 0 else
                    (0.0 if exact == 0 else math.inf),
                    "power_over_exact": row["norm_power"] / exact if exact > 0 else None,
                    "power_above_exact": bool(row["norm_power"] > exact * (1.0 + BOUND_RTOL))})
        if exact > row["norm_upper"] * (1.0 + BOUND_RTOL):
            findings.append(Finding("bound_violation",
                                    f"layer {k} ({row['name']}, {row['type']}): exact operator norm {exact!r} "
                                    f"exceeds its guaranteed bound {row['norm_upper']!r}",
                                    {"layer": k, "exact": exact, "bound": row["norm_upper"]}))
        rows.append(row)
    return rows, findings


# ---------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------
def _label(cfg: Dict[str, object]) -> str:
    from bench.launch.local import run_label

    try:
        return run_label(cfg)
    except (KeyError, TypeError, ValueError):
        return "?"


def audit_run(folder: os.PathLike, opts: Optional[AuditOptions] = None, write: bool = True,
              progress=None) -> Dict[str, object]:
    """Audit one run folder; returns the audit (also written to <folder>/audit.json unless write=False); progress
    lines of the long steps go to the stream `progress` (None: silent).
    `status` is pass, fail (findings), corrupt (result.json or config unreadable) or skipped (unfinished or
    diverged: nothing certified to audit). Raises DatasetNotFoundError when the run's data is missing."""
    from bench import train as engine

    opts = opts or AuditOptions()
    folder = Path(folder)
    t_start = time.perf_counter()
    audit: Dict[str, object] = {"folder": str(folder), "options": opts.as_dict(), "findings": []}
    findings: List[Finding] = []

    state, detail = store.run_state(folder)
    if state in ("corrupt",):
        audit.update(status="corrupt", reason=detail)
        return audit
    if state != "complete":
        audit.update(status="skipped", reason=f"{state}" + (f" ({detail})" if detail else ""))
        return audit
    cfg = store.read_config(folder)
    result = store.read_result(folder)
    audit["run"] = {k: result.get(k) for k in ("method", "arch", "dataset", "seed", "config_hash")}
    audit["label"] = _label(cfg)

    # 1. checkpoint identity
    ckpt = folder / store.CHECKPOINT
    actual = store.file_sha256(ckpt)
    recorded = result.get("checkpoint_sha256")
    audit["checkpoint"] = {"sha256_recorded": recorded, "sha256_actual": actual,
                           "match": None if recorded is None else recorded == actual}
    if actual is None:
        findings.append(Finding("checkpoint", "checkpoint.pt is missing: nothing to audit"))
        return _finish(folder, audit, findings, t_start, write)
    if recorded is not None and recorded != actual:
        findings.append(Finding("checkpoint", f"checkpoint.pt sha256 {actual[:16]}… does not match result.json's "
                                f"checkpoint_sha256 {str(recorded)[:16]}… (the weights changed after the result)",
                                {"recorded": recorded, "actual": actual}))

    # 2. load and converge from scratch
    if opts.data_root:
        cfg = {**cfg, "data_root": opts.data_root}
    device = pick_audit_device(opts.device, str(cfg.get("device", "auto")))
    audit["device"] = engine.device_name(device)
    data = engine.build_data(cfg)
    try:
        model = load_model(folder, cfg, data, device)
    except (store.CorruptRunError, RuntimeError, KeyError) as e:
        findings.append(Finding("load", f"checkpoint.pt does not load into {cfg['arch']}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"))
        return _finish(folder, audit, findings, t_start, write)
    t0 = time.perf_counter()
    with certify.exact_matmul():
        model.converge(tol=float(cfg["converge_tol"]))
    bound, power = model.certified_bound(), model.power_bound()
    audit["converge_seconds"] = round(time.perf_counter() - t0, 3)
    num_classes = data.num_classes
    recomputed = {"K_f": float(bound.max(num_classes)), "K_up": float(bound.K_up),
                  "K_f_power": float(power.max(num_classes)), "K_up_power": float(power.K_up)}
    audit["constants"] = {k: {"recorded": result.get(k), "recomputed": v} for k, v in recomputed.items()}
    looser = []  # a recorded bound well above the checkpoint's is sound, but the run was not reproduced
    for key in ("K_f", "K_up"):
        rec = result.get(key)
        if rec is not None and float(rec) < recomputed[key] * (1.0 - BOUND_RTOL):
            findings.append(Finding("stored_bound_below", f"result.json's {key} {rec!r} is below the recomputed "
                                    f"{recomputed[key]!r}", {"constant": key, "recorded": rec,
                                                              "recomputed": recomputed[key]}))
        elif rec is not None and float(rec) > recomputed[key] * (1.0 + LOOSER_RTOL):
            looser.append(f"result.json's {key} {float(rec):.6g} is above the checkpoint's recomputed "
                          f"{recomputed[key]:.6g} (sound, but the run's bound state is not what its checkpoint gives)")

    # re-certification in float64
    t0 = time.perf_counter()
    model64 = copy.deepcopy(model).to(torch.float64)
    model64.eval()
    splits = ["test"]
    want_train = opts.train
    if want_train is None:
        x_tr, _ = data.split("train")
        want_train = "train" in (result.get("eval") or {}) and x_tr.numel() <= TRAIN_SPLIT_MAX_VALUES
    if want_train:
        splits.append("train")
    report = None if progress is None else ProgressReport(progress, f"bench audit: {audit['label']}")
    rec = recertify(model, data, cfg, result, splits, report)
    x_test, y_test, test_sc = rec.pop("_test")
    audit["recertify"] = {"dtype": "float64", "splits": rec, "seconds": round(time.perf_counter() - t0, 3)}
    n_disagree, notes = 0, []
    for key, entry in rec.items():
        if not entry.get("recorded"):
            continue
        # a run certified in float32 whose record that dtype reproduces is not in dispute: the float64 points
        # that differ are reported (certify_dtype.points_differ_from_float64), not counted
        own_dtype_agrees = bool((entry.get("certify_dtype") or {}).get("reproduces_record"))
        for metric, name, cmp in _metric_entries(entry):
            if cmp.get("agree") is False and (metric == "cra_power" or own_dtype_agrees):
                # cra_power rests on a stopping rule (it may move with the code version): information only
                notes.append(f"{key} {metric}{'' if name is None else '@' + name}: result.json "
                             f"{_fmt(cmp.get('recorded'))}, recomputed {_fmt(cmp['recomputed'])}"
                             + (" (float64 vs the run's float32; float32 reproduces the record)"
                                if own_dtype_agrees and metric != "cra_power" else ""))
                continue
            if cmp.get("agree") is False:
                n_disagree += 1
                what = metric if name is None else f"{metric}@{name}"
                findings.append(Finding(
                    "disagreement",
                    f"{key} {what}: result.json {_fmt(cmp.get('recorded'))}, recomputed {_fmt(cmp['recomputed'])} "
                    f"(≥ {cmp.get('points_differ_at_least', '?')} of {entry['n']} points differ)",
                    {"split": key, "metric": metric, "eps": name, "recorded": cmp.get("recorded"),
                     "recomputed": cmp["recomputed"], "points_differ_at_least": cmp.get("points_differ_at_least")}))
        if entry.get("unexpected_eps"):
            n_disagree += 1
            findings.append(Finding("disagreement", f"{key}: result.json reports ε {entry['unexpected_eps']} that "
                                    "the config does not name", {"split": key}))
    audit["disagreements"] = n_disagree
    audit["notes"] = looser + notes

    # 3. attack certified points at their certified radius
    from bench.train import resolve_eps_names

    eps_names = resolve_eps_names(cfg)
    plan = attack_plan(test_sc, y_test, eps_names, None if getattr(model, "input_aware", False) else bound,
                       num_classes)
    attack = attack_certified(model, model64, data, x_test, y_test, plan, min(eps_names.values()), opts, device)
    audit["attack"] = attack
    for b in attack["broken"]:
        findings.append(Finding("broken", f"broken certificate: test point {b['index']} (label {b['label']}) "
                                f"certified at radius {b['radius']:.6g}, x′ at distance {b['distance']:.6g} "
                                f"has margin {b['margin']:.3g} (class {b['predicted_at_x_prime']} wins)",
                                {"index": b["index"], "radius": b["radius"]}))

    # 4. layers
    t0 = time.perf_counter()
    rows, layer_findings = check_layers(model, result, opts.max_layer_entries)
    findings += layer_findings
    exact = [r for r in rows if r.get("checked_exactly")]
    audit["layers"] = rows
    audit["layers_summary"] = {
        "bounded": len(rows), "checked_exactly": len(exact),
        "max_exact_over_bound": max((r["exact_over_bound"] for r in exact), default=None),
        "power_above_exact": sum(bool(r.get("power_above_exact")) for r in exact),
        "seconds": round(time.perf_counter() - t0, 3)}
    return _finish(folder, audit, findings, t_start, write)


def _fmt(v) -> str:
    return "–" if v is None else f"{float(v):.6f}"


def _finish(folder: Path, audit: Dict[str, object], findings: List[Finding], t_start: float, write: bool):
    from bench.train import __version__, git_commit

    audit["findings"] = [f.as_dict() for f in findings]
    audit["status"] = "fail" if findings else "pass"
    audit["seconds"] = round(time.perf_counter() - t_start, 3)
    audit["audited"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    audit.update(torch=torch.__version__, lipbench=__version__, commit=git_commit())
    if write:
        store.write_json(Path(folder) / AUDIT, audit)
    return audit


# ---------------------------------------------------------------------------------------------------------
# Many runs, the table, the exit status
# ---------------------------------------------------------------------------------------------------------
def audit_table(audits: List[Dict[str, object]], title: str):
    from rich.table import Table

    STYLE = {"pass": "green", "fail": "bold red", "corrupt": "bold red", "skipped": "dim"}
    t = Table(title=f"audit: {title}")
    for col, justify in (("run", "left"), ("points", "right"), ("broken", "right"), ("disagree", "right"),
                         ("layers exact", "right"), ("max exact/bound", "right"), ("status", "left")):
        t.add_column(col, justify=justify)
    for a in audits:
        attack = a.get("attack") or {}
        summary = a.get("layers_summary") or {}
        ratio = summary.get("max_exact_over_bound")
        status = a.get("status", "?")
        reason = a.get("reason")
        t.add_row(a.get("label") or a["folder"],
                  str(attack.get("attacked", "–")), str(attack.get("n_broken", "–")),
                  str(a.get("disagreements", "–")),
                  f"{summary['checked_exactly']}/{summary['bounded']}" if summary else "–",
                  _ratio(ratio),
                  f"[{STYLE.get(status, 'white')}]{status}[/]" + (f" ({reason})" if reason and status == "skipped"
                                                                    else ""))
    return t


def _ratio(r: Optional[float]) -> str:
    """exact/bound, readable near 1 (where sound bounds sit): 0.912345, 1 − 3.3e-14, 1 + 2.0e-03."""
    if r is None:
        return "–"
    if abs(r - 1.0) < 1e-6:
        return "1" if r == 1.0 else (f"1 − {1.0 - r:.1e}" if r < 1.0 else f"1 + {r - 1.0:.1e}")
    return f"{r:.6f}"


def exit_status(audits: List[Dict[str, object]]) -> int:
    """1 if any run has a finding, else 2 if a run could not be audited (corrupt), else 0."""
    if any(a.get("status") == "fail" for a in audits):
        return 1
    if any(a.get("status") == "corrupt" for a in audits):
        return 2
    return 0


def main(target: str, results: str = "results", opts: Optional[AuditOptions] = None, console=None,
         err=None, quiet: bool = False) -> int:
    """`bench audit`: resolve, audit every run, print the table, name every finding on stderr (with progress
    lines of long steps unless `quiet`)."""
    from rich.console import Console

    opts = opts or AuditOptions()
    console = console or Console()
    err = err or sys.stderr
    folders, title = resolve_runs(target, results)
    if len(folders) == 1:
        state, detail = store.run_state(folders[0])
        if state == "corrupt":
            raise store.CorruptRunError(detail)
        if state != "complete" and (folders[0] / store.CONFIG).exists() and Path(target).resolve() == \
                folders[0].resolve():
            raise FileNotFoundError(f"{folders[0]}: the run is {state}" + (f" ({detail})" if detail else "")
                                    + "; nothing certified to audit")
    audits = []
    for folder in folders:
        a = audit_run(folder, opts, progress=None if quiet else err)
        audits.append(a)
        if a["status"] == "fail":
            shown: Dict[str, int] = {}
            for f in a["findings"]:
                shown[f["kind"]] = shown.get(f["kind"], 0) + 1
                if shown[f["kind"]] <= MAX_PRINTED_PER_KIND:
                    print(f"bench audit: {a.get('label') or folder} [{folder}]: {f['message']}", file=err)
            for kind, count in shown.items():
                if count > MAX_PRINTED_PER_KIND:
                    print(f"bench audit: {a.get('label') or folder} [{folder}]: … and {count - MAX_PRINTED_PER_KIND} "
                          f"more {kind} findings (all in {folder / AUDIT})", file=err)
        elif a["status"] == "corrupt":
            print(f"bench audit: corrupt: {a.get('reason')}", file=err)
    console.print(audit_table(audits, title))
    return exit_status(audits)

