"""SLL: SDP-based Lipschitz Layers (Araujo, Havens, Delattre, Allauzen, Hu, "A Unified Algebraic Perspective on
Lipschitz Neural Networks", ICLR 2023). Official code: araujoalexandre/Lipschitz-SLL-Networks.

**Layer.** A residual step with a diagonal rescaling (paper Theorem 3, eq. for the SLL):

    f(x) = x − 2·Wᵀ T⁻¹ σ(W x + b),   σ = ReLU,   T = diag(t),

W a 3×3 convolution (stride 1, padding 1) from C to `inner` channels (official `conv_inner_dim`, 5) or a dense
matrix [inner, C] (`dense_inner_dim`, 2048). T comes from a weighted Gershgorin bound on W Wᵀ:

* ``variant="current"`` (the default: the official code at 87865db, after 1abe5e1 "fix numerical stability &
  Lipschitzness", Oct 2023):
  - dense: q = exp(q_param), t_i = Σ_j |(W Wᵀ)_ij|·q_j/q_i, and T⁻¹ = safe_inv(t) (1/0 ↦ 0: a zero row of W
    contributes nothing);
  - conv: t_i = Σ_{j,a,b} |(K⋆K)_{i,j,a,b}|, K⋆K = conv2d(K, K, padding=k−1) [inner, inner, 2k−1, 2k−1]. The
    official code multiplies by exp(−q_i) and exp(q_i) on the *same* index, so q cancels: the parameter `q` is
    kept (official state_dicts load, its shape is checked) and has no effect (it gets no gradient; Adam leaves it).
* ``variant="paper"`` (the paper-era code, a478875; the reference paper's CLL fork `sll/` is numerically the
  same): q = |q_param| (no exp), the layer is x − Wᵀ·(2/t′)·σ(W x + b) with
  - conv: t′_i = Σ_{j,a,b} |q_j·(K⋆K)_{i,j,a,b}| / q_i (q used; no safe_inv);
  - dense: t′_i = Σ_j |(W Wᵀ)_ij|·q_j/(q_i + 10⁻⁶). The 10⁻⁶ sits only in q⁻¹, so t′ is *smaller* than the
    Gershgorin sum and the layer is **not** exactly 1-Lipschitz (SLL authors: Prach issue #2, arXiv v2
    App. D). Parameter names differ from the current code as the official modules' do: dense `weights`, and
    biases of shape [inner] (current: `weight`, biases [1, inner(, 1, 1)]).

**Why T makes the layer 1-Lipschitz in exact arithmetic (the official argument).** With Q = diag(q) > 0,
T − W Wᵀ is symmetric and similar to T − Q⁻¹(W Wᵀ)Q, whose row i has diagonal t_i − (WWᵀ)_ii ≥ Σ_{j≠i}
|(WWᵀ)_ij|·q_j/q_i: by Gershgorin its (real) eigenvalues are ≥ 0, so T ⪰ W Wᵀ, i.e. ‖T^{-1/2} W‖ ≤ 1. For the
conv, W Wᵀ on the zero-padded domain has at entry ((i, p), (j, p′)) a tap of K⋆K (or 0 at the border), so row
(i, p) sums to at most Σ_{j,a,b} |(K⋆K)_{ijab}|·q_j/q_i = t_i: the same argument with Q constant over pixels.

**What a certificate multiplies in (the proof; lipbench never assumes the constant 1).** Write the layer as
f(x) = x − 2·Wᵀ S² σ(W x + b), S = diag(s) ≥ 0 with s² = T⁻¹ (current) or 1/t′ (paper), and M = S W.

*Claim.* f is max(1, 2‖M‖² − 1)-Lipschitz, for every bias.

*Proof.* For x, y, let a = W x + b, c = W y + b. ReLU is monotone and 1-Lipschitz, so σ(a) − σ(c) = D (a − c)
with D = diag(d_k), d_k = (σ(a_k) − σ(c_k))/(a_k − c_k) ∈ [0, 1] (d_k = 0 where a_k = c_k). Hence
f(x) − f(y) = J_D (x − y) with J_D = I − 2 Wᵀ S² D W = I − 2 Mᵀ D M (S and D are diagonal, so S²D = S D S).
J_D is symmetric, and 0 ⪯ Mᵀ D M ⪯ Mᵀ M ⪯ ‖M‖² I (congruence of 0 ⪯ D ⪯ I), so the spectrum of J_D lies in
[1 − 2‖M‖², 1] and ‖J_D‖ ≤ max(1, 2‖M‖² − 1). No differentiability is needed (this is a mean-value identity
with an exact D), and the bound is attained for D = I. ∎ (So the SLL condition T ⪰ W Wᵀ ⇔ ‖M‖ ≤ 1 gives 1.)
The Jacobian where it exists is J_D with D = diag(σ′), which is why it is symmetric with eigenvalues in
[1 − 2‖M‖², 1]: the layer is 1-Lipschitz at x iff its smallest eigenvalue is ≥ −1.

*Computing ‖M‖ from above.* `operator_norm_bound()` is a guaranteed bound ū ≥ ‖S W‖ and `layer_constants`
maps it to max(1, 2ū² − 1) (rounded up); the engine's power iteration runs on the same operator v ↦ S W v
(its estimate, from below, is the "published" column). Since ‖S₁ W‖ ≤ ‖S₂ W‖ whenever 0 ≤ S₁ ≤ S₂ (S₁ W =
C S₂ W with ‖C‖ ≤ 1), any s̄ ≥ s entrywise gives a valid bound; s̄ = t_lo^{-1/2} with t_lo ≤ t a proven lower
bound, computed in float64 (float32 parameters are up-cast exactly) as follows (u = 2⁻⁵³):

1. G = W Wᵀ (dense) or K⋆K (conv, by explicit per-offset dot products, not a conv algorithm whose error
   constant is library-specific). For a dot product of length L in any order, with or without FMA,
   |fl(G_ij) − G_ij| ≤ γ_L·(|W||W|ᵀ)_ij ≤ γ_L·‖w_i‖‖w_j‖ (Cauchy–Schwarz; w_i the i-th row, or the i-th output
   filter, whose overlap with a shifted filter has at most its norm), γ_L = 2(L + 4)u (bench/nn/spectral.py),
   and the computed row norms are raised by 2(n + 2)u over their rounding; so |G_ij| ≥ g_ij =
   max(0, |fl(G_ij)| − γ_L(1 + 8u)·‖w_i‖‖w_j‖).
2. t_i ≥ (Σ_j g_ij·w_j)/d_i with w_j ≥ 0 the numerator weights (exp(q_j); 1; |q_j|) and d_i the denominator
   (exp(q_i); 1; |q_i| or |q_i| + 10⁻⁶, the constant in the parameters' dtype). Computed weights are scaled
   by (1 ∓ 8u) (exp is accurate to ≤ 1 ulp), and the computed sum of m non-negative terms (m = inner, or
   inner·(2k−1)² for the conv) and the few products and the division are covered by a factor (1 − η),
   η = 2(m + 16)u: t_lo = (1 − η)·fl(Σ_j g_ij w̲_j)/d̄_i ≤ t_i.
3. s̄ = (1 + 4u)/√t_lo (0 where t_lo = ∞, i.e. a zero denominator in the paper's conv, where the layer's
   coefficient is 0 too; for the current variant 0 on rows of W that are exactly zero, where safe_inv gives
   0 and the row contributes nothing; ∞ where t_lo ≤ 0 or is NaN otherwise: no bound, and `converge()` raises
   SoundnessError — only a degenerate paper-era layer gets there, e.g. a zero row, where its forward is NaN).
4. ū = ‖fl(S̄ W)‖ bounded by `dense_norm_bound` (Gram iteration with its rounding allowance), or for the conv
   `conv_norm_bound` of the kernel with output channel o scaled by s̄_o (left-multiplying the zero-padded
   conv by a diagonal that is constant per output channel is that conv), plus Weyl's ‖E‖ for the rounding of
   the scaling: elementwise |E| ≤ u/(1 − u)·|fl(S̄W)|, ‖E‖ ≤ ‖E‖_F for the dense matrix and ≤ k·‖E‖_F for a
   k×k conv (‖Σ_taps shift ⊗ E_tap‖ ≤ Σ‖E_tap‖_F ≤ k‖E‖_F).
For the current variant ‖S W‖ ≤ 1 exactly, so ū exceeds 1 only by the allowances (≤ 1e-9 relative on trained
layers): its constant is 1 or 1 + O(1e-9). (The circular-embedding conv bound keeps this: the Gershgorin
argument holds verbatim for the circular conv, whose W Wᵀ has the aliased taps of K⋆K.) The paper's dense
layer exceeds 1 where its 10⁻⁶ deficit beats the Gershgorin slack: with orthonormal rows (W Wᵀ = I, no slack)
‖S W‖² = max_i (q_i + 10⁻⁶)/q_i, e.g. a Lipschitz constant of 1.02 at q_i = 10⁻⁴; it is certified as such.

**Floating point: what the guarantee covers.** It is a bound on the Lipschitz constant of the layer *as a
mathematical function of its stored parameters*, with t computed from them in exact arithmetic or in float64
(any summation order; the allowances above). The forward pass computes t in the parameters' dtype; in float32
its rounding (relative ~10⁻⁷ on trained layers, not bounded a priori: |W Wᵀ| entries cancel) perturbs the
coefficient exactly as the float32 rounding of the convolutions perturbs the output, and neither is covered,
as for every other layer of lipbench (the forward pass is not interval arithmetic). `certify_dtype: float64`
evaluates the network with t in float64, which the bound covers.

**Network** (official `LipschitzNetwork`): zero-pad the input channels 3 → w, `n_conv` conv SLLs at full
resolution, `AvgPool2d(4, divisor_override=4)` (a 4×4 sum / 4: 1-Lipschitz), flatten (w·H/4·W/4: 8×8 on CIFAR,
16×16 on Tiny-ImageNet), `n_dense` dense SLLs, then the head: LLN (`LinearNormalized`, the current default;
certified pairwise with ‖ŵ_i − ŵ_j‖), `-trunc` (the first N coordinates, 1-Lipschitz: the paper-era default,
√2 rule) or `-linear` (an unconstrained nn.Linear, CLL on SLL; pairwise ‖W_i − W_j‖). The paper-era layers
are the `-paper` architectures (`sll-xl-paper`, `sll-xl-paper-trunc`, …): the variant is part of the
architecture's name, so a run folder's config rebuilds its model with no extra key.

**Sizes** (n_conv, n_dense, w, dense inner; conv inner 5), official `main.py --model-name`:
    sll-s 20/7/45/2048 (41.4 M on CIFAR-10), sll-m 30/10/60/2048 (78.8 M), sll-l 50/10/90/2048 (118.3 M),
    sll-xl 70/15/120/2048 (236.4 M; 950.3 M on Tiny-ImageNet, where the paper's text says 1.1 B).
Almost all parameters are in the dense layers.
"""
from __future__ import annotations

