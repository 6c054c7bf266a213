"""SOC: Skew Orthogonal Convolutions (Singla & Feizi, ICML 2021), with last-layer normalization (LLN),
certificate regularization (CR) and Householder activations (HH1, HH2) from Singla, Singla & Feizi, "Improved
deterministic l2 robustness on CIFAR-10 and CIFAR-100" (ICLR 2022). Official code: singlasahil14/SOC.

**Layer.** A free filter P ∈ R^{M×M×k×k}, M = max(c_in·s², c_out), gives the skew filter

    A = ½(P − Pᵀ),      Pᵀ: swap the channel axes and flip both spatial axes (`transpose_filter`),

whose zero-padded 'same' convolution is exactly skew-adjoint, so exp(A) is orthogonal. A is scaled by
`correction`/σ (0.7, or 1 for 1×1 kernels), σ = the smallest of four power-iteration estimates of the spectral
norms of four reshapes of A (the "fantastic four", without their √(hw) factor). The output is the truncated
series z = Σ_{i=0}^{K} Aⁱx/i! (cur ← conv(cur, A)/i; z ← z + cur), K = 5 in training and 12 in eval, plus a
bias. Stride 2 is a space-to-depth rearrangement first (c_in → 4c_in); c_out > c_in zero-pads the input
channels, c_out < c_in keeps the first c_out output channels. σ's iterates get 1 step per training forward and
a 50-step refresh every 200 training forwards, none in eval.

The official `__init__` runs the 50-step refresh on a filter that `reset_parameters()` then redraws, so a fresh
official model is garbage in eval until its first training forward (reference/peer-methods.md §2). Here the
refresh runs on the final filter: a fresh model certifies correctly.

**Certificate (sound).** The truncated series is only close to orthogonal. Each layer's guaranteed bound is
1 + Σ_{i>K} aⁱ/i! ≥ ‖T_K(A)‖, from three facts: A is exactly skew in floating point too (½(P − Pᵀ) and the
scaling by correction/σ round symmetrically under negation) and its 'same' zero-padded conv is skew-adjoint, so
‖exp A‖ = 1 exactly; the triangle inequality on the tail; and a ≥ ‖A‖, the fantastic-four bound
√(hw)·min_r ‖R_r‖₂ over the four reshapes R_r of the filter (Singla & Feizi, ICLR 2021, Thm. 1; for
R₃ = A as M × M·k²: y(s) = R₃·patch(s) and every pixel lies in hw patches; R₁, R₂ by Cauchy–Schwarz over the h
row shifts; R₄ by the adjoint; zero padding only drops terms), each ‖R_r‖₂ a guaranteed Gram-iteration bound
(bench/nn/spectral.py), inflated by 1e-6 for the float32 rounding of A_n in the forward pass. Space-to-depth,
channel padding and channel truncation have norm ≤ 1. Rounding inside the forward pass itself is not bounded,
as for every family. Since σ is the min of the same four norms (from below), a ≈ k·correction after training,
so the tail costs ~1e-6 per layer at 12 terms. The engine's block power iteration of the eval map gives the
"power" column (from below). The published rule (`cra_published`) takes every layer as exactly 1:
L = 1/min(std) (std 0.2507: L = 3.99), top1 − top2 > √2·ε·L, or with LLN min_j (z_top − z_j)/‖ŵ_top − ŵ_j‖ > ε·L.

**Architectures** `lipconv-{10,20}` (LipConvNet-5b, b = 2 or 4): five stages of b SOC layers (b − 1 stride-1
3×3, then one stride-2: 3×3 in stages 1–4, 1×1 in stage 5), an activation after each, channels
32→64→128→256→512→1024, then the last layer: a 1×1 SOC to the classes (default, 1-Lipschitz), LLN (`-lln`),
or an unconstrained linear layer (`-linear`, the reference paper's CLL runs). Activation HH1 by default (the
ICLR 2022 paper's best and the reference paper's runs; the official CLI default is MaxMin): `-maxmin`, `-hh2`.

The loss and the recipe are the method's (methods/soc.py); CLL trains the `-linear` variants (methods/cll.py).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.archs import register_spec_arch
from bench.nn.bound import LipschitzNet
from bench.nn.families.common import make_head
from bench.nn.lipschitz import PowerIterated, UnconvergedBoundError
from bench.nn.spectral import dense_norm_bound
from bench.nn.verify import impulse_jacobian

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SOC_STD = (0.2507, 0.2507, 0.2507)  # the official `cifar10_std`, used for CIFAR-10, CIFAR-100 and Tiny-ImageNet


def transpose_filter(P: torch.Tensor) -> torch.Tensor:
    """The filter of the adjoint convolution: channel axes swapped, both spatial axes flipped."""
    return P.transpose(0, 1).flip(2, 3)


def _l2_normalize(t: torch.Tensor) -> torch.Tensor:
    return t / torch.linalg.vector_norm(t).clamp_min(1e-12)


def taylor_tail(a: float, terms: int) -> float:
    """Σ_{i>K} aⁱ/i! = e^a − Σ_{i≤K} aⁱ/i!, summed term by term (no cancellation). inf on overflow."""
    if a <= 0.0:
        return 0.0
    try:
        term = math.exp((terms + 1) * math.log(a) - math.lgamma(terms + 2))
    except OverflowError:
        return math.inf
    total, i = 0.0, terms + 1
    while term > 0.0:
        total += term
        i += 1
        term *= a / i
        if i > a and term <= 1e-17 * total:
            break
        if not math.isfinite(total):
            return math.inf
    return total


class SkewOrthogonalConv(PowerIterated, nn.Module):
    """One SOC layer (official `SOC`): parameters keep the official names (`random_conv_filter`, `bias`,
    `u1..v4`, `correction`), so official state_dicts load."""

    #: the four reshapes of an [o, i, p, q] filter as bilinear forms vᵀ R u: (u indices, v indices). Official
    #: shapes: u1 (1,M,1,k) v1 (M,1,k,1); u2 (1,M,k,1) v2 (M,1,1,k); u3 (1,M,k,k) v3 (M,1,1,1);
    #: u4 (M,1,k,k) v4 (1,M,1,1)
    _RESHAPES = {1: ("iq", "op"), 2: ("ip", "oq"), 3: ("ipq", "o"), 4: ("opq", "i")}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = True, train_terms: int = 5, eval_terms: int = 12, init_iters: int = 50,
                 update_iters: int = 1, update_freq: int = 200, correction: float = 0.7):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"SOC supports stride 1 or 2, got {stride}")
        if kernel_size % 2 == 0:
            raise ValueError("SOC needs an odd kernel (the 'same' zero padding makes A skew-adjoint)")
        self.in_channels = in_channels * stride * stride      # after space-to-depth
        self.out_channels = out_channels
        self.max_channels = M = max(self.out_channels, self.in_channels)
        self.kernel_size, self.stride = kernel_size, stride
        self.train_terms, self.eval_terms = train_terms, eval_terms
        self.init_iters, self.update_iters, self.update_freq = init_iters, update_iters, update_freq
        k = kernel_size
        self.random_conv_filter = nn.Parameter(torch.empty(M, M, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        shapes = {"u1": (1, M, 1, k), "v1": (M, 1, k, 1), "u2": (1, M, k, 1), "v2": (M, 1, 1, k),
                  "u3": (1, M, k, k), "v3": (M, 1, 1, 1), "u4": (M, 1, k, k), "v4": (1, M, 1, 1)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape))
        self.register_buffer("correction", torch.tensor([1.0 if k == 1 else correction]))
        self.register_buffer("total_iters", torch.zeros((), dtype=torch.int64))
        self._total_iters = 0  # host copy of the counter: reading the buffer every forward would sync the GPU
        self._init_power_iteration()
        self.reset_parameters()

    # -- parameters and σ ----------------------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:  # what the engine's power iteration and staleness key look at
        return self.random_conv_filter

    def reset_parameters(self) -> None:
        nn.init.normal_(self.random_conv_filter, std=1.0 / math.sqrt(self.max_channels))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.out_channels)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.random_conv_filter.is_meta:  # shape-only construction (parameter counting): nothing to iterate
            return
        with torch.no_grad():
            for i in range(1, 5):
                for side in "uv":
                    buf = getattr(self, f"{side}{i}")
                    buf.copy_(_l2_normalize(torch.randn_like(buf)))
            # the official code iterates on the filter *before* re-drawing it (init-order bug); here, after
            self.update_sigma_iterates(self.skew_filter(), self.init_iters)

    def skew_filter(self, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        P = self.random_conv_filter if P is None else P
        return 0.5 * (P - transpose_filter(P))

    def _uv(self, i: int, dtype):
        u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
        ui, vi = self._RESHAPES[i]
        return u.to(dtype).reshape([u.shape[d] for d in self._dims(ui)]), \
            v.to(dtype).reshape([v.shape[d] for d in self._dims(vi)])

    @staticmethod
    def _dims(idx: str):
        return ["oipq".index(c) for c in idx]

    @torch.no_grad()
    def update_sigma_iterates(self, A: torch.Tensor, n_iter: int) -> None:
        """`n_iter` alternating power steps on each of the four reshapes of A (official `update_sigma`),
        written as contractions instead of broadcast products (no M²k² temporaries)."""
        A = A.detach()
        for _ in range(n_iter):
            for i in range(1, 5):
                ui, vi = self._RESHAPES[i]
                u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
                uu, _ = self._uv(i, A.dtype)
                v.copy_(_l2_normalize(torch.einsum(f"oipq,{ui}->{vi}", A, uu)).reshape(v.shape))
                _, vv = self._uv(i, A.dtype)
                u.copy_(_l2_normalize(torch.einsum(f"oipq,{vi}->{ui}", A, vv)).reshape(u.shape))

    def sigma(self, A: torch.Tensor) -> torch.Tensor:
        """min_i vᵢᵀ Rᵢ uᵢ = min_i Σ A·uᵢ·vᵢ (the four Rayleigh quotients; differentiable in A)."""
        vals = [torch.einsum(f"oipq,{ui},{vi}->", A, *self._uv(i, A.dtype))
                for i, (ui, vi) in self._RESHAPES.items()]
        return torch.stack(vals).min()

    def scaled_filter(self, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """correction·A/σ with the current iterates (no update)."""
        A = self.skew_filter(P)
        return self.correction.to(A.dtype) * A / self.sigma(A)

    # -- the map -------------------------------------------------------------------------------------------
    def series(self, z: torch.Tensor, A_n: torch.Tensor, terms: int) -> torch.Tensor:
        """Σ_{i=0}^{terms} A_nⁱ z / i!, in the official order of operations."""
        out, cur = z, z
        pad = self.kernel_size // 2
        for i in range(1, terms + 1):
            cur = F.conv2d(cur, A_n, padding=pad) / float(i)
            out = out + cur
        return out

    def linear_map(self, x: torch.Tensor, A_n: torch.Tensor, terms: int) -> torch.Tensor:
        """The layer without its bias: space-to-depth, channel padding, T_K(A_n), channel truncation."""
        if self.stride > 1:  # einops "b c (w k1) (h k2) -> b (c k1 k2) w h": channel c·4 + k1·2 + k2
            x = F.pixel_unshuffle(x, self.stride)
        if self.out_channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        z = self.series(x, A_n, terms)
        return z[:, :self.out_channels] if self.out_channels < self.in_channels else z

    def adjoint_map(self, y: torch.Tensor, A_n: torch.Tensor, terms: int) -> torch.Tensor:
        """Adjoint of `linear_map`: T_K(A)ᵀ = T_K(Aᵀ) and Aᵀ is the conv with transpose_filter(A_n) (= −A_n)."""
        if self.out_channels < self.in_channels:
            y = F.pad(y, (0, 0, 0, 0, 0, self.in_channels - self.out_channels))
        z = self.series(y, transpose_filter(A_n), terms)
        z = z[:, :self.in_channels]
        return F.pixel_shuffle(z, self.stride) if self.stride > 1 else z

    def matrix(self, in_shape: Sequence[int], terms: Optional[int] = None) -> torch.Tensor:
        """The bias-free map at one input size as an explicit [out, in] float64 matrix (its impulse responses),
        with `terms` Taylor terms (eval's by default): what exact checks of the layer's bound measure."""
        A_n = self.scaled_filter(self.weight.detach().double()).detach()
        return impulse_jacobian(lambda b: self.linear_map(b, A_n, self.eval_terms if terms is None else terms),
                                in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_iterate(x)
        A = self.skew_filter()
        if self.training:
            n = self.init_iters if self._total_iters % self.update_freq == 0 else self.update_iters
            self.update_sigma_iterates(A, n)
            self._total_iters += 1
            self.total_iters.fill_(self._total_iters)
        A_n = self.correction.to(A.dtype) * A / self.sigma(A)
        z = self.linear_map(x, A_n, self.train_terms if self.training else self.eval_terms)
        return z if self.bias is None else z + self.bias.view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._total_iters = int(self.total_iters)

    # -- bounds (engine protocol) ------------------------------------------------------------------------------
    def _iterate_shape(self, x):
        return (1, *x.shape[-3:])

    def _scaled_for(self, weight):
        # the engine's power iteration calls operator/adjoint with one float64 weight: build A_n once for it
        # keyed by the very tensor object (held, so its storage is not reused): one float64 copy per converge()
        if getattr(self, "_scaled_key", None) is not weight:
            self._scaled_key, self._scaled = weight, self.scaled_filter(weight).detach()
        return self._scaled

    def operator(self, v, weight):  # the eval-mode linear map, used by the engine's float64 power iteration
        return self.linear_map(v, self._scaled_for(weight), self.eval_terms)

    def adjoint(self, u, weight):
        return self.adjoint_map(u, self._scaled_for(weight), self.eval_terms)

    def _bound_tensors(self):
        # the eval map depends on the filter, the σ iterates and the correction: any change makes the bound stale
        return (self.weight, self.correction) + tuple(getattr(self, f"{s}{i}") for i in range(1, 5) for s in "uv")

    def train_bound(self, n_iter: int) -> torch.Tensor:
        """SOC is orthogonal by construction: its losses (and CLL on it) use 1 per layer (no gradient)."""
        return torch.ones((), device=self.weight.device, dtype=self.weight.dtype)

    @staticmethod
    def filter_reshapes(A: torch.Tensor) -> Dict[int, torch.Tensor]:
        """The fantastic four: an [o, i, p, q] filter as (o·p)×(i·q), (o·q)×(i·p), o×(i·p·q), (o·p·q)×i."""
        o, i, p, q = A.shape
        return {1: A.permute(0, 2, 1, 3).reshape(o * p, i * q), 2: A.permute(0, 3, 1, 2).reshape(o * q, i * p),
                3: A.reshape(o, i * p * q), 4: A.permute(0, 2, 3, 1).reshape(o * p * q, i)}

    #: relative allowance between the float64 A_n the bound is computed from and the float32 A_n the forward
    #: pass uses (a few roundings of correction·A/σ: ~1e-7; ×10 to spare)
    FILTER_ROUNDING = 1e-6

    @torch.no_grad()
    def filter_norm_bound(self) -> float:
        """a ≥ ‖A_n‖ of the zero-padded conv at any input size: √(hw)·min_r ‖R_r‖₂ (fantastic four), each ‖R_r‖₂
        a guaranteed Gram-iteration bound (bench/nn/spectral.py) — no stopping rule enters it."""
        A = self.scaled_filter(self.weight.detach().double())
        # A is skew (A[o,i,p,q] = −A[i,o,−p,−q]), so R₂ = −R₁ᵀ and R₄ = −R₃ᵀ up to permutations (equal norms),
        # and a 1×1 filter's reshapes are all A itself: only the distinct norms are bounded.
        distinct = (3,) if self.kernel_size == 1 else (1, 3)
        reshapes = self.filter_reshapes(A)
        norms = [dense_norm_bound(reshapes[r], max_steps=self.FILTER_GRAM_STEPS) for r in distinct]
        return self.kernel_size * min(norms) * (1.0 + self.FILTER_ROUNDING)

    #: Gram steps for a: the tail needs a only to ~1e-3 relative (×1.001 in a is ×1.013 in a 12-term tail)
    FILTER_GRAM_STEPS = 14

    def truncation_bound(self, terms: Optional[int] = None) -> float:
        """1 + Σ_{i>K} aⁱ/i! ≥ ‖T_K(A_n)‖ (K = eval terms unless given)."""
        return 1.0 + taylor_tail(self.filter_norm_bound(), self.eval_terms if terms is None else terms)

    def operator_norm_bound(self) -> float:
        """The eval map's guaranteed bound: the truncation bound (module docstring). The operator the engine's
        power iteration sees is the same eval map, so its estimate must stay below this."""
        self._scaled_key = self._scaled = None
        return self.truncation_bound()


class SOCHead(SkewOrthogonalConv):
    """The official 1-Lipschitz last layer: a 1×1 SOC from the flattened features to the classes, [B, N]."""

    def __init__(self, in_features: int, num_classes: int, **kw):
        super().__init__(in_features, num_classes, kernel_size=1, stride=1, **kw)

    def forward(self, x):
        return super().forward(x.reshape(x.shape[0], -1, 1, 1)).flatten(1)


# ---------------------------------------------------------------------------------------------------------
# Activations: 1-Lipschitz (piecewise orthogonal and continuous)
# ---------------------------------------------------------------------------------------------------------
class MaxMinHalves(nn.Module):
    """SOC's MaxMin: the channel halves a, b give [max(a, b) | min(a, b)] (the engine's MaxMin pairs adjacent
    channels instead)."""

    lipschitz_one = True

    def forward(self, z):
        a, b = z.split(z.shape[1] // 2, 1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class HouseHolder(nn.Module):
    """HH1 (ICLR 2022): per channel pair (x, y) of the halves, identity where x·sin(θ/2) − y·cos(θ/2) ≤ 0, else
    the reflection (x cos θ + y sin θ, x sin θ − y cos θ) across the line at angle θ/2 (continuous on it).
    θ starts at π/2, where HH1 equals MaxMin with the min first."""

    lipschitz_one = True

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"HouseHolder needs an even number of channels, got {channels}")
        self.theta = nn.Parameter(0.5 * math.pi * torch.ones(1, channels // 2, 1, 1))

    def forward(self, z):
        x, y = z.split(z.shape[1] // 2, 1)
        theta = self.theta
        selector = x * torch.sin(0.5 * theta) - y * torch.cos(0.5 * theta)
        a = torch.where(selector > 0, x * torch.cos(theta) + y * torch.sin(theta), x)
        b = torch.where(selector > 0, x * torch.sin(theta) - y * torch.cos(theta), y)
        return torch.cat([a, b], dim=1)


class HouseHolderOrder2(nn.Module):
    """HH2 (ICLR 2022): the plane of each channel pair is cut into four sectors by the angles θ₀..θ₂ (clamped
    to [0, 2π]); the map is the identity, a reflection, a rotation and a reflection on them. The pieces agree
    on the sector boundaries, so the map is continuous and piecewise orthogonal, hence 1-Lipschitz."""

    lipschitz_one = True

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"HouseHolderOrder2 needs an even number of channels, got {channels}")
        g = channels // 2
        self.theta0 = nn.Parameter(math.pi * torch.rand(g))
        self.theta1 = nn.Parameter(math.pi * torch.rand(g))
        self.theta2 = nn.Parameter(math.pi * torch.rand(g))

    def forward(self, z):
        two_pi = 2 * math.pi
        t0 = self.theta0.view(1, -1, 1, 1).clamp(0.0, two_pi)
        t1 = self.theta1.view(1, -1, 1, 1).clamp(0.0, two_pi)
        t2 = self.theta2.view(1, -1, 1, 1).clamp(0.0, two_pi)
        x, y = z.split(z.shape[1] // 2, 1)
        angle = torch.remainder(torch.atan2(y, x) - 0.5 * t0, two_pi)
        ang1, ang2, ang3 = 0.5 * t1, 0.5 * (t1 + t2), 0.5 * (t1 + t2 + two_pi - t1)  # ang4 = 2π
        s1, s2, s3 = angle < ang1, angle < ang2, angle < ang3
        a = torch.where(s1, x, torch.where(s2, x * torch.cos(t0 + t1) + y * torch.sin(t0 + t1),
                        torch.where(s3, x * torch.cos(t2) + y * torch.sin(t2), x * torch.cos(t0) + y * torch.sin(t0))))
        b = torch.where(s1, y, torch.where(s2, x * torch.sin(t0 + t1) - y * torch.cos(t0 + t1),
                        torch.where(s3, -x * torch.sin(t2) + y * torch.cos(t2), x * torch.sin(t0) - y * torch.cos(t0))))
        return torch.cat([a, b], dim=1)


ACTIVATIONS = {"maxmin": lambda c: MaxMinHalves(), "hh1": HouseHolder, "hh2": HouseHolderOrder2}


# ---------------------------------------------------------------------------------------------------------
# LipConvNet
# ---------------------------------------------------------------------------------------------------------
class LipConvNet(LipschitzNet):
    """A LipschitzNet of SOC layers; activation parameters get no weight decay (official `parameter_lists`). Its
    published rule takes every layer as exactly orthogonal (no truncation error), L = 1/min(std)."""

    published_rule_nominal = True

    def param_groups(self, weight_decay: float):
        act = {id(p) for m in self.modules() if isinstance(m, (HouseHolder, HouseHolderOrder2))
               for p in m.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) in act], "weight_decay": 0.0},
                  {"params": [p for p in self.parameters() if id(p) not in act], "weight_decay": weight_decay}]
        return [g for g in groups if g["params"]]


def lipconv_modules(input_shape: Sequence[int], num_classes: int, block_size: int, init_channels: int = 32,
                    activation: str = "hh1", head: str = "soc"):
    """(features, classifier, last_layer_one_lipschitz) of LipConvNet-(5·block_size) (official `LipConvNet`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown SOC activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
    if len(input_shape) != 3:
        raise ValueError(f"LipConvNet needs images (C, H, W), got input shape {tuple(input_shape)}")
    c, h, w = input_shape
    if h % 32 or w % 32:
        raise ValueError(f"LipConvNet halves the input 5 times; {h}×{w} is not divisible by 32")
    layers, in_planes = [], c
    for stage in range(5):
        planes = init_channels if stage == 0 else in_planes
        for i in range(block_size):
            last = i == block_size - 1
            stride, k = (2, 1 if stage == 4 else 3) if last else (1, 3)
            layers += [SkewOrthogonalConv(in_planes, planes * stride, kernel_size=k, stride=stride),
                       ACTIVATIONS[activation](planes * stride)]
            in_planes = planes * stride
    flat = in_planes * (h // 32) * (w // 32)
    classifier, one_lip = make_head(head, flat, num_classes, {"soc": SOCHead}, "LipConvNet")
    return nn.Sequential(*layers), classifier, one_lip


def build_lipconv(input_shape, num_classes, normalize=None, **spec) -> LipConvNet:
    features, classifier, one_lip = lipconv_modules(input_shape, num_classes, **spec)
    return LipConvNet(features, classifier, input_shape, num_classes, normalize=normalize,
                      last_layer_one_lipschitz=one_lip)


def _register_lipconv(name: str, **spec):
    register_spec_arch(name, build_lipconv, f"LipConvNet-{5 * spec['block_size']} (SOC), {spec}",
                       family="lipconv", **spec)


_HEADS = {"": "soc", "-lln": "lln", "-linear": "linear"}
_ACTS = {"": "hh1", "-maxmin": "maxmin", "-hh2": "hh2"}
for _depth in (10, 20):
    for _head_sfx, _head in _HEADS.items():
        for _act_sfx, _act in _ACTS.items():
            _register_lipconv(f"lipconv-{_depth}{_head_sfx}{_act_sfx}", block_size=_depth // 5, activation=_act,
                              head=_head)


__all__ = ["SkewOrthogonalConv", "SOCHead", "MaxMinHalves", "HouseHolder", "HouseHolderOrder2", "LipConvNet",
           "lipconv_modules", "build_lipconv", "taylor_tail", "transpose_filter", "ACTIVATIONS", "CIFAR_MEAN",
           "SOC_STD", "UnconvergedBoundError"]
