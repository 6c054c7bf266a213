"""Certification, certified robust accuracy, the empirical lower bound and tightness.

Soundness rules: certificates come only from converged bounds (`model.certified_bound()` raises otherwise),
margins and bounds are compared in float64 with TF32 off, and the inequality is strict, so ties (a zero
margin) are never certified.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from bench.nn.bound import PairwiseBound

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_eps(value) -> float:
    """An ε as written in a config: 0.15, "0.15" or "36/255"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"cannot read ε {value!r}; write a number or a fraction such as 36/255") from e


def _precision_knobs():
    """Every backend's float32 precision setting (torch ≥ 2.9: `fp32_precision`, per backend and operator)."""
    b = torch.backends
    candidates = [b, getattr(b.cuda, "matmul", None), b.cudnn, getattr(b.cudnn, "conv", None),
                  getattr(b.cudnn, "rnn", None), getattr(b, "mkldnn", None),
                  getattr(getattr(b, "mkldnn", None), "matmul", None), getattr(getattr(b, "mkldnn", None), "conv", None),
                  getattr(getattr(b, "mkldnn", None), "rnn", None)]
    return [c for c in candidates if c is not None and hasattr(c, "fp32_precision")]


@contextlib.contextmanager
def exact_matmul():
    """Full float32 precision for the duration: TF32 off on CUDA matmul and cuDNN, bf16 off in oneDNN
    (certification must not run on reduced-precision kernels). Every setting the caller made is restored.

    With torch's per-backend `fp32_precision` API every knob is set to "ieee"; the legacy getter
    `torch.get_float32_matmul_precision()` is not called, since it raises once a caller mixed the legacy and new
    APIs. Older torch: the legacy flags."""
    knobs = _precision_knobs()
    if knobs:
        saved = [(k, k.fp32_precision) for k in knobs]
        try:
            for k, _ in saved:
                k.fp32_precision = "ieee"
            yield
        finally:
            for k, value in reversed(saved):
                k.fp32_precision = value
        return
    cuda_mm = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_mm
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)


def margins(logits: torch.Tensor, bound: PairwiseBound, num_classes: int) -> Tuple[torch.Tensor, ...]:
    """Prediction j, margins f_j − f_i [B, N] and constants K_ji [B, N], all float64."""
    logits = logits.double()
    j = logits.argmax(dim=1)
    gap = logits.gather(1, j[:, None]) - logits
    K = bound.to(torch.float64).rows(j.to(bound.K_up.device), num_classes).to(logits.device)
    return j, gap, K


def certified(logits: torch.Tensor, bound: PairwiseBound, eps: float, num_classes: int) -> torch.Tensor:
    """True where f_j − f_i > ε·K_ji for every i ≠ j (j = argmax f). A tie is never certified."""
    j, gap, K = margins(logits, bound, num_classes)
    is_j = torch.zeros_like(gap, dtype=torch.bool).scatter(1, j[:, None], True)
    return ((gap > eps * K) | is_j).all(dim=1)


def certified_radius(logits: torch.Tensor, bound: PairwiseBound, num_classes: int) -> torch.Tensor:
    """min_{i≠j} (f_j − f_i)/K_ji: the largest ε the bound certifies (0 for a tie)."""
    j, gap, K = margins(logits, bound, num_classes)
    is_j = torch.zeros_like(gap, dtype=torch.bool).scatter(1, j[:, None], True)
    ratio = torch.where(K > 0, gap / K.clamp_min(1e-300),
                        torch.where(gap > 0, torch.full_like(gap, float("inf")), torch.zeros_like(gap)))
    return ratio.masked_fill(is_j, float("inf")).amin(dim=1).clamp_min(0.0)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32,
            batch_size: int = 4096, to_input=None, progress: Optional[Callable[[int, int], None]] = None
            ) -> torch.Tensor:
    """Logits of a whole split, batched, in `dtype`, TF32 off. `to_input` maps stored values to data units;
    `progress(done, total)` is called after each batch."""
    device = next(model.parameters()).device
    if next(model.parameters()).dtype != dtype:  # an exact up-cast copy: the same function, a finer forward
        model = copy.deepcopy(model).to(dtype)
    outs = []
    with exact_matmul():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            xb = to_input(xb, dtype) if to_input is not None else xb.to(dtype)
            outs.append(model(xb).to(torch.float64).cpu())
            if progress is not None:
                progress(min(start + batch_size, len(x)), len(x))
    return torch.cat(outs) if outs else torch.empty(0, 0, dtype=torch.float64)