import abc
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.archs import register_spec_arch
from bench.nn.bound import LipschitzNet
from bench.nn.families.common import make_head, padded_residual_stack, truncate_head
from bench.nn.lipschitz import PowerIterated
from bench.nn.spectral import _frobenius_up, _gamma, conv_norm_bound, dense_norm_bound

UNIT_ROUNDOFF = 2.0 ** -53
VARIANTS = ("current", "paper")
#: the paper-era dense layer's ε, added to |q_i| in q⁻¹ only (a478875 `epsilon=1e-6`)
PAPER_EPSILON = 1e-6


def safe_inv(t: torch.Tensor) -> torch.Tensor:
    """1/t with 1/0 ↦ 0 (official `safe_inv`)."""
    return torch.where(t == 0, torch.zeros_like(t), 1.0 / torch.where(t == 0, torch.ones_like(t), t))


def _round_up(value: float, ulps: int = 4) -> float:
    for _ in range(ulps):
        value = math.nextafter(value, math.inf)
    return value


def kernel_gram(kernel: torch.Tensor) -> torch.Tensor:
    """K⋆K = conv2d(K, K, padding=k−1) [inner, inner, 2k−1, 2k−1] by explicit dot products per offset (each
    entry one sum of ≤ C·k² products, so the rounding bound γ_L of a dot product applies whatever the
    device's conv algorithm)."""
    o, c, k1, k2 = kernel.shape
    out = kernel.new_zeros(o, o, 2 * k1 - 1, 2 * k2 - 1)
    for a in range(2 * k1 - 1):
        for b in range(2 * k2 - 1):
            da, db = a - (k1 - 1), b - (k2 - 1)  # out[i, j, a, b] = Σ K[i, c, u + da, v + db]·K[j, c, u, v]
            u0, u1 = max(0, -da), min(k1, k1 - da)
            v0, v1 = max(0, -db), min(k2, k2 - db)
            left = kernel[:, :, u0 + da:u1 + da, v0 + db:v1 + db].reshape(o, -1)
            right = kernel[:, :, u0:u1, v0:v1].reshape(o, -1)
            out[:, :, a, b] = left @ right.T
    return out


