"""Sandwich layers: the LBDN family (Wang & Manchester, "Direct Parameterization of Lipschitz-Bounded Deep
Networks", ICML 2023). Official code: acfr/LBDN (`layer.py`, `model.py`), read at d81ed68; reimplemented here.

**Parameterisation.** A free matrix X ∈ R^{c_out×(c_out+c_in)} and a scalar α give, by the Cayley transform of
the tall matrix [U; V] = (α·X/‖X‖_F)ᵀ (U square, A = U − Uᴴ + VᴴV),

    Q = [(I + A)⁻¹(I − A); −2V(I + A)⁻¹]ᵀ = [A | B],    A ∈ C^{c_out×c_out}, B ∈ C^{c_out×c_in},

with orthonormal rows, QQᴴ = AAᴴ + BBᴴ = I **in exact arithmetic** (`cayley`; the transposes are plain, not
conjugate, as in the official code).

* `SandwichFc`:   y = √2·AᵀΨ·relu(√2·Ψ⁻¹B·(s·x) + b),  Ψ = diag(e^ψ) (ψ init 0), s the `scale`.
* `SandwichLin`:  y = B·(s·x) + b (official `AB=False`; `AB=True`: y = 2AᵀB·(s·x) + b).
* `SandwichConv`: the same as SandwichFc per spatial frequency of a **circular** convolution: X is a kernel
  [c_out, c_out+c_in, k, k] whose rfft2 at the input size n, times the phase exp(−2πi·s₀(r + c)/n) that centres
  it (s₀ = (k − 1)//2) and conjugated, gives per frequency ω a matrix X̂(ω); Q̂(ω) = cayley(α·X̂(ω)/‖X̂‖_F)
  (‖X̂‖_F over all frequencies at once). The input is rfft2'd, multiplied per frequency by √2Ψ⁻¹B̂(ω),
  irfft2'd, biased and rectified, rfft2'd again, multiplied by √2Â(ω)ᴴΨ and irfft2'd. Stride 2 is a
  space-to-depth rearrangement first (c_in → 4c_in, channel c·4 + k₁·2 + k₂ as the official einops hook, i.e.
  F.pixel_unshuffle) with the kernel k → max(1, k//2) (3 → 1), as official.

Parameter names and shapes are the official ones (`weight`, `bias`, `psi`, `alpha`), so official state_dicts
load (`load_official_state_dict` for whole DNN checkpoints).

**Faithful quirks (official behaviour is the default).**
* Conv α. The official conv registers `alpha = None` and creates the Parameter inside its first forward, after
  `train.py` has built Adam: conv α is never trained and stays ‖X̂‖_F of the initial kernel at the first input
  size. Here `alpha` exists from construction, NaN until the first forward (the network's shape-recording
  forward, before any optimizer exists) fills it with that same ‖X̂‖_F: by default (`conv_alpha="frozen"`) as a
  **buffer** (in the state_dict under its official name, never in `parameters()`, so never trained and not
  counted, as the official count, taken before the first forward, does not count it); `conv_alpha="trained"`
  makes it an nn.Parameter filled the same way (what the authors presumably meant; not what they ran). A loaded
  or assigned α is never recomputed (the fixtures' α is deliberately stale).
* Q cached in eval. The official layers keep the last Q and reuse it for every eval forward, stale after any
  weight change (its `train.py` flushes it with a training forward each epoch, `evaluate.py` likewise, so no
  published number used a stale Q). Here eval forwards reuse a cached Q **only while the weight and α are
  bit-for-bit those it was computed from** (a device-side snapshot compared as integers: `Tensor._version` is
  not bumped by fused Adam, and a digest would copy the weights to the host on every forward); otherwise Q is
  recomputed (without gradient, as the official eval) and cached. Training forwards recompute Q with gradient.
  A cached Q therefore never outlives its weights, and `converge()` bounds the very cached tensor the eval
  forward multiplies with (below). No option reproduces the stale cache: it could only serve unsound outputs.

**Certificate: what the guarantee rests on.** The published rule takes every layer as exactly 1-Lipschitz. The
computed Q is only approximately row-orthonormal (the Cayley inverse is rounded: about 1e-7 in float32, 1e-15 in
float64, growing with the conditioning of I + A), so each layer certifies a proven constant instead, computed
from the Q the forward actually uses.

*Lemma (sandwich with an inexact Q).* Let Q = [A | B] be any matrix with ‖Q‖² ≤ q², Ψ ≻ 0 diagonal, σ
slope-restricted in [0, 1] (ReLU), and y(x) = √2·AᴴΨσ(√2Ψ⁻¹Bx + b). Then ‖y(x) − y(x′)‖² ≤ (1 + 4q²(q² − 1)₊)·
‖x − x′‖². Proof: write Δx, Δv = √2Ψ⁻¹BΔx, Δz = σ(v) − σ(v′), w = ΨΔz, Δy = √2AᴴΨΔz. Slope restriction gives
Δzᵢ(Δvᵢ − Δzᵢ) ≥ 0, so with weights 2Ψᵢᵢ² = 2e^{2ψᵢ}, 0 ≤ 2⟨Δz, Ψ²(Δv − Δz)⟩ = 2√2·Re⟨Bᴴw, Δx⟩ − 2‖w‖² (*). Since
AAᴴ = QQᴴ − BBᴴ ⪯ q²I − BBᴴ, ‖Δy‖² = 2wᴴAAᴴw ≤ 2q²‖w‖² − 2‖Bᴴw‖². Adding (*):
‖Δy‖² ≤ 2(q² − 1)‖w‖² + ‖Δx‖² − ‖Δx − √2Bᴴw‖² ≤ ‖Δx‖² + 2(q² − 1)₊‖w‖², and (*) with Cauchy–Schwarz gives
‖w‖ ≤ √2‖B‖‖Δx‖ ≤ √2q‖Δx‖. With q² = 1 (exact arithmetic) this is the paper's 1-Lipschitz proof. ∎

* `SandwichFc` is s·√(1 + 4q²(q² − 1)₊)-Lipschitz with q² = 1 + e, e ≥ ‖QQᵀ − I‖ (≥ λ_max(QQᵀ) − 1).
* `SandwichConv`: the same proof with every inner product written by Parseval as a sum over the n × n
  frequencies ((*) holds in the spatial domain, and Ψ² is constant over space, so it commutes with the DFT;
  ‖Δy‖² is the sum of the per-frequency forms 2ŵᴴÃÃᴴŵ), once the operator is identified exactly. For real x
  the layer's linear maps are x ↦ irfft2(M(ω)·rfft2(x)) with M given on the half-plane of frequencies. On the self-conjugate columns
  (ω₂ = 0 and, for even n, ω₂ = n/2), irfft2 keeps only what a real signal can hold (torch documents that
  imaginary parts it cannot represent are ignored): it is the multiplier with the Hermitian average
  M̃(ω) = (M(ω) + conj M(−ω))/2, and since both maps average A and B alike, the layer is exactly the sandwich of
  the Hermitian-consistent Q̃ (Q̂ elsewhere). The bound takes e as the max over every Q̂(ω) on the half-plane
  **and** every average Q̃ on those columns, so it also covers an FFT backend that would keep one of the two
  conjugate copies instead of averaging. Space-to-depth is a permutation (an isometry). The per-frequency
  bound is exact up to e: the circular conv's norm is the max over frequencies, with no embedding slack.
* `SandwichLin`: s·‖B‖ (or s·‖2AᵀB‖ with AB), by Gram iteration (bench/nn/spectral.py) of the B the forward
  uses; no orthogonality is assumed at all.

*Computing e.* E = fl(QQᴴ) − I is formed in float64/complex128 from the stored Q (float32 values up-cast
exactly); its error is ≤ γ_k‖Q‖_F² (γ_k = 2(k + 4)u, any summation order, k = c_in + c_out), subtracting I is
exact near 1 (Sterbenz) and is allowed 2u·max|E_ii| anyway, and the Hermitian average costs ≤ 4u‖Q‖_F². ‖E‖ is
bounded by a few Gram-iteration steps (`gram_norm_bound`: every step is a proven bound; e only needs a few
per cent, since the layer constant is 1 + O(e)). So the certified constant is 1 + (proven allowance), never an
assumed 1: measured on the full DNN at initialisation, e = 0.7…1.5e-6 per layer for float32 Q (constants
1 + 1.3…3e-6, K_up = 1 + 1.9e-5 for the 9 layers); for float64 Q, 1e-14 on small layers up to ~3e-9 on the
4096 → 2048 SandwichFc, where the γ_k‖Q‖_F² rounding allowance dominates.

*Which Q.* `converge()` bounds the Q of the parameters' dtype — the cached tensor the eval forward uses,
installed by `converge()` itself — and also the Q computed in float64 from the same values (a float64 copy of
the model, `certify_dtype: float64`, finds that one in the copied cache and multiplies with exactly it); the
layer's constant is the larger. The FFT of the *weight* needs no error analysis: the certificate bounds the
matrices that came out of it. The FFTs of the *activations* (relative error O(u·log n) per transform), like the
matmuls and convolutions of every other family, are rounding of the forward pass itself, which no family bounds.

*Power column.* The engine's power iteration runs on the linear map v ↦ Q̂v (the circular conv with the
[A | B] kernel, or the dense Q; SandwichLin: B), whose guaranteed bound is √(1 + e); the layer's power-iteration
constant maps its estimate through the same lemma (≈ 1: all singular values of Q are ≈ 1).

**Network** (official `DNN`, the certified model of the README's Tables 3–4): 32×32 inputs: SandwichConv
c→64 (scale √γ), 64→64 s2, 64→128, 128→128 s2, 128→256, 256→256 s2, flatten 4096, SandwichFc 4096→2048,
2048→2048, then the head; 64×64 inputs add 256→512, 512→512 s2 (flatten 8192). Heads: LLN (default,
SandwichFc 2048→1024 with scale √γ, then `NormalizedLinear`), `-lin` (SandwichFc 2048→1024, SandwichLin
1024→N with scale √γ: 1-Lipschitz, top1 − top2 > √2·ε·γ), `-linear` (SandwichFc 2048→1024, an unconstrained
nn.Linear: CLL on Sandwich, pairwise ‖W_i − W_j‖). γ = 1 in the certified runs. With LLN: 25,806,375 parameters
for 100 classes (the reference notes' 25.8 M), 39,149,195 for Tiny-ImageNet's 200 (39.1 M), counted as the
official `train.py` counts them (before the first forward, so without the conv α's, buffers here).
"""
from __future__ import annotations