def evaluate_logits(logits: torch.Tensor, y: torch.Tensor, bound: PairwiseBound, eps_by_name: Dict[str, float],
                    num_classes: int) -> Dict[str, object]:
    """Clean accuracy and CRA (certified ∧ correct) per named ε."""
    y = y.cpu()
    correct = logits.argmax(dim=1) == y
    out = {"clean": float(correct.double().mean()) if len(y) else float("nan"), "cra": {}}
    for name, eps in eps_by_name.items():
        ok = certified(logits, bound, eps, num_classes) & correct
        out["cra"][name] = float(ok.double().mean()) if len(y) else float("nan")
    return out


#: certificate rules. `sound`: guaranteed bounds only (the certificate). `power`: converged power iteration, from
#: below (the paper's way; not a certificate). `published`: the family's own published rule where it differs from
#: both (1-Lipschitz families take every layer as exactly 1: `nominal_bound`).
RULES = ("sound", "power", "published")


@dataclass
class SplitCertificates:
    """A split certified under one or more rules: the float64 logits, and per rule and named ε a bool per point
    (certified, strict) and the K̄ = max_ij K_ij it used per point (a global bound: one value for every point)."""

    logits: torch.Tensor
    certified: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    K: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)

    def summary(self, y: torch.Tensor, rule: str = "sound", mask: Optional[torch.Tensor] = None) -> Dict[str, object]:
        """Clean accuracy and CRA (certified ∧ correct) per named ε, on the points of `mask` (all by default)."""
        logits, y = (self.logits, y.cpu()) if mask is None else (self.logits[mask], y.cpu()[mask])
        correct = logits.argmax(dim=1) == y
        out = {"clean": float(correct.double().mean()) if len(y) else float("nan"), "cra": {}}
        for name, flags in self.certified[rule].items():
            ok = (flags if mask is None else flags[mask]) & correct
            out["cra"][name] = float(ok.double().mean()) if len(y) else float("nan")
        return out

    def K_stats(self, rule: str = "sound", mask: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, float]]:
        """Per named ε: mean and max of K̄ over the points (equal for a global bound)."""
        out = {}
        for name, K in self.K[rule].items():
            K = K if K.dim() == 0 or mask is None else K[mask]
            K = K.double()
            top = float(K.max())
            # a float64 mean of equal values can round one ulp above them (seen with ATen's AVX2 kernels)
            out[name] = {"mean": min(float(K.mean()), top), "max": top}
        return out


def _global_bound(model, rule: str) -> Optional[PairwiseBound]:
    if rule == "sound":
        return model.certified_bound()
    if rule == "power":
        return model.power_bound()
    return model.nominal_bound() if getattr(model, "published_rule_nominal", False) else None