class SLLLayer(PowerIterated, nn.Module):
    """x − 2·Wᵀ S² relu(W x + b), S² = T⁻¹ (current) or 1/t′ (paper). Subclasses give W (`apply_w`, `apply_wt`),
    the Gram quantities and the parameter layout. The engine's bounds are on the operator v ↦ S W v."""

    variant: str
    weight: torch.Tensor
    q: nn.Parameter
    bias: nn.Parameter

    def _init_sll(self, variant: str) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown SLL variant {variant!r}; use one of {VARIANTS}")
        self.variant = variant
        self._scale_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._caching = False
        self._init_power_iteration()

    # -- the layer ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def gram(self, weight: torch.Tensor) -> torch.Tensor:
        """W Wᵀ (dense) or K⋆K (conv) as the official `compute_t` forms it."""

    def denominators(self, weight: torch.Tensor) -> torch.Tensor:
        """t (current) or t′ (paper) per inner unit, as the official code computes it."""
        q, G = self.q.to(weight.dtype), self.gram(weight)
        extra = (1,) * (G.dim() - 2)
        if self.variant == "current":
            if G.dim() == 4:  # conv: exp(−q_i)·|·|·exp(q_i) on the same index cancels
                return G.abs().sum(dim=(1, 2, 3))
            return (torch.exp(-q)[:, None] * G * torch.exp(q)[None, :]).abs().sum(dim=1)
        q_abs = q.abs()
        if G.dim() == 4:
            return (q_abs.view(1, -1, *extra) * G).abs().sum(dim=(1, 2, 3)) / q_abs
        q_inv = 1.0 / (q_abs + PAPER_EPSILON)
        return (q_inv[:, None] * G * q_abs[None, :]).abs().sum(dim=1)

    def compute_t(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The official current-code `compute_t()`: T⁻¹ = safe_inv(t) (already inverted). For the paper variant,
        the per-unit factor T/2 = 1/t′ of its x − Wᵀ·(2/t′)·σ(·)."""
        t = self.denominators(self.weight if weight is None else weight)
        return safe_inv(t) if self.variant == "current" else 1.0 / t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_iterate(x)
        w = self.weight
        coef = 2.0 * self.compute_t(w)
        res = F.relu(self.apply_w(x, w) + self._bias_view())
        return x - self.apply_wt(coef.view(1, -1, *(1,) * (x.dim() - 2)) * res, w)

    # -- bounds (engine protocol) -----------------------------------------------------------------------------
    def train_bound(self, n_iter: int) -> torch.Tensor:
        """1: the family trains with its nominal constant (no gradient, no power iteration)."""
        return torch.ones((), device=self.weight.device, dtype=self.weight.dtype)

    def _bound_tensors(self):
        # T is computed from W and q (for the current conv q cancels, but a stale key costs only a recompute)
        return (self.weight, self.q)

    def _scale(self, weight: torch.Tensor) -> torch.Tensor:
        """s = √(coefficient/2) for `weight`. Inside `block_power_iteration` (whose float64 copy of the weight
        cannot change under it) it is computed once per copy; anywhere else afresh, so an operator applied to a
        weight changed in place never sees a stale s."""
        cached = self._scale_cache
        if cached is not None and cached[0] is weight:
            return cached[1]
        s = torch.sqrt(self.compute_t(weight))
        if self._caching:
            self._scale_cache = (weight, s)
        return s

    def operator(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        s = self._scale(weight)
        out = self.apply_w(v, weight)
        return s.view(1, -1, *(1,) * (out.dim() - 2)) * out

    def adjoint(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        s = self._scale(weight)
        return self.apply_wt(s.view(1, -1, *(1,) * (u.dim() - 2)) * u, weight)

    @torch.no_grad()
    def block_power_iteration(self, *args, **kwargs) -> float:
        self._caching = True
        try:
            return super().block_power_iteration(*args, **kwargs)
        finally:
            self._caching, self._scale_cache = False, None  # no float64 copy of the weight outlives the iteration

    def _weights_and_denominators(self):
        """(numerator weights w_j, denominators d_i) of t_i = Σ_j |G_ij|·w_j / d_i, float64 as computed."""
        q = self.q.detach().to(torch.float64)
        if self.variant == "current":
            if self.kind == "conv":
                ones = torch.ones_like(q)
                return ones, ones
            return torch.exp(q), torch.exp(q)
        q_abs = q.abs()
        if self.kind == "conv":
            return q_abs, q_abs
        eps = float(torch.tensor(PAPER_EPSILON, dtype=self.q.dtype))  # the constant in the parameters' dtype
        return q_abs, q_abs + eps

    @torch.no_grad()
    def scale_upper(self) -> torch.Tensor:
        """s̄ ≥ s entrywise, float64 (module docstring, steps 1–3)."""
        u = UNIT_ROUNDOFF
        w = self.weight.detach().to(torch.float64)
        G, length = self._gram_exact_dot(w)
        rows = w.reshape(len(w), -1)
        norms = torch.linalg.vector_norm(rows, dim=1) * (1.0 + 2.0 * (rows.shape[1] + 2) * u)  # ≥ ‖w_i‖
        A = norms[:, None] * norms[None, :]                  # ≥ (|W||W|ᵀ)_ij by Cauchy–Schwarz (every tap)
        A = A.view(*A.shape, *(1,) * (G.dim() - 2))
        gamma = _gamma(length)
        c = gamma * (1.0 + 8 * u)
        g = (G.abs() - c * A).clamp_min(0.0)
        numer, denom = self._weights_and_denominators()
        numer_lo, denom_up = numer * (1.0 - 8 * u), denom * (1.0 + 8 * u)
        extra = (1,) * (g.dim() - 2)
        terms = g * numer_lo.view(1, -1, *extra)
        m = terms[0].numel()
        eta = 2.0 * (m + 16) * u
        t_lo = terms.reshape(len(terms), -1).sum(dim=1) * (1.0 - eta) / denom_up
        s = (1.0 + 4 * u) / torch.sqrt(t_lo)
        s = torch.where(t_lo == math.inf, torch.zeros_like(s), s)
        s = torch.where((t_lo <= 0) | torch.isnan(t_lo), torch.full_like(s, math.inf), s)
        if self.variant == "current":  # safe_inv: an exactly zero row contributes nothing
            zero_row = (w.reshape(len(w), -1) == 0).all(dim=1)
            s = torch.where(zero_row, torch.zeros_like(s), s)
        return s

    @abc.abstractmethod
    def _gram_exact_dot(self, w: torch.Tensor):
        """(G, L): the Gram quantity by dot products of length ≤ L (float64)."""

    def operator_norm_bound(self) -> float:
        """ū ≥ ‖S W‖ (module docstring, step 4)."""
        s = self.scale_upper()
        if not bool(torch.isfinite(s).all()):
            return math.inf
        scaled = s.view(-1, *(1,) * (self.weight.dim() - 1)) * self.weight.detach().to(torch.float64)
        frob = float(_frobenius_up(scaled.reshape(len(scaled), -1)))
        slack = (1.0 + 4 * UNIT_ROUNDOFF) * UNIT_ROUNDOFF / (1.0 - UNIT_ROUNDOFF) * frob * self._rounding_factor()
        return _round_up(self._scaled_norm_bound(scaled) + slack)

    def layer_constants(self, norm_upper: float, norm_power: float) -> Tuple[float, float]:
        """(max(1, 2ū² − 1) rounded up, max(1, 2p² − 1)) (module docstring: the claim)."""
        if not math.isfinite(norm_upper):
            upper = math.inf
        elif norm_upper <= 1.0:
            upper = 1.0                     # 2ū² − 1 ≤ 1 exactly
        else:                               # fl(ū·ū) is within ½ ulp, ×2 is exact, −1 within ½ ulp: round up
            upper = max(1.0, _round_up(_round_up(2.0 * norm_upper * norm_upper) - 1.0))
        return upper, max(1.0, 2.0 * norm_power * norm_power - 1.0)

    # -- official state dicts ---------------------------------------------------------------------------------
    def load_official(self, state_dict) -> None:
        """Load an official module's parameters (names and shapes as the official code's; our power-iteration
        buffers are not in it)."""
        own = dict(self.named_parameters())
        if set(state_dict) != set(own):
            raise KeyError(f"expected official parameters {sorted(own)}, got {sorted(state_dict)}")
        with torch.no_grad():
            for name, value in state_dict.items():
                value = torch.as_tensor(value)
                if tuple(value.shape) != tuple(own[name].shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(own[name].shape)}")
                own[name].copy_(value)
        self._bound_key = None


def _xavier_and_bias(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Official init: xavier_normal weight, bias uniform in ±1/√fan_in."""
    nn.init.xavier_normal_(weight)
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    bound = 1 / np.sqrt(fan_in)
    nn.init.uniform_(bias, -bound, bound)