import abc
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.archs import register_spec_arch
from bench.nn.bound import LipschitzNet, PairwiseBound
from bench.nn.families.common import SHARED_HEADS, make_head
from bench.nn.families.sll import SLL_AUGMENT
from bench.nn.lipschitz import PowerIterated
from bench.nn.spectral import UNIT_ROUNDOFF, dense_norm_bound, gram_norm_bound

SQRT2 = math.sqrt(2.0)
_U = UNIT_ROUNDOFF

# ---------------------------------------------------------------------------------------------------------
# The Cayley transform and the guaranteed deviation of its computed result from orthonormality
# ---------------------------------------------------------------------------------------------------------


def cayley(W: torch.Tensor) -> torch.Tensor:
    """Row-orthonormal Q from a wide W [..., m, n] (n ≥ m), real or complex: the Cayley transform of the tall
    Wᵀ = [U; V] (U m × m), A = U − Uᴴ + VᴴV, Q = [(I + A)⁻¹(I − A); −2V(I + A)⁻¹]ᵀ (plain transposes)."""
    m, n = W.shape[-2:]
    if n < m:
        raise ValueError(f"cayley expects a wide matrix (rows ≤ columns), got {m}×{n}")
    tall = W.transpose(-1, -2)
    U, V = tall[..., :m, :], tall[..., m:, :]
    eye = torch.eye(m, dtype=W.dtype, device=W.device)
    A = U - U.mH + V.mH @ V
    inv = torch.linalg.inv(eye + A)
    return torch.cat([inv @ (eye - A), -2 * V @ inv], dim=-2).transpose(-1, -2)