def certify_split(model: torch.nn.Module, x: torch.Tensor, eps_by_name: Dict[str, float],
                  dtype: torch.dtype = torch.float32, batch_size: int = 4096, to_input=None,
                  rules: Sequence[str] = ("sound", "power"), converge_tol: float = 1e-9,
                  progress: Optional[Callable[[int, int], None]] = None) -> SplitCertificates:
    """Certify every point of a split at every named ε under each rule: the one certification path of lipbench
    (training's evaluation, `bench audit`, `load_run(...).certified`).

    A global network (`input_aware` false) is certified from its logits and one pairwise bound per rule, computed
    once (`certified`: f_j − f_i > ε·K_ji). An input-aware network answers per batch and per ε,
    `model.local_certificate(x, eps, rule) → (certified [B], K̄ [B], predicted class [B])`: its bound holds only
    within that ε-ball. It certifies the float64 input (the exact stored value, not its float32 rounding), and a
    point counts only where its certified class is the class the split's logits predict.
    The `published` rule is left out for a model that has none of its own. Forward passes run in `dtype` with TF32
    off; `seconds` is each rule's wall time, the forward pass included. `converge_tol` is the run's own tolerance,
    used when an input-aware model is up-cast to `dtype` and its layers re-converged. `progress(done, total)` is
    called after each batch (points of the split)."""
    rules = [r for r in rules if r != "published" or _has_published_rule(model)]
    if not getattr(model, "input_aware", False):
        t0 = time.perf_counter()
        logits = predict(model, x, dtype, batch_size, to_input=to_input, progress=progress)
        forward = time.perf_counter() - t0
        out = SplitCertificates(logits)
        for rule in rules:
            t0 = time.perf_counter()
            bound = _global_bound(model, rule)
            out.certified[rule] = {k: certified(logits, bound, e, model.num_classes) for k, e in eps_by_name.items()}
            K = bound.max(model.num_classes).to(torch.float64)
            out.K[rule] = {k: K for k in eps_by_name}
            out.seconds[rule] = forward + time.perf_counter() - t0
        return out
    device = next(model.parameters()).device
    if next(model.parameters()).dtype != dtype:  # an exact up-cast copy; its layers' bounds are recomputed for it
        model = copy.deepcopy(model).to(dtype)
        model.converge(tol=converge_tol)
    chunks = {r: {k: ([], []) for k in eps_by_name} for r in rules}
    seconds = dict.fromkeys(rules, 0.0)
    logits = []
    with exact_matmul(), torch.no_grad():
        for start in range(0, len(x), batch_size):
            raw = x[start:start + batch_size].to(device)
            xb = to_input(raw, dtype) if to_input is not None else raw.to(dtype)
            x64 = to_input(raw, torch.float64) if to_input is not None else raw.to(torch.float64)
            t0 = time.perf_counter()
            lg = model(xb).to(torch.float64)
            logits.append(lg.cpu())
            forward = time.perf_counter() - t0
            for rule in rules:
                t0 = time.perf_counter()
                for name, e in eps_by_name.items():
                    ok, K, predicted = model.local_certificate(x64, e, rule)
                    ok = ok & (predicted.to(lg.device) == lg.argmax(dim=1))
                    chunks[rule][name][0].append(ok.cpu())
                    chunks[rule][name][1].append(K.to(torch.float64).cpu())
                seconds[rule] += forward + time.perf_counter() - t0
            if progress is not None:
                progress(min(start + batch_size, len(x)), len(x))
    empty_flags, empty_K = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    out = SplitCertificates(torch.cat(logits) if logits else torch.empty(0, model.num_classes, dtype=torch.float64),
                            seconds=seconds)
    for rule in rules:
        out.certified[rule] = {k: torch.cat(v[0]) if v[0] else empty_flags for k, v in chunks[rule].items()}
        out.K[rule] = {k: torch.cat(v[1]) if v[1] else empty_K for k, v in chunks[rule].items()}
    return out


def _has_published_rule(model) -> bool:
    """A rule of the family's own, distinct from `sound` and `power` (for input-aware models the published rule is
    the power-iterated local one)."""
    return bool(getattr(model, "published_rule_nominal", False))


def lower_bound(model: torch.nn.Module, x: torch.Tensor, pairs: int = 4000, steps: int = 1000, lr: float = 3e-4,
                domain: Optional[Tuple[float, float]] = None, generator: Optional[torch.Generator] = None,
                chunk: int = 4000, to_input=None) -> float:
    """Empirical lower bound on K(f) (supplement C, eq. 19; the official `LowerLipschitzBoundEstimation`).

    Draws 2·pairs points of `x` (data units), then maximises, over both points of every pair with Adam,
        max_i |(f_j − f_i)(x₁) − (f_j − f_i)(x₂)| / ‖x₁ − x₂‖₂,   j = argmax f(x₁) (re-evaluated every step),
    clamping to the data domain after each step; returns the largest value seen over all steps and pairs.
    """
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    best = 0.0
    try:
        for a, b in lower_bound_pairs(x, pairs, generator, chunk, to_input, next(model.parameters()).device):
            best = max(best, float(pair_ascent(lambda v: model(v[0])[None], a[None], b[None], steps, lr, domain)[0]))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return best