class SLLConv(SLLLayer):
    """Conv SLL (official `SDPBasedLipschitzConvLayer`, k = 3, stride 1, padding 1): kernel [inner, C, 3, 3], bias
    [1, inner, 1, 1] (current) or [inner] (paper), q [inner]. Initialised in the official order (with the same
    seed it draws the same parameters)."""

    kind = "conv"

    def __init__(self, channels: int, inner: int = 5, kernel_size: int = 3, variant: str = "current"):
        super().__init__()
        if kernel_size != 3:
            raise ValueError("the official conv SLL has padding 1 hard-coded: kernel_size must be 3")
        if variant == "current":
            self.kernel = nn.Parameter(torch.randn(inner, channels, kernel_size, kernel_size))
            self.bias = nn.Parameter(torch.empty(1, inner, 1, 1))
        else:
            self.kernel = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
            self.bias = nn.Parameter(torch.empty(inner))
        self.q = nn.Parameter(torch.randn(inner))
        _xavier_and_bias(self.kernel, self.bias)
        self._init_sll(variant)

    @property
    def weight(self):
        return self.kernel

    def _bias_view(self):
        return self.bias.view(1, -1, 1, 1)

    def _iterate_shape(self, x):
        return (1, *x.shape[-3:])

    def apply_w(self, v, weight):
        return F.conv2d(v, weight, padding=1)

    def apply_wt(self, u, weight):  # the adjoint of the 'same' zero-padded stride-1 conv at any size
        return F.conv_transpose2d(u, weight, padding=1)

    def gram(self, weight):
        return F.conv2d(weight, weight, padding=weight.shape[-1] - 1)

    def _gram_exact_dot(self, w):
        c, k = w.shape[1], w.shape[-1]
        return kernel_gram(w), c * k * k

    def _rounding_factor(self) -> float:
        return float(self.kernel.shape[-1])

    def _scaled_norm_bound(self, scaled: torch.Tensor) -> float:
        return conv_norm_bound(scaled, self.operator_input_shape[-2:], 1, 1)


