"""CPL: Convex Potential Layers (Meunier, Delattre, Araujo, Allauzen, "A Dynamical System Perspective for
Lipschitz Neural Networks", ICML 2022). Official code: MILES-PSL/Convex-Potential-Layer.

**Layer.** One explicit Euler step on a convex potential (paper eq. for the CPL):

    z = x − h·Wᵀ σ(W x + b),   σ = ReLU,   h = 2 / (σ_max(W)² + ε),   ε = 1e-4,

with W a 3×3 convolution (stride 1, padding 1) from C channels to `inner` channels (the official `conv_size`
argument, default 5: an inner width, not a kernel size) or a dense matrix (inner = `n_features`). The Jacobian
I − h·WᵀDW (D = diag(σ′) ∈ [0, 1]) is symmetric with eigenvalues in [1 − h·σ_max², 1], so the layer is
1-Lipschitz when h ≤ 2/σ_max². σ_max comes from power iteration on a persistent iterate: 1 step per training
forward (gradient through σ = ⟨W u, v⟩, as `SpectralNormPowerMethod`), and in eval the cached `eval_sv_max`,
computed with 100 steps when empty; a training forward empties it.

**Certificate (sound).** A power-iterated σ can be below σ_max, and then the layer is max(1, h·σ_max² − 1)-
Lipschitz. `converge()` runs the engine's block power iteration in float64 (on the layer's real input shape
instead of the official fixed 32×32) and stores the Rayleigh value as `eval_sv_max` (the σ that eval uses), and
certifies max(1, h·σ̄² − 1) with σ̄ ≥ ‖W‖ the guaranteed bound (bench/nn/spectral.py: the circular embedding
for the conv, Gram iteration for the dense layer) and h inflated by 1e-6 for its float32 rounding: exactly 1
whenever σ̄² < σ² + ε, i.e. when the guaranteed bound is within ε/(2σ²) of the power estimate. The published rule takes every layer as 1: top1 − top2 > √2·ε·L
(truncation head) or min_j (z_top − z_j)/‖ŵ_top − ŵ_j‖ > ε·L (LLN), L = 1/min(std).

**Network** (`ConvexPotentialLayerNetwork`): zero-pad the input channels 3 → C, `depth` conv CPLs,
`AvgPool2d(4, divisor_override=4)` (a 4×4 sum / 4: 1-Lipschitz), flatten (C·H/4·W/4), `depth_linear` dense CPLs,
then the first N coordinates (truncation, default, 1-Lipschitz), LLN (`-lln`), or an unconstrained linear
layer (`-linear`, the reference paper's CLL runs: `use_vanilla_linear`).

**Sizes** (depth, C, depth_linear, n_features), inner width 5:
    cpl-s 20/45/7/2048 (41.3 M), cpl-m 30/60/10/2048, cpl-l 90/60/15/2048, cpl-xl 70/120/15/4096 (472.4 M).
CPL-XL follows the reference paper's fork (mlosch/CLL `cpl/train_cll_on_cifar10.sh`: --depth 70 --num-channels
120). The sources conflict (reference/peer-methods.md §3): LBDN's copy of the family configs gives XL as 120
conv layers of 70 channels (276 M parameters), and the CPL paper's own S/M/L/XL table could not be checked; S
(20 conv, 45 channels, 7 × 2048) agrees across sources. The official dense CPL's unused `alpha` parameter is
left out (one parameter per dense layer fewer than the official count).

The loss and the recipe are the method's (methods/cpl.py); CLL trains the `-linear` variants (methods/cll.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.archs import register_spec_arch
from bench.nn.bound import LipschitzNet
from bench.nn.families.common import ChannelPad, SumPool, Truncate, make_head, padded_residual_stack, truncate_head
from bench.nn.lipschitz import PowerIterated
from bench.nn.spectral import conv_norm_bound, dense_norm_bound


def _normalize(a: torch.Tensor) -> torch.Tensor:
    """The official `SpectralNormPowerMethod.normalize`: a / (‖a‖ + 1e-12)."""
    return a / (torch.sqrt((a ** 2).sum()) + 1e-12)


class ConvexPotential(PowerIterated, nn.Module):
    """x − h·Wᵀ relu(W x + b); subclasses give the linear operator W (`operator`) and its adjoint."""

    epsilon: float

    def _init_potential(self, epsilon: float, train_iters: int, eval_iters: int) -> None:
        self.epsilon, self.train_iters, self.eval_iters = epsilon, train_iters, eval_iters
        self.register_buffer("eval_sv_max", torch.zeros(1))
        self._init_power_iteration()

    def official_sigma(self, n_iter: int) -> torch.Tensor:
        """`SpectralNormPowerMethod`: n steps v = normalize(W u), u ← normalize(Wᵀ v); σ = ⟨W u, v⟩. The new u
        is stored without a gradient; σ keeps the gradient through W (in both W u and v)."""
        if n_iter < 1:
            raise ValueError("CPL's power method needs at least one step")
        w, u, v = self.weight, self.power_iterate.clone(), None  # a copy: the buffer is updated in place below
        for _ in range(n_iter):
            v = _normalize(self.operator(u, w))
            with torch.no_grad():
                u = _normalize(self.adjoint(v, w))
        self.power_iterate.copy_(u)
        return torch.sum(self.operator(u, w) * v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_iterate(x)
        res = self.adjoint(F.relu(self.operator(x, self.weight) + self._bias_view()), self.weight)
        if self.training:
            self.eval_sv_max.zero_()
            sv = self.official_sigma(self.train_iters)
        else:
            if bool(self.eval_sv_max == 0):  # empty after construction or a training forward (official)
                with torch.no_grad():
                    self.eval_sv_max.fill_(float(self.official_sigma(self.eval_iters)))
            sv = self.eval_sv_max
        h = 2.0 / (sv ** 2 + self.epsilon)
        return x - h * res

    # -- bounds (engine protocol) -------------------------------------------------------------------------
    def train_bound(self, n_iter: int) -> torch.Tensor:
        """1 by construction (the nominal constant CPL and CLL-on-CPL train with; no gradient)."""
        return torch.ones((), device=self.weight.device, dtype=self.weight.dtype)

    def _bound_tensors(self):
        # eval uses `eval_sv_max` for h: a training forward (which empties it) makes the bounds stale
        return (self.weight, self.eval_sv_max)

    #: relative allowance between h computed here in float64 and the float32 h of the forward pass
    H_ROUNDING = 1e-6
    #: a stored eval σ within this relative distance below the converged one is kept (rounding, not a new σ)
    SIGMA_RTOL = 1e-9

    def layer_constants(self, norm_upper: float, norm_power: float):
        """The converged Rayleigh σ becomes `eval_sv_max` (the σ eval uses, in the buffer's dtype) when that is
        empty (after a training forward) or below it by more than the convergence tolerance; a σ that agrees (a
        loaded checkpoint's) is kept, so re-converging a reloaded model never moves its map by an ulp. The layer
        is then max(1, h·‖W‖² − 1)-Lipschitz with h = 2/(σ² + ε) for whatever σ eval uses: guaranteed with
        ‖W‖ ≤ norm_upper, the power column with norm_power (≈ 1)."""
        stored = float(self.eval_sv_max)
        if stored == 0.0 or norm_power > stored * (1.0 + self.SIGMA_RTOL):
            self.eval_sv_max.fill_(norm_power)
        sv = float(self.eval_sv_max)
        h = 2.0 / (sv * sv + self.epsilon) * (1.0 + self.H_ROUNDING)
        self.weight_norm_bound = norm_upper
        return max(1.0, h * norm_upper ** 2 - 1.0), max(1.0, h * norm_power ** 2 - 1.0)


class ConvexPotentialConv(ConvexPotential):
    """Conv CPL (official `ConvexPotentialLayerConv`, stride 1): kernel [inner, C, 3, 3], bias [inner]."""

    def __init__(self, channels: int, inner: int, kernel_size: int = 3, epsilon: float = 1e-4,
                 train_iters: int = 1, eval_iters: int = 100):
        super().__init__()
        if kernel_size != 3:
            raise ValueError("the official conv CPL has padding 1 hard-coded: kernel_size must be 3")
        self.kernel = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(inner))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))
        bound = 1 / math.sqrt(channels * kernel_size * kernel_size)
        nn.init.uniform_(self.bias, -bound, bound)
        self._init_potential(epsilon, train_iters, eval_iters)

    @property
    def weight(self):
        return self.kernel

    def _bias_view(self):
        return self.bias.view(1, -1, 1, 1)

    def _iterate_shape(self, x):
        return (1, *x.shape[-3:])

    def operator(self, v, weight):
        return F.conv2d(v, weight, padding=1)

    def operator_norm_bound(self) -> float:
        return conv_norm_bound(self.weight, self.operator_input_shape[-2:], 1, 1)

    def adjoint(self, u, weight):  # exact for stride 1 and 'same' padding at any size
        return F.conv_transpose2d(u, weight, padding=1)


class ConvexPotentialLinear(ConvexPotential):
    """Dense CPL (official `ConvexPotentialLayerLinear`): weights [inner, C], bias [inner]."""

    def __init__(self, features: int, inner: int, epsilon: float = 1e-4, train_iters: int = 1,
                 eval_iters: int = 100):
        super().__init__()
        self.weights = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(inner))
        nn.init.kaiming_uniform_(self.weights, a=math.sqrt(5))
        bound = 1 / math.sqrt(features)
        nn.init.uniform_(self.bias, -bound, bound)
        self._init_potential(epsilon, train_iters, eval_iters)

    @property
    def weight(self):
        return self.weights

    def _bias_view(self):
        return self.bias

    def _iterate_shape(self, x):
        return (1, x.shape[-1])

    def operator(self, v, weight):
        return F.linear(v, weight)

    def operator_norm_bound(self) -> float:
        return dense_norm_bound(self.weight)

    def adjoint(self, u, weight):
        return F.linear(u, weight.t())


class CPLNet(LipschitzNet):
    """A LipschitzNet of convex potential layers. Its published rule (official `certified_accuracy[_LLN]`) takes
    every layer as exactly 1-Lipschitz."""

    published_rule_nominal = True


CPL_SIZES = {  # depth, channels, depth_linear, n_features (see the module docstring for the XL conflict)
    "s": (20, 45, 7, 2048),
    "m": (30, 60, 10, 2048),
    "l": (90, 60, 15, 2048),
    "xl": (70, 120, 15, 4096),
}


def cpl_modules(input_shape: Sequence[int], num_classes: int, depth: int, channels: int, depth_linear: int,
                n_features: int, inner: int = 5, head: str = "trunc"):
    """(features, classifier, last_layer_one_lipschitz) of `ConvexPotentialLayerNetwork`."""
    features, flat = padded_residual_stack(input_shape, "CPL", channels, lambda: ConvexPotentialConv(channels, inner),
                                           depth, lambda f: ConvexPotentialLinear(f, n_features), depth_linear)
    classifier, one_lip = make_head(head, flat, num_classes, {"trunc": truncate_head}, "CPL")
    return features, classifier, one_lip


def build_cpl(input_shape, num_classes, normalize=None, **spec) -> CPLNet:
    features, classifier, one_lip = cpl_modules(input_shape, num_classes, **spec)
    return CPLNet(features, classifier, input_shape, num_classes, normalize=normalize,
                  last_layer_one_lipschitz=one_lip)


def _register_cpl(name: str, **spec):
    register_spec_arch(name, build_cpl, f"CPL network {name}: {spec}", family="cpl", **spec)


for _size, (_d, _c, _dl, _nf) in CPL_SIZES.items():
    for _sfx, _head in {"": "trunc", "-lln": "lln", "-linear": "linear"}.items():
        _register_cpl(f"cpl-{_size}{_sfx}", depth=_d, channels=_c, depth_linear=_dl, n_features=_nf, head=_head)


__all__ = ["ConvexPotential", "ConvexPotentialConv", "ConvexPotentialLinear", "CPLNet", "CPL_SIZES", "cpl_modules",
           "build_cpl", "ChannelPad", "SumPool", "Truncate"]