#: Gram-iteration steps for ‖QQᴴ − I‖: e enters the layer constant as 1 + O(e), so a few per cent suffice
#: (rank^{1/2^{T+1}} ≤ 1.04 for rank 2048 at T = 7); every step is itself a proven bound
DEVIATION_GRAM_STEPS = 8
#: ... and stops once a step improves every bound of the batch by less than this (relative)
DEVIATION_RTOL = 0.02
#: matrices per chunk of the batched deviation bound (caps the complex128 working memory)
_CHUNK_ELEMENTS = 1 << 24


def orthonormality_deviation(Q: torch.Tensor) -> float:
    """e ≥ max_b ‖Q_b Q_bᴴ − I‖ (guaranteed) over a batch of stored matrices Q [..., m, k], real or complex,
    of any dtype (up-cast exactly to float64/complex128). Module docstring, "Computing e"."""
    Q = Q.detach()
    Q = Q.to(torch.complex128 if Q.is_complex() else torch.float64)
    m, k = Q.shape[-2:]
    Q = Q.reshape(-1, m, k)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, m * max(m, k)))
    eye = torch.eye(m, dtype=Q.dtype, device=Q.device)
    worst = 0.0
    for start in range(0, Q.shape[0], per_chunk):
        q = Q[start:start + per_chunk]
        E = q @ q.mH - eye
        frob2 = (torch.linalg.matrix_norm(q, "fro").double() * (1.0 + 2.0 * (m * k + 2) * _U)).square() * (1 + 4 * _U)
        diag = E.diagonal(dim1=-2, dim2=-1).abs().amax(dim=-1).double()
        allowance = (2.0 * (k + 4) * _U + 4.0 * _U) * frob2 + 2.0 * _U * diag + 1e-300
        bound = gram_norm_bound(E, max_steps=DEVIATION_GRAM_STEPS, rtol=DEVIATION_RTOL) + allowance
        worst = max(worst, float(bound.max()))
    return worst * (1.0 + 1e-14)