class SLLLinear(SLLLayer):
    """Dense SLL (official `SDPBasedLipschitzLinearLayer`): weight [inner, C] (`weights` in the paper variant),
    bias [1, inner] (current) or [inner] (paper), q [inner] (randn; paper: rand)."""

    kind = "linear"

    def __init__(self, features: int, inner: int, variant: str = "current"):
        super().__init__()
        if variant == "current":
            self.weight = nn.Parameter(torch.empty(inner, features))
            self.bias = nn.Parameter(torch.empty(1, inner))
            self.q = nn.Parameter(torch.randn(inner))
            _xavier_and_bias(self.weight, self.bias)
        else:
            self.weights = nn.Parameter(torch.empty(inner, features))
            self.bias = nn.Parameter(torch.empty(inner))
            self.q = nn.Parameter(torch.rand(inner))
            _xavier_and_bias(self.weights, self.bias)
        self._init_sll(variant)

    def __getattr__(self, name):
        # the paper-era parameter is `weights`; `weight` names it for the engine (a property would clash with
        # registering the current variant's `weight` parameter)
        if name == "weight":
            params = self.__dict__["_parameters"]
            if "weights" in params:
                return params["weights"]
        return super().__getattr__(name)

    def _bias_view(self):
        return self.bias

    def _iterate_shape(self, x):
        return (1, x.shape[-1])

    def apply_w(self, v, weight):
        return F.linear(v, weight)

    def apply_wt(self, u, weight):
        return F.linear(u, weight.t())

    def gram(self, weight):
        return weight @ weight.T

    def _gram_exact_dot(self, w):
        return w @ w.T, w.shape[1]

    def _rounding_factor(self) -> float:
        return 1.0

    def _scaled_norm_bound(self, scaled: torch.Tensor) -> float:
        return dense_norm_bound(scaled)


