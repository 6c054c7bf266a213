"""Guaranteed upper bounds on spectral norms: the only numbers a certificate multiplies in.

Every bound here is ≥ the exact spectral norm of the stored operator (float32 weights are up-cast to float64
exactly) by a proof that survives floating-point rounding. No bound rests on the stopping rule of an iteration:
each intermediate value of the Gram iteration below is itself a valid bound, so stopping early costs tightness,
never soundness. Power iteration approaches σ from below and can stall under a cluster of top singular values
(trained weights have them); it is kept for training and for the "published" column only (lipschitz.py).

Notation: ‖·‖ the spectral norm, ‖·‖_F the Frobenius norm, u = 2⁻⁵³ the float64 unit roundoff, Aᴴ the
conjugate transpose.

**Gram iteration** (Delattre, Barthélemy, Araujo, Allauzen, ICML 2023). For any matrix B, ‖B‖² = ‖BᴴB‖ and
‖B‖ ≤ ‖B‖_F. With B₀ = A and B_{t+1} = B_tᴴB_t, ‖A‖ = ‖B_T‖^{1/2^T} ≤ ‖B_T‖_F^{1/2^T}, and the ratio of the
two is (Σᵢ (σᵢ/σ₁)^{2^{T+1}})^{1/2^{T+1}} ≤ rank^{1/2^{T+1}}: it tends to 1 doubly exponentially, a cluster of r
equal top singular values costing a factor r^{1/2^{T+1}} (1 + 3·10⁻⁸ for r = 64, T = 25).

*Rounding.* We store B_{t+1} = 2^{−e_{t+1}}·fl(B_tᴴB_t), the power-of-two rescale (‖B_{t+1}‖_F ∈ [½, 1)) being
exact. For a product with inner dimension k, |fl(XᴴY) − XᴴY| ≤ γ·|X|ᴴ|Y| entrywise with γ = c·(k + 4)·u for any
summation order (FMA or not; c = 2 covers complex arithmetic), so the error E_t has
‖E_t‖ ≤ ‖E_t‖_F ≤ γ·‖|B_t|ᴴ|B_t|‖_F ≤ γ·‖B_t‖_F². Then, with s(X) the exact norm of a stored matrix,

    s(B_t)² = s(B_tᴴB_t) = s(2^{e_{t+1}}·B_{t+1} − E_t) ≤ 2^{e_{t+1}}·s(B_{t+1}) + γ_t·‖B_t‖_F²,

and s(B_T) ≤ ‖B_T‖_F. Unrolled backwards, u_T = ‖B_T‖_F, u_t = (2^{e_{t+1}}·u_{t+1} + γ_t·‖B_t‖_F²)^{1/2} gives
s(A) ≤ 2^{e_0}·u_0. The scalar recursion itself is evaluated with a relative allowance of 10⁻¹⁴ per step and
every computed Frobenius norm is inflated by (n + 2)·u·2 (its own rounding), which dominates the last few ulps
of sqrt, add and multiply. Underflow in the rescale (entries below 2⁻¹⁰²² of a unit-norm matrix) is absorbed by
an absolute 10⁻²⁹⁰ in each γ-term.

**Convolutions.** A zero-padded, strided convolution Z (PyTorch Conv2d: weight [c_out, c_in, k, k], stride s,
padding p, input n × n) factors as Z = S·C_N·Π·P (per spatial axis, with the two axes independent):
  * P embeds the n samples in a circular grid of N samples (zeros elsewhere), N a multiple of s: an isometry;
  * the strided circular conv y_i = Σ_a w_a x[(s·i + a − p) mod N] reproduces Z's n_out = ⌊(n + 2p − k)/s⌋ + 1
    outputs exactly when every tap reads, modulo N, the same sample it reads without wrap, or a zero of the
    embedding exactly when it reads padding, and n_out ≤ N/s (`valid_circular_sizes` checks this tap by tap;
    N ≥ n + p with s | N suffices for p ≤ k − 1): S selects those rows, ‖S‖ ≤ 1;
  * a circular shift by p (unitary) and space-to-depth Π (a permutation) turn the strided circular conv on N
    samples into a stride-1 circular conv C_G on G = N/s samples with c_in·s² input channels and kernel
    w′[o, (c, r₁, r₂), b₁, b₂] = w[o, c, s·b₁ + r₁, s·b₂ + r₂] (0 past k), since Σ_a w_a x[s·i + a] =
    Σ_{b, r} w′_{r, b} x[s(i + b) + r] and s | N keeps the wrap consistent.
Hence ‖Z‖ ≤ ‖C_G‖ = max_ω ‖K̂(ω)‖, C_G being block-diagonalised by the unitary 2-D DFT into the c_out × c_in·s²
matrices K̂(ω) = Σ_b w′_b·e^{−2πi⟨ω, b⟩/G} over the G × G frequencies ω (Sedghi, Gupta, Long, ICLR 2019).
Every valid N gives a proven bound; they differ by a fraction of a percent, so the smallest few are tried and
the least kept. No tighter *proven* bound for zero padding is known to us: the Toeplitz symbol's supremum over
the continuous torus (Araujo et al. 2021), the kernel Gram iteration of Delattre et al. (2024) (which decreases
to that supremum from above) and the fantastic four all dominate the circular bound on a valid grid.
Conjugate symmetry (w real: K̂(−ω) = conj K̂(ω), equal norms) halves the frequencies. The stride costs no
tightness (no ‖subsample‖ ≤ 1 step), the padding only the circular wrap. Dilation is a kernel with zeros
inserted; groups make C_N block-diagonal (the max over groups).

K̂ is formed by direct sums (not an FFT, whose error constants are library-specific): each entry is a sum of
k′² products of a weight and a unit-modulus twiddle computed by libm to within 2u, so the computed K̂ differs
from the exact one by E with ‖E‖ ≤ ‖E‖_F ≤ δ = c·(k′² + 6)·u·‖(Σ_b |w′_{o,i,b}|)_{o,i}‖_F, added to the bound
(Weyl: ‖K̂‖ ≤ ‖K̂_computed‖ + ‖E‖).

**Max over many matrices.** `max_gram_norm_bound` refines only the frequencies that can still hold the maximum:
one whose current upper bound falls below another's lower estimate (a Rayleigh quotient) is frozen, and its
frozen upper bound still enters the final max. The result is sound whatever the lower estimates are.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

UNIT_ROUNDOFF = 2.0 ** -53
_RECURSION_SLACK = 1e-14     # per scalar step of the backward recursion (≫ the few ulps it must cover)
_UNDERFLOW = 1e-290          # absolute allowance for rescale underflow, per product


def _gamma(inner: int) -> float:
    """γ for one matrix product with inner dimension `inner` (complex-safe factor 2)."""
    return 2.0 * (inner + 4) * UNIT_ROUNDOFF


def _real_view(B: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
    """B as real numbers ([..., m, n, 2] for complex: norms there are far faster on CPU) and its matrix dims."""
    return (torch.view_as_real(B), (-3, -2, -1)) if B.is_complex() else (B, (-2, -1))


def _frobenius(B: torch.Tensor) -> torch.Tensor:
    R, dims = _real_view(B)
    return torch.linalg.vector_norm(R, dim=dims).to(torch.float64)


def _frobenius_up(B: torch.Tensor) -> torch.Tensor:
    """‖B‖_F per matrix of a batch [..., m, n], inflated by its own rounding allowance (float64)."""
    n = B.shape[-1] * B.shape[-2] * (2 if B.is_complex() else 1)
    return _frobenius(B) * (1.0 + 2.0 * (n + 2) * UNIT_ROUNDOFF)


def _rescale(B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """B·2^{−e} with e per matrix chosen so that ‖B·2^{−e}‖_F ∈ [½, 1) (exact: powers of two). Returns (B′, e).
    The largest entry is brought to [½, 1) first, so the Frobenius norm cannot overflow for any finite B."""
    ones = torch.ones(B.shape[:-2], dtype=torch.float64, device=B.device)
    R, dims = _real_view(B)   # the largest real or imaginary part: within √2 of the largest modulus
    m = R.abs().amax(dim=dims).to(torch.float64) if B.numel() else ones
    _, e1 = torch.frexp(torch.where(m > 0, m, ones))
    B = B * torch.ldexp(ones, -e1)[..., None, None].to(B.dtype)
    f = _frobenius(B)
    _, e2 = torch.frexp(torch.where(f > 0, f, ones))
    return B * torch.ldexp(ones, -e2)[..., None, None].to(B.dtype), (e1 + e2).to(torch.float64)


def _bound_from_history(history, frob_last: torch.Tensor) -> torch.Tensor:
    """Backward recursion u_t = (2^{e_{t+1}}·u_{t+1} + γ_t·F_t²)^{1/2}, from u_T = ‖B_T‖_F; returns 2^{e_0}·u_0."""
    u = frob_last
    for e_next, err in reversed(history[1:]):
        u = torch.sqrt(torch.ldexp(u, e_next.to(torch.int64)) + err) * (1.0 + _RECURSION_SLACK)
    e0 = history[0][0]
    return torch.ldexp(u, e0.to(torch.int64)) * (1.0 + _RECURSION_SLACK)


def gram_norm_bound(A: torch.Tensor, max_steps: int = 40, rtol: float = 1e-12) -> torch.Tensor:
    """Guaranteed upper bound on ‖A‖ for each matrix of a batch [..., m, n] (real or complex): float64 [...].

    Gram iteration with the rounding allowance of the module docstring. Stops when no bound of the batch improved
    by more than `rtol` (relative) in the last step, or after `max_steps` products; either way the value is a
    proven upper bound.
    """
    return _gram(A, max_steps, rtol, prune=False)[0]


def max_gram_norm_bound(A: torch.Tensor, max_steps: int = 40, rtol: float = 1e-12,
                        ) -> Tuple[float, float]:
    """(upper, lower): a guaranteed upper bound on max_b ‖A_b‖ over a batch [B, m, n], and a lower estimate
    (the best Rayleigh quotient seen; an estimate, not used for soundness). Matrices that can no longer hold
    the maximum are frozen (module docstring)."""
    upper, lower = _gram(A.reshape(-1, *A.shape[-2:]), max_steps, rtol, prune=True)
    return float(upper.max()), float(lower.max())


def _gram(A: torch.Tensor, max_steps: int, rtol: float, prune: bool):
    batch_shape = A.shape[:-2]
    A = A.reshape(-1, *A.shape[-2:])
    A = A.to(torch.complex128 if A.is_complex() else torch.float64)
    nb = A.shape[0]
    upper = torch.full((nb,), math.inf, dtype=torch.float64, device=A.device)
    lower = torch.zeros(nb, dtype=torch.float64, device=A.device)
    if A.numel() == 0:
        return upper.zero_().reshape(batch_shape), lower.reshape(batch_shape)
    right = A.shape[-1] <= A.shape[-2]          # Gram on the smaller side: AᴴA (n × n) or AAᴴ (m × m)
    active = torch.arange(nb, device=A.device)
    B, e0 = _rescale(A)
    A_act = A
    history = [(e0, None)]                       # (e_t, γ_{t−1}·F_{t−1}²) per stored B_t
    for step in range(max_steps):
        F = _frobenius_up(B)
        if step == 0:
            inner = A.shape[-2] if right else A.shape[-1]
            P = B.mH @ B if right else B @ B.mH
        else:
            inner = B.shape[-1]
            P = B.mH @ B
        err = _gamma(inner) * F * F + _UNDERFLOW
        B, e = _rescale(P)
        history.append((e, err))
        bound = _bound_from_history(history, _frobenius_up(B))
        improved = bound < upper[active] * (1.0 - rtol)
        upper[active] = torch.minimum(upper[active], bound)
        if prune or step == max_steps - 1:
            # Rayleigh quotient of the column of B (∝ a power of the Gram matrix) with the largest norm
            col = torch.linalg.vector_norm(B, dim=-2).argmax(dim=-1)
            v = B[torch.arange(B.shape[0], device=B.device), :, col]
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300)
            Av = (A_act @ v[..., None]) if right else (A_act.mH @ v[..., None])
            lower[active] = torch.maximum(lower[active], torch.linalg.vector_norm(Av[..., 0], dim=-1).double())
        if not bool(improved.any()):
            break
        if prune:
            keep = upper[active] >= lower.max()
            if not bool(keep.all()):
                active, B, A_act = active[keep], B[keep], A_act[keep]
                history = [(h[0][keep], None if h[1] is None else h[1][keep]) for h in history]
                if active.numel() == 0:
                    break
    return upper.reshape(batch_shape), lower.reshape(batch_shape)


# -- convolutions -----------------------------------------------------------------------------------------------

def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def polyphase_kernel(weight: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """w′[o, (c, r₁, r₂), b₁, b₂] = w[o, c, s₁b₁ + r₁, s₂b₂ + r₂] (0 past the kernel): the stride-1 kernel of the
    space-to-depth form. Channel order (c, r₁, r₂) matches F.pixel_unshuffle."""
    s1, s2 = stride
    o, c, k1, k2 = weight.shape
    kk1, kk2 = -(-k1 // s1), -(-k2 // s2)
    padded = weight.new_zeros(o, c, kk1 * s1, kk2 * s2)
    padded[:, :, :k1, :k2] = weight
    # [o, c, b1, r1, b2, r2] → [o, c, r1, r2, b1, b2]
    return padded.reshape(o, c, kk1, s1, kk2, s2).permute(0, 1, 3, 5, 2, 4).reshape(o, c * s1 * s2, kk1, kk2)


def dilate_kernel(weight: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """The dense kernel of a dilated conv: zeros between the taps."""
    d1, d2 = dilation
    if d1 == d2 == 1:
        return weight
    o, c, k1, k2 = weight.shape
    out = weight.new_zeros(o, c, d1 * (k1 - 1) + 1, d2 * (k2 - 1) + 1)
    out[:, :, ::d1, ::d2] = weight
    return out


def valid_circular_sizes(n: int, k: int, stride: int, padding: int, count: int = 4) -> list:
    """The `count` smallest circular sizes N (multiples of the stride) in which the zero-padded strided conv on n
    samples embeds exactly: every tap of every output reads, modulo N, the same input sample as without wrap
    (or a zero of the embedding exactly when it reads padding), and the n_out outputs are distinct rows.
    Checked tap by tap; at least N ≥ n + p (Helper's sharp example: n = 2, p = 1, k = 3 fails at N = 2)."""
    n_out = (n + 2 * padding - k) // stride + 1
    if n_out < 1:
        raise ValueError(f"conv of a {k}-tap kernel on {n} samples with padding {padding} has no output")
    sizes, N = [], stride * max(1, -(-n // stride))
    while len(sizes) < count:
        if N // stride >= n_out and all(((j % N) < n) == (0 <= j < n)
                                        for i in range(n_out) for j in range(stride * i - padding,
                                                                             stride * i - padding + k)):
            sizes.append(N)
        N += stride
    return sizes


def frequency_matrices(kernel: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, float]:
    """K̂(ω) for the half-plane of frequencies of an N₁ × N₂ circular conv with a real stride-1 kernel
    [o, i, k₁, k₂], by direct sums: ([F, o, i] complex128, δ the bound on ‖K̂_computed(ω) − K̂(ω)‖)."""
    w = kernel.detach().to(torch.float64)
    n1, n2 = grid
    k1, k2 = w.shape[-2:]

    def twiddles(n: int, k: int, count: int) -> torch.Tensor:
        omega = torch.arange(count, dtype=torch.float64, device=w.device)[:, None]
        b = torch.arange(k, dtype=torch.float64, device=w.device)[None, :]
        # reduce ω·b mod N exactly in integers before the angle (keeps libm arguments small)
        angle = -2.0 * math.pi * torch.remainder(omega * b, n) / n
        return torch.polar(torch.ones_like(angle), angle)          # [count, k]

    t1 = twiddles(n1, k1, n1)
    t2 = twiddles(n2, k2, n2 // 2 + 1)                               # conjugate symmetry in ω₂
    Kh = torch.einsum("oiab,xa,yb->xyoi", w.to(torch.complex128), t1, t2)
    abs_sum = w.abs().sum(dim=(-2, -1))
    delta = 2.0 * (k1 * k2 + 6) * UNIT_ROUNDOFF * float(torch.linalg.matrix_norm(abs_sum, "fro"))
    return Kh.reshape(-1, *Kh.shape[-2:]), delta


def conv_norm_bound(weight: torch.Tensor, input_hw: Sequence[int], stride=1, padding=0, dilation=1,
                    groups: int = 1, max_steps: int = 40, grids: int = 4) -> float:
    """Guaranteed upper bound on the spectral norm of the zero-padded conv (bias-free) on an input of size
    input_hw: the polyphase circular embedding with batched Gram iteration (module docstring), minimised over the
    `grids` smallest valid circular sizes per axis (each is a proven bound, so their minimum is one too)."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    w = dilate_kernel(weight.detach().to(torch.float64), d)
    k = w.shape[-2:]
    sizes = [valid_circular_sizes(int(n), int(kk), ss, pp, grids) for n, kk, ss, pp in zip(input_hw, k, s, p)]
    o = w.shape[0] // groups
    best = math.inf
    for N1, N2 in zip(*sizes):
        upper = 0.0
        for g in range(groups):
            wg = polyphase_kernel(w[g * o:(g + 1) * o], s)
            Kh, delta = frequency_matrices(wg, (N1 // s[0], N2 // s[1]))
            upper = max(upper, max_gram_norm_bound(Kh, max_steps=max_steps)[0] + delta)
        best = min(best, upper)
    return best


def dense_norm_bound(weight: torch.Tensor, max_steps: int = 40) -> float:
    """Guaranteed upper bound on ‖W‖ of a dense matrix (Gram iteration with the rounding allowance)."""
    return float(gram_norm_bound(weight.detach(), max_steps=max_steps))