def sandwich_constant(e: float) -> float:
    """√(1 + 4(1 + e)·e) rounded up: the Lipschitz constant of a sandwich layer whose Q has ‖Q‖² ≤ 1 + e
    (module docstring, Lemma)."""
    e = max(0.0, float(e))
    return math.sqrt(1.0 + 4.0 * (1.0 + e) * e) * (1.0 + 16 * _U)


def _power_constant(p: float) -> float:
    """The lemma's constant at an estimated ‖Q‖ = p (the power column; from below, not a certificate)."""
    return math.sqrt(1.0 + 4.0 * p * p * max(0.0, p * p - 1.0))


# ---------------------------------------------------------------------------------------------------------
# The eval-mode Q cache, keyed by the exact bits of the weight and α
# ---------------------------------------------------------------------------------------------------------
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    view = _INT_VIEW[a.element_size()]
    return bool(torch.equal(a.detach().reshape(-1).view(view), b.reshape(-1).view(view)))


class _SandwichBase(PowerIterated, nn.Module):
    """Shared machinery: Q from (weight, α) as the official code computes it, the eval cache, the two Qs the
    certificate covers, and the protocol methods. Subclasses give `_compute_q(weight, alpha)`."""

    scale: float

    def _init_sandwich(self) -> None:
        self._init_power_iteration()
        self._q_cache: Dict[torch.dtype, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._op_key = self._op_q = None
        self.deviation_bound = math.nan

    # -- Q ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _compute_q(self, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The layer's row-orthonormal Q (or its per-frequency stack) from the free weight and α."""

    def _cached_q(self, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Q for (weight, α) without gradient: the cached one if it was computed from exactly these bits, else
        computed now and cached (one entry per dtype)."""
        entry = self._q_cache.get(weight.dtype)
        if entry is not None and _same_bits(weight, entry[0]) and _same_bits(alpha, entry[1]):
            return entry[2]
        with torch.no_grad():
            q = self._compute_q(weight.detach(), alpha.detach())
        self._q_cache[weight.dtype] = (weight.detach().clone(), alpha.detach().clone(), q)
        return q

    def current_q(self) -> torch.Tensor:
        """The Q of the next forward: with gradient in training mode (recomputed every time, as official),
        the bit-keyed cache in eval mode."""
        if self.training:
            return self._compute_q(self.weight, self.alpha)
        return self._cached_q(self.weight, self.alpha)

    def _certified_qs(self):
        """The Qs a forward can use: the parameters' dtype (the eval cache) and float64 (a float64 copy)."""
        qs = [self._cached_q(self.weight, self.alpha)]
        if self.weight.dtype != torch.float64:
            qs.append(self._cached_q(self.weight.detach().double(), self.alpha.detach().double()))
        return qs

    def _q_for_operator(self, weight: torch.Tensor) -> torch.Tensor:
        """Q for the weight the engine's power iteration passes (a float64 copy), held by identity."""
        if self._op_key is not weight:
            self._op_key, self._op_q = weight, self._cached_q(weight, self.alpha.detach().to(weight.dtype))
        return self._op_q

    # -- protocol -----------------------------------------------------------------------------------------
    def train_bound(self, n_iter: int) -> torch.Tensor:
        """1 by construction: the nominal constant LBDN (and CLL on it) trains with; no gradient."""
        return torch.ones((), device=self.weight.device, dtype=self.weight.dtype)

    def _bound_tensors(self):
        return (self.weight, self.alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._op_key = self._op_q = None


class _SandwichLayer(_SandwichBase):
    """The sandwich layers proper (Fc, Conv): the constant follows from e ≥ ‖QQᴴ − I‖ through the lemma."""

    def _deviation_qs(self):
        return self._certified_qs()

    def operator_norm_bound(self) -> float:
        """√(1 + e) ≥ ‖Q‖ of the operator v ↦ Qv, e the guaranteed deviation of every Q a forward can use."""
        self._op_key = self._op_q = None
        self.deviation_bound = max(orthonormality_deviation(q) for q in self._deviation_qs())
        return math.sqrt(1.0 + self.deviation_bound) * (1.0 + 4 * _U)

    def layer_constants(self, norm_upper: float, norm_power: float):
        s = abs(float(self.scale))
        return s * sandwich_constant(self.deviation_bound), s * _power_constant(norm_power)


# ---------------------------------------------------------------------------------------------------------
# Dense layers
# ---------------------------------------------------------------------------------------------------------
class _SandwichDense(_SandwichLayer):
    def _init_dense(self, in_features: int, out_features: int, bias: bool, scale: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features + out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # nn.Linear's initialisation (the official layers subclass nn.Linear(in + out, out))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features + out_features)
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():  # official: alpha.data = weight.norm() (a trained 0-dim parameter)
            self.alpha = nn.Parameter(torch.linalg.vector_norm(self.weight.detach()).clone())

    def _compute_q(self, weight, alpha):
        return cayley(alpha * weight / torch.linalg.vector_norm(weight))

    def _iterate_shape(self, x):
        return (self.in_features + self.out_features,)

    def operator(self, v, weight):  # v [n] or [b, n] → Qv
        return v @ self._q_for_operator(weight).T

    def adjoint(self, u, weight):
        return u @ self._q_for_operator(weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"


class SandwichFc(_SandwichDense):
    """y = √2·AᵀΨ·relu(√2·Ψ⁻¹B·(s·x) + b) (official `SandwichFc`): weight [out, in + out], bias [out], α (0-dim,
    init ‖weight‖_F, trained), ψ [out] (init 0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0):
        self._init_dense(in_features, out_features, bias, scale)
        self.psi = nn.Parameter(torch.zeros(out_features))
        self._init_sandwich()

    def forward(self, x):
        self._ensure_iterate(x)
        Q = self.current_q()
        fout = self.out_features
        h = F.linear(self.scale * x, Q[:, fout:])                    # B x
        h = h * torch.exp(-self.psi) * SQRT2                        # √2 Ψ⁻¹ B x
        if self.bias is not None:
            h = h + self.bias
        h = F.relu(h) * torch.exp(self.psi)                         # Ψ z
        return SQRT2 * F.linear(h, Q[:, :fout].T)                   # √2 Aᵀ Ψ z


class SandwichLin(_SandwichDense):
    """y = B·(s·x) + b (official `SandwichLin`, AB=False) or y = 2AᵀB·(s·x) + b (AB=True): a linear layer of norm
    ≤ s·‖Q‖. Certifies s·(guaranteed ‖B‖ or ‖2AᵀB‖), no orthogonality assumed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0, AB: bool = False):
        self._init_dense(in_features, out_features, bias, scale)
        self.AB = bool(AB)
        self._init_sandwich()

    def forward(self, x):
        self._ensure_iterate(x)
        Q = self.current_q()
        fout = self.out_features
        y = F.linear(self.scale * x, Q[:, fout:])
        if self.AB:
            y = 2 * F.linear(y, Q[:, :fout].T)
        return y + self.bias if self.bias is not None else y

    def _iterate_shape(self, x):
        return (self.in_features,)

    def operator(self, v, weight):
        Q = self._q_for_operator(weight)
        fout = self.out_features
        y = v @ Q[:, fout:].T
        return 2 * (y @ Q[:, :fout]) if self.AB else y

    def adjoint(self, u, weight):
        Q = self._q_for_operator(weight)
        fout = self.out_features
        if self.AB:
            u = 2 * (u @ Q[:, :fout].T)
        return u @ Q[:, fout:]

    def operator_norm_bound(self) -> float:
        """max over the Qs a forward can use of a Gram-iteration bound of B (or of 2AᵀB, formed in float64 with
        its product allowance 2γ_k‖A‖_F‖B‖_F, k = out)."""
        self._op_key = self._op_q = None
        fout, best = self.out_features, 0.0
        for Q in self._certified_qs():
            Q = Q.detach().double()
            A, B = Q[:, :fout], Q[:, fout:]
            if not self.AB:
                best = max(best, dense_norm_bound(B))
                continue
            fa = float(torch.linalg.matrix_norm(A, "fro")) * (1 + 4 * (A.numel() + 2) * _U)
            fb = float(torch.linalg.matrix_norm(B, "fro")) * (1 + 4 * (B.numel() + 2) * _U)
            allowance = 2.0 * (fout + 4) * _U * fa * fb
            best = max(best, 2.0 * (dense_norm_bound(A.T @ B) + allowance) * (1 + 1e-14))
        return best

    def layer_constants(self, norm_upper: float, norm_power: float):
        s = abs(float(self.scale))
        return s * norm_upper * (1 + 4 * _U), s * norm_power


# ---------------------------------------------------------------------------------------------------------
# The FFT convolution
# ---------------------------------------------------------------------------------------------------------
def _spectral(M: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """irfft2(M(ω)·rfft2(x)(ω)) for real x [b, i, n, n] and M [n·(n//2 + 1), o, i]: [b, o, n, n]."""
    b, i = x.shape[:2]
    m = n // 2 + 1
    X = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(n * m, i, b)
    Y = (M @ X).reshape(n, m, M.shape[-2], b).permute(3, 2, 0, 1)
    return torch.fft.irfft2(Y, s=(n, n))


def fft_shift(n: int, s: int, dtype: torch.dtype, device) -> torch.Tensor:
    """exp(2πi·s·(r + c)/n) on the n × (n//2 + 1) half-plane, as [n·(n//2 + 1), 1, 1] (official
    `fft_shift_matrix(n, s)`, computed in float64)."""
    r = torch.arange(n, dtype=torch.float64, device=device)
    c = torch.arange(n // 2 + 1, dtype=torch.float64, device=device)
    angle = 2.0 * math.pi * s * torch.remainder(r[:, None] + c[None, :], n) / n
    return torch.polar(torch.ones_like(angle), angle).to(dtype).reshape(-1, 1, 1)


class SandwichConv(_SandwichLayer):
    """The FFT (circular) Sandwich convolution (official `SandwichConv`): weight [out, in′ + out, k′, k′]
    (stride 2: in′ = 4·in, k′ = max(1, k//2)), bias [out], ψ [out] (init 0), α (0-dim; module docstring for its
    `conv_alpha` modes). The operator acts on square n × n inputs of the size the first forward sees."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, bias: bool = True,
                 scale: float = 1.0, conv_alpha: str = "frozen"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"SandwichConv supports stride 1 or 2 (space-to-depth), got {stride}")
        if conv_alpha not in ("frozen", "trained"):
            raise ValueError(f"conv_alpha must be 'frozen' (official) or 'trained', got {conv_alpha!r}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.cin = in_channels * stride * stride
        self.kernel_size = max(1, kernel_size // 2) if stride == 2 else kernel_size
        self.scale, self.conv_alpha = float(scale), conv_alpha
        k, chn = self.kernel_size, self.cin + out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, chn, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))      # nn.Conv2d's initialisation
        if self.bias is not None:
            bound = 1.0 / math.sqrt(chn * k * k)
            nn.init.uniform_(self.bias, -bound, bound)
        self.psi = nn.Parameter(torch.zeros(out_channels))
        alpha = torch.tensor(float("nan"))                          # filled by the first forward
        if conv_alpha == "trained":
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        self._alpha_ready = False
        self._init_sandwich()

    # -- Q ----------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """n: the (space-to-depth) spatial size the operator acts on, recorded by the first forward."""
        self._require_iterate()
        return int(self.power_iterate.shape[-1])

    def _kernel_fft(self, weight: torch.Tensor, n: int) -> torch.Tensor:
        """X̂ [n·(n//2 + 1), out, in′ + out]: shift(n, −s₀)·conj(rfft2(weight, (n, n))) (official `wfft`)."""
        cout, chn = weight.shape[:2]
        wfft = torch.fft.rfft2(weight, s=(n, n)).reshape(cout, chn, -1).permute(2, 0, 1).conj()
        return fft_shift(n, -((self.kernel_size - 1) // 2), wfft.dtype, weight.device) * wfft

    def _compute_q(self, weight, alpha):
        wfft = self._kernel_fft(weight, self.size)
        return cayley(alpha * wfft / torch.linalg.vector_norm(wfft))

    def _deviation_qs(self):
        """Every Q̂(ω) of the half-plane, plus the Hermitian averages (Q̂(ω) + conj Q̂(−ω))/2 on the
        self-conjugate columns ω₂ = 0 and n/2 (module docstring)."""
        n = self.size
        m = n // 2 + 1
        out = []
        for q in self._certified_qs():
            grid = q.reshape(n, m, *q.shape[-2:])
            cols = [0] + ([n // 2] if n % 2 == 0 and n > 1 else [])
            mirror = torch.remainder(-torch.arange(n, device=q.device), n)
            avg = torch.stack([0.5 * (grid[:, c] + grid[mirror, c].conj()) for c in cols], dim=1)
            out.append(torch.cat([q, avg.reshape(-1, *q.shape[-2:])]))
        return out

    # -- the map --------------------------------------------------------------------------------------------
    def _iterate_shape(self, x):
        n = x.shape[-1] // self.stride
        return (1, self.cin + self.out_channels, n, n)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Checks the input size, records it on the first forward (the iterate), and applies space-to-depth."""
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"SandwichConv needs square inputs (official), got {tuple(x.shape[-2:])}")
        if x.shape[-1] % self.stride:
            raise ValueError(f"stride-2 SandwichConv needs an even input size, got {x.shape[-1]}")
        self._ensure_iterate(x)
        if x.shape[-1] != self.size * self.stride:
            raise ValueError(f"{type(self).__name__} was built for {self.size * self.stride}×"
                             f"{self.size * self.stride} inputs (its Q and bound are per frequency of that size); "
                             f"got {x.shape[-1]}×{x.shape[-1]}")
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)       # einops "b c (w k1) (h k2) -> b (c k1 k2) w h"
        return x

    def _fill_alpha(self) -> None:
        """Official: α = ‖X̂‖_F of the kernel at the first forward (afterwards never recomputed)."""
        if self._alpha_ready:
            return
        with torch.no_grad():
            if bool(torch.isnan(self.alpha)):
                self.alpha.copy_(torch.linalg.vector_norm(self._kernel_fft(self.weight.detach(), self.size)))
        self._alpha_ready = True

    def forward(self, x):
        x = self._prepare(x)
        self._fill_alpha()
        n, cout = x.shape[-1], self.out_channels
        x = self.scale * x
        Q = self.current_q()
        A, B = Q[..., :cout], Q[..., cout:]
        cdt = Q.dtype
        M1 = (SQRT2 * torch.exp(-self.psi)).to(cdt)[:, None] * B                    # √2 Ψ⁻¹ B̂
        h = _spectral(M1, x, n)
        if self.bias is not None:
            h = h + self.bias[:, None, None]
        M2 = A.mH * (SQRT2 * torch.exp(self.psi)).to(cdt)[None, None, :]            # √2 Âᴴ Ψ
        return _spectral(M2, F.relu(h), n)

    def operator(self, v, weight):  # the circular conv with the [A | B] kernel: [b, in′ + out, n, n] → [b, out, n, n]
        return _spectral(self._q_for_operator(weight), v, v.shape[-1])

    def adjoint(self, u, weight):
        return _spectral(self._q_for_operator(weight).mH, u, u.shape[-1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._alpha_ready = not bool(torch.isnan(self.alpha))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"scale={self.scale:g}, conv_alpha={self.conv_alpha}")


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------
class SandwichNet(LipschitzNet):
    """A LipschitzNet of Sandwich layers. Its published rule (official `train.py` with --cert_acc) takes every
    layer as exactly 1-Lipschitz and the net as γ-Lipschitz: LLN min_j (z_top − z_j)/‖ŵ_top − ŵ_j‖ > ε·γ,
    otherwise top1 − top2 > √2·γ·ε."""

    published_rule_nominal = True
    gamma = 1.0

    def nominal_bound(self) -> PairwiseBound:
        bound = super().nominal_bound()
        return PairwiseBound(bound.K_up * float(self.gamma), bound.W)


#: official DNN conv stacks (out channels, stride) per input size
DNN_CONVS = {
    32: ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2)),
    64: ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2)),
}
DNN_FCS = (2048, 2048, 1024)


def sandwich_modules(input_shape: Sequence[int], num_classes: int, head: str = "lln", gamma: float = 1.0,
                     convs: Optional[Sequence[Tuple[int, int]]] = None, fcs: Sequence[int] = DNN_FCS,
                     kernel_size: int = 3, conv_alpha: str = "frozen"):
    """(features, classifier, last_layer_one_lipschitz) of the official `DNN`; `convs` [(out, stride)] and `fcs`
    (the widths of the SandwichFc layers, the last one feeding the head) default to the DNN's for 32×32 / 64×64
    inputs. Module indices follow the official `model` Sequential (classifier = the last index)."""
    if len(input_shape) != 3:
        raise ValueError(f"the Sandwich DNN needs images (C, H, W), got input shape {tuple(input_shape)}")
    c, h, w = input_shape
    if h != w:
        raise ValueError(f"Sandwich convolutions need square inputs, got {h}×{w}")
    if convs is None:
        if h not in DNN_CONVS:
            raise ValueError(f"the official DNN is defined for 32×32 and 64×64 inputs, got {h}×{w}")
        convs = DNN_CONVS[h]
    g = math.sqrt(gamma)
    own = {"lin": lambda width, classes: SandwichLin(width, classes, scale=g)}
    if head not in own and head not in SHARED_HEADS:
        raise ValueError(f"unknown Sandwich head {head!r}; use lln, lin or linear")
    layers, cin, size = [], c, h
    for i, (cout, stride) in enumerate(convs):
        if size % stride:
            raise ValueError(f"a stride-{stride} Sandwich conv needs a size divisible by {stride}, got {size}")
        layers.append(SandwichConv(cin, cout, kernel_size, stride=stride, scale=g if i == 0 else 1.0,
                                   conv_alpha=conv_alpha))
        cin, size = cout, size // stride
    layers.append(nn.Flatten())
    width = cin * size * size
    for j, out in enumerate(fcs):
        last = j == len(fcs) - 1
        layers.append(SandwichFc(width, out, scale=g if (last and head == "lln") else 1.0))
        width = out
    classifier, one_lip = make_head(head, width, num_classes, own, "Sandwich")
    return nn.Sequential(*layers), classifier, one_lip


def build_sandwich(input_shape, num_classes, normalize=None, gamma: float = 1.0, **spec) -> SandwichNet:
    features, classifier, one_lip = sandwich_modules(input_shape, num_classes, gamma=gamma, **spec)
    net = SandwichNet(features, classifier, input_shape, num_classes, normalize=normalize,
                      last_layer_one_lipschitz=one_lip)
    net.gamma = float(gamma)
    return net


def load_official_state_dict(net: LipschitzNet, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load an official LBDN `DNN` checkpoint (`model.<i>.<name>`, saved after a forward, so conv α is there)
    into a net built by `build_sandwich` with the same head: official index i < len(features) is features.i,
    the last one the classifier. Our power-iteration buffers keep their values; any other mismatch raises."""
    n_feat = len(net.features)
    mapped = {}
    for key, value in state_dict.items():
        if not key.startswith("model."):
            raise KeyError(f"not an official DNN key: {key!r}")
        idx, rest = key[len("model."):].split(".", 1)
        i = int(idx)
        mapped[f"features.{i}.{rest}" if i < n_feat else f"classifier.{rest}"] = value
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    ours = ("power_iterate", "sigma_bound", "sigma_power", "norm_mean", "norm_std")
    missing = [k for k in missing if not k.rsplit(".", 1)[-1] in ours]
    if missing or unexpected:
        raise KeyError(f"official checkpoint mismatch: missing {missing}, unexpected {unexpected}")


# The official input handling (acfr/LBDN dataset.py), shared by every loss trained on the family: ToTensor − mean
# (std 1; `--normalized` is off in the certified runs) and SLL's augmentation pipeline, whose values dataset.py
# takes over (reflect-padded crop with padding 4 on 32×32 and 64×64 alike, flip, the same ColorJitter).
LBDN_MEANS = {
    "cifar10": [0.4914, 0.4822, 0.4465],
    "cifar100": [0.5071, 0.4865, 0.4409],
    "tinyimagenet": [0.485, 0.456, 0.406],
}
LBDN_AUGMENT = SLL_AUGMENT


#: the official certified pipeline (README, `main.py`/`train.py` defaults): 400 epochs, batch 256 (drop_last), Adam
#: 0.01, no weight decay, the per-step triangular lr (methods/lbdn.py has the details)
LBDN_PIPELINE = {"epochs": 400, "protocol_epochs": 400, "batch_size": 256, "drop_last": True, "optimizer": "adam",
                 "lr": 0.01, "weight_decay": 0.0, "lr_schedule": "triangular", "lr_milestones": []}


def sandwich_inputs(dataset: str) -> dict:
    """The official input handling for `dataset` as config keys (`normalize`, `augment`)."""
    return {"normalize": [list(LBDN_MEANS[dataset]), [1.0, 1.0, 1.0]], "augment": LBDN_AUGMENT}


def _register(name: str, **spec):
    # the DNN is the README's certified CIFAR-100 / Tiny-ImageNet model (32×32 or 64×64 images)
    register_spec_arch(name, build_sandwich, f"Sandwich (LBDN) DNN {name}: {spec}", family="sandwich",
                       data="image", default_dataset="cifar100", **spec)


_register("sandwich", head="lln")              # the certified default (official --LLN)
_register("sandwich-lin", head="lin")          # 1-Lipschitz SandwichLin head: top1 − top2 > √2·ε
_register("sandwich-linear", head="linear")    # CLL on Sandwich: unconstrained last layer, pairwise bound


__all__ = ["cayley", "orthonormality_deviation", "sandwich_constant", "SandwichConv", "SandwichFc", "SandwichLin",
           "SandwichNet", "sandwich_modules", "LBDN_MEANS", "LBDN_AUGMENT", "LBDN_PIPELINE", "sandwich_inputs",
           "build_sandwich", "load_official_state_dict", "DNN_CONVS", "DNN_FCS"]