class SLLNet(LipschitzNet):
    """A LipschitzNet of SLL layers. Its published rule (official `eval_certified`) takes every layer as exactly
    1-Lipschitz."""

    published_rule_nominal = True


#: n_conv, n_dense, w, dense inner (official main.py --model-name small/medium/large/xlarge); conv inner 5
# The official pipeline's input handling (core/data/readers.py), shared by every loss trained on the family (SLL's
# own and CLL's): the dataset mean subtracted in-model (`--shift_data`, std 1) and the training augmentation
# RandomCrop(S, padding 4, reflect) → RandomHorizontalFlip → ColorJitter(brightness 0.1, contrast (0.5, 2),
# saturation (0.3, 2), hue 0.02), padding 4 on Tiny-ImageNet too, no rotation (bench/data/augment.py's mapping).
SLL_JITTER = [0.1, [0.5, 2.0], [0.3, 2.0], 0.02]
SLL_AUGMENT = {"padding": 4, "padding_mode": "reflect", "jitter": SLL_JITTER, "degrees": 0.0, "flip": True}
SLL_MEANS = {
    "cifar10": [0.4913, 0.4821, 0.4465],
    "cifar100": [0.5071, 0.4865, 0.4409],
    "tinyimagenet": [0.485, 0.456, 0.406],
}