def lower_bound_pairs(x: torch.Tensor, pairs: int, generator: Optional[torch.Generator], chunk: int, to_input,
                      device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The pairs `lower_bound` starts from, in chunks of at most `chunk`: (x₁, x₂) in data units."""
    n = min(2 * pairs, len(x) - len(x) % 2)
    idx = torch.randperm(len(x), generator=generator)[:n]
    for start in range(0, n // 2, chunk):
        m = min(chunk, n // 2 - start)
        a, b = (x[idx[lo:lo + m]].to(device) for lo in (start, n // 2 + start))
        # only the drawn points are converted to data units (not the whole pool: 5 GB on Tiny-ImageNet)
        yield tuple((to_input(v) if to_input is not None else v) for v in (a, b))


def _pair_quotients(forward, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max_i |(f_j − f_i)(a) − (f_j − f_i)(b)| / ‖a − b‖₂ per pair, [M, P] (0 where a = b)."""
    fa, fb = forward(torch.cat([a, b], dim=1)).split(a.shape[1], dim=1)   # one pass over both ends of every pair
    j = fa.detach().argmax(dim=-1, keepdim=True)
    diff = (fa.gather(-1, j) - fa) - (fb.gather(-1, j) - fb)
    dist = torch.linalg.vector_norm((a - b).flatten(2), dim=-1)
    q = diff.abs().amax(dim=-1) / dist.clamp_min(1e-12)
    return torch.where(dist > 0, q, torch.zeros_like(q))


def pair_ascent(forward, a: torch.Tensor, b: torch.Tensor, steps: int, lr: float,
                domain: Optional[Tuple[float, float]] = None, compile: bool = False) -> torch.Tensor:
    """`lower_bound`'s Adam ascent for a stack of M networks at once: `forward` maps points [M, P, ...] to logits
    [M, P, N] (network m on its own points); returns the best quotient per network, [M]. `compile`: the
    quotients and their gradient as one inductor graph (a compiled pack's 1,000 ascent steps; it is an
    empirical lower bound, never a certificate, so compiled rounding is harmless)."""
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    best = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    quotients = functools.partial(_pair_quotients, forward)
    if compile:
        quotients = torch.compile(quotients)
    for step in range(steps + 1):
        q = quotients(a, b)
        best = torch.maximum(best, q.detach().amax(dim=-1).double())
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        (-q.sum()).backward()
        opt.step()
        if domain is not None:
            with torch.no_grad():
                a.clamp_(*domain)
                b.clamp_(*domain)
    return best


def l2_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
           restarts: int = 5, step_size: Optional[float] = None,
           domain: Optional[Tuple[float, float]] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """L2 PGD on the margin loss: returns a bool per input, True where some x' with ‖x' − x‖ ≤ ε changes the
    prediction away from y. Used to test certificates empirically (a certified point must never fall)."""
    step_size = step_size if step_size is not None else 2.5 * eps / steps * 4
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    dims = tuple(range(1, x.dim()))
    for r in range(restarts):
        delta = torch.randn(x.shape, generator=generator).to(x) if r else torch.zeros_like(x)
        if r:
            delta = delta / torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, *[1] * (x.dim() - 1))
            delta = delta * eps * torch.rand(len(x), generator=generator).to(x).view(-1, *[1] * (x.dim() - 1))
        for _ in range(steps):
            delta.requires_grad_(True)
            out = model(x + delta)
            true = out.gather(1, y[:, None]).squeeze(1)
            other = out.masked_fill(torch.zeros_like(out, dtype=torch.bool).scatter(1, y[:, None], True),
                                    float("-inf")).amax(dim=1)
            (grad,) = torch.autograd.grad((other - true).sum(), delta)
            with torch.no_grad():
                g = grad / torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12).view(-1, *[1] * len(dims))
                delta = delta + step_size * g
                norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, *[1] * len(dims))
                delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
                if domain is not None:
                    delta = (x + delta).clamp(*domain) - x
                broken |= model(x + delta).argmax(dim=1) != y
    return broken