#: the official training pipeline (`main.py` defaults, `core/trainer.py`): 1000 epochs, batch 64 × 4 GPUs = 256, Adam
#: 0.01 with betas (0.5, 0.9), no weight decay, the triangular lr stepped per step (methods/sll.py has the details)
SLL_PIPELINE = {"epochs": 1000, "protocol_epochs": 1000, "batch_size": 256, "optimizer": "adam", "lr": 0.01,
                "betas": [0.5, 0.9], "weight_decay": 0.0, "lr_schedule": "triangular", "lr_milestones": []}


def sll_inputs(dataset: str) -> dict:
    """The official input handling for `dataset` as config keys (`normalize`, `augment`)."""
    return {"normalize": [list(SLL_MEANS[dataset]), [1.0, 1.0, 1.0]], "augment": SLL_AUGMENT}


SLL_SIZES = {
    "s": (20, 7, 45, 2048),
    "m": (30, 10, 60, 2048),
    "l": (50, 10, 90, 2048),
    "xl": (70, 15, 120, 2048),
}
HEADS = {"": "lln", "-trunc": "trunc", "-linear": "linear"}


def sll_modules(input_shape: Sequence[int], num_classes: int, n_conv: int, n_dense: int, w: int,
                dense_inner: int, conv_inner: int = 5, head: str = "lln", variant: str = "current"):
    """(features, classifier, last_layer_one_lipschitz) of the official `LipschitzNetwork` for this input shape."""
    features, flat = padded_residual_stack(input_shape, "SLL", w, lambda: SLLConv(w, conv_inner, variant=variant),
                                           n_conv, lambda f: SLLLinear(f, dense_inner, variant=variant), n_dense)
    classifier, one_lip = make_head(head, flat, num_classes, {"trunc": truncate_head}, "SLL")
    return features, classifier, one_lip


def build_sll(input_shape, num_classes, normalize=None, **spec) -> SLLNet:
    features, classifier, one_lip = sll_modules(input_shape, num_classes, **spec)
    return SLLNet(features, classifier, input_shape, num_classes, normalize=normalize,
                  last_layer_one_lipschitz=one_lip)


def _register_sll(name: str, **spec):
    register_spec_arch(name, build_sll, f"SLL network {name}: {spec}", family="sll", **spec)


for _size, (_nc, _nd, _w, _di) in SLL_SIZES.items():
    for _vsfx, _variant in {"": "current", "-paper": "paper"}.items():
        for _hsfx, _head in HEADS.items():
            _register_sll(f"sll-{_size}{_vsfx}{_hsfx}", n_conv=_nc, n_dense=_nd, w=_w, dense_inner=_di,
                          head=_head, variant=_variant)


__all__ = ["SLLLayer", "SLLConv", "SLLLinear", "SLLNet", "SLL_SIZES", "SLL_AUGMENT", "SLL_MEANS", "SLL_PIPELINE",
           "sll_inputs", "sll_modules", "build_sll", "safe_inv",
           "kernel_gram", "VARIANTS"]
