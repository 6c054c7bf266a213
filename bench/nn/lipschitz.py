"""Layers with two norms: a guaranteed upper bound (the certificate) and a power-iteration estimate (training and
the paper's "published" number).

`LipLinear` and `LipConv2d` are drop-in `nn.Linear` / `nn.Conv2d` that carry a persistent power-iteration
iterate (a buffer, so it lives in the state_dict). Every bounded layer (these two, and the 1-Lipschitz families'
layers) speaks one protocol:

* `train_bound(n_iter)`: a few warm-started power-iteration steps (no gradient), then the Rayleigh estimate
  σ = ‖W v‖ with the gradient flowing through W. This is what a loss sees during training (GloRo, CLL:
  5 steps per training step, supplement B).
* `converge()` computes, for the current weights (the guaranteed part on demand: the epoch-end convergence
  during training skips it, the first certificate computes it),
  - `operator_norm_bound()`: a *guaranteed* upper bound on the norm of the layer's linear operator, computed
    deterministically (bench/nn/spectral.py: Gram iteration for dense matrices, the polyphase circular embedding
    for zero-padded strided convs; each family its own, stated in its docstring);
  - a block (subspace) power iteration in float64 with Rayleigh–Ritz on `POWER_BLOCK` vectors, so that a cluster
    of top singular values resolves instead of stalling the iteration. It stops when its estimate reaches the
    guaranteed bound (gap below `GAP_TOL`), or, after `POWER_MIN_ITER` steps, when the top Ritz value changes by
    less than `tol`, the runner-up by less than √tol, and the top Ritz pair's residual is below √tol, or
    after `max_iter` steps. A start exactly in a lower singular direction is left by the other block vectors. Its value approaches σ from below: it is a lower bound, never a
    certificate, and one above the guaranteed bound is a bug (`SoundnessError`).
  The layer's Lipschitz constants follow from the two (`layer_constants`: the norm itself by default; CPL maps
  it through its step size).
* `certified_bound()`: the guaranteed constant; `power_bound()`: the power-iteration one. Both raise when the
  weights changed after `converge()`, so no certificate is computed from a stale bound.

A conv layer is iterated with conv2d / conv_transpose2d on an iterate of the layer's real input shape
(recorded on the first forward). `output_padding` makes the transpose return the full input shape: the
official CLL code omits it, shrinks the iterate for 3×3 stride-2 convs and under-estimates the norm
(reference/cll-official-code.md §8.1).
"""
from __future__ import annotations

import abc
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.spectral import conv_norm_bound, dense_norm_bound, gram_norm_bound


class UnconvergedBoundError(RuntimeError):
    """A certificate was requested from a bound that is not converged for the current weights."""


class SoundnessError(RuntimeError):
    """A lower estimate of a norm exceeded its guaranteed upper bound: one of the two is wrong."""


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same bytes (dtype, shape and device too): a float compared as an integer of its width, so
    that −0.0 ≠ 0.0 and a NaN equals itself, as in the bytes."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    return torch.equal(a, b)


def _unit(v: torch.Tensor) -> torch.Tensor:
    # clamp instead of branching on the norm: no host sync in the hot path; a zero weight gives σ = 0 either way
    return v / torch.linalg.vector_norm(v).clamp_min(1e-30)


def _orthonormal_rows(V: torch.Tensor) -> torch.Tensor:
    """Rows of V [..., b, n] orthonormalised (reduced QR of Vᵀ, per matrix of a batch)."""
    Q, _ = torch.linalg.qr(V.transpose(-1, -2))
    return Q.transpose(-1, -2)


class PowerIterated(metaclass=abc.ABCMeta):
    """Mixin: guaranteed bound + power iteration for the linear part (bias ignored) of a layer.

    Subclasses define operator(v, weight) and adjoint(u, weight) (batched over the leading axis of v),
    _iterate_shape(x) and operator_norm_bound()."""

    power_iterate: torch.Tensor
    sigma_bound: torch.Tensor
    sigma_power: torch.Tensor
    weight: nn.Parameter

    #: vectors in the block power iteration (resolves clusters of up to this many top singular values)
    POWER_BLOCK = 4
    #: relative tolerance of the gap between the power estimate and the guaranteed bound that ends the iteration
    GAP_TOL = 1e-9
    #: steps before the Ritz-value stopping rule may fire (the extra block vectors need a few to find the top)
    POWER_MIN_ITER = 20
    #: a power estimate may exceed the guaranteed bound by this much (rounding of the Rayleigh quotient) before
    #: it is a SoundnessError
    ROUNDING_SLACK = 1e-10

    def _init_power_iteration(self) -> None:
        self.register_buffer("power_iterate", torch.empty(0))
        self.register_buffer("sigma_bound", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("sigma_power", torch.tensor(float("nan"), dtype=torch.float64))
        self._bound_key = None

    # -- lazy iterate --------------------------------------------------------------------------------
    def _ensure_iterate(self, x: torch.Tensor) -> None:
        if self.power_iterate.numel() == 0:
            v = torch.randn(self._iterate_shape(x), device=self.weight.device, dtype=self.weight.dtype)
            self.power_iterate = _unit(v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "power_iterate"
        if key in state_dict and state_dict[key].shape != self.power_iterate.shape:
            self.power_iterate = torch.empty_like(state_dict[key], device=self.weight.device)
        # checkpoints written before the power estimate had its own buffer
        state_dict.setdefault(prefix + "sigma_power", torch.tensor(float("nan"), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        self._bound_key = None  # loaded bounds are never trusted: converge() recomputes them

    def _require_iterate(self) -> None:
        if self.power_iterate.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}: run one forward pass first to record the input shape")

    @property
    def operator_input_shape(self) -> Tuple[int, ...]:
        """The input shape the layer's operator acts on (from the iterate: [1, C, H, W] or [features])."""
        self._require_iterate()
        shape = tuple(self.power_iterate.shape)
        return shape[1:] if len(shape) > 1 else shape

    # -- training estimate ---------------------------------------------------------------------------
    def train_bound(self, n_iter: int) -> torch.Tensor:
        """σ after `n_iter` warm-started steps; differentiable in the weight (not a certified bound)."""
        self._require_iterate()
        w = self.weight
        with torch.no_grad():
            v = self.power_iterate
            for _ in range(n_iter):
                v = _unit(self.adjoint(self.operator(v, w), w))
            if n_iter:
                self.power_iterate.copy_(v)
        return torch.linalg.vector_norm(self.operator(self.power_iterate.detach(), w))

    # -- the two bounds ------------------------------------------------------------------------------
    def _bound_tensors(self) -> Tuple[torch.Tensor, ...]:
        """Every tensor the layer's bounds depend on (families add their buffers)."""
        return (self.weight,)

    def _weight_key(self) -> Tuple[torch.Tensor, ...]:
        """A bit-exact copy of `_bound_tensors()`, the weights a bound is computed for (`_weights_unchanged`
        compares the current ones with it). Not `Tensor._version`: fused optimizers (Adam, AdamW with fused=True)
        update parameters in place without bumping it, so a version key lets a bound outlive the weights it was
        computed for. A copy, not a digest: comparing costs ~2 µs per tensor where hashing cost ~25 µs, at three
        checks per layer and epoch; it holds one more copy of the bounded weights."""
        return tuple(t.detach().clone() for t in self._bound_tensors())

    def _weights_unchanged(self) -> bool:
        """Whether `_bound_tensors()` equal, bit for bit, the weights of the current bound (`_bound_key`)."""
        key, now = self._bound_key, self._bound_tensors()
        return key is not None and len(key) == len(now) and all(_same_bits(k, t.detach()) for k, t in zip(key, now))

    @abc.abstractmethod
    def operator_norm_bound(self) -> float:
        """A guaranteed upper bound on the spectral norm of the layer's linear operator (float64)."""

    def layer_constants(self, norm_upper: float, norm_power: float) -> Tuple[float, float]:
        """(guaranteed, power-iteration) Lipschitz constants of the layer from the two operator norms."""
        return norm_upper, norm_power

    @torch.no_grad()
    def converge(self, tol: float = 1e-9, max_iter: int = 20_000, guaranteed: bool = True) -> float:
        """Converged power iteration for the current weights and, unless `guaranteed=False`, the guaranteed
        bound (otherwise computed when a certificate first asks for it). Returns the guaranteed constant (the
        power one with `guaranteed=False`). Both are cached until the weights change."""
        self._require_iterate()
        if not self._weights_unchanged() or torch.isnan(self.sigma_power):
            upper = self._compute_guaranteed_norm() if guaranteed else math.inf
            self.adopt_power(self.block_power_iteration(upper, tol=tol, max_iter=max_iter))
            if guaranteed:
                self._set_guaranteed(upper)
        return float(self._guaranteed()) if guaranteed else float(self.sigma_power)

    @torch.no_grad()
    def adopt_power(self, power: float, iterate: Optional[torch.Tensor] = None) -> None:
        """Take `power` (and its top singular vector `iterate`) as the converged power iteration for the current
        weights: the guaranteed bound is then computed when a certificate first asks for it. `converge()` calls
        it; a pack (bench/pack.py) calls it with the result of `stacked_power_iteration`."""
        if iterate is not None:
            self.power_iterate.copy_(iterate.to(self.power_iterate.dtype))
        self.sigma_bound.fill_(float("nan"))
        self.norm_power = power
        self.sigma_power.fill_(self.layer_constants(power, power)[1])
        self._bound_key = self._weight_key()  # after layer_constants: a family may store what eval uses

    def stacked_norm_bound(self, W: torch.Tensor) -> Optional[torch.Tensor]:
        """Where cheap, `operator_norm_bound` of every weight of a stack W [M, ...] in one call (float64 [M], each
        a guaranteed bound on its own weight's norm); None (the default): one layer at a time."""
        return None

    def adopt_guaranteed(self, upper: float) -> None:
        """Take `upper`, a guaranteed bound on the current weight's operator norm (a pack's `stacked_norm_bound`
        row of exactly these weights), after `adopt_power`; checked against the power estimate as any bound."""
        if self._bound_key is None:
            raise RuntimeError(f"{type(self).__name__}: adopt_power first, then the guaranteed bound")
        self._set_guaranteed(self._finite(upper))

    def _compute_guaranteed_norm(self) -> float:
        return self._finite(float(self.operator_norm_bound()))

    def _finite(self, upper: float) -> float:
        if not math.isfinite(upper):
            raise SoundnessError(f"{type(self).__name__}: guaranteed bound is not finite ({upper!r})")
        return upper

    def _set_guaranteed(self, upper: float) -> None:
        if self.norm_power > upper * (1.0 + self.ROUNDING_SLACK):
            raise SoundnessError(f"{type(self).__name__}: power-iteration estimate {self.norm_power!r} exceeds "
                                 f"the guaranteed bound {upper!r}")
        self.norm_upper = upper
        self.sigma_bound.fill_(self.layer_constants(upper, self.norm_power)[0])

    def _guaranteed(self) -> torch.Tensor:
        if torch.isnan(self.sigma_bound):
            self._set_guaranteed(self._compute_guaranteed_norm())
            if not self._weights_unchanged():  # layer_constants must not change what the bound rests on
                raise SoundnessError(f"{type(self).__name__}: the guaranteed bound changed the layer's state")
        return self.sigma_bound

    @torch.no_grad()
    def block_power_iteration(self, upper: float = math.inf, tol: float = 1e-9, max_iter: int = 20_000) -> float:
        """σ from below: subspace iteration on A = WᵀW in float64 with Rayleigh–Ritz, warm-started from the
        persistent iterate (which is updated to the top Ritz vector)."""
        sigma, x = self.stacked_power_iteration(self.weight.detach().double()[None],
                                                self.power_iterate.detach().double()[None], upper, tol, max_iter)
        self.power_iterate.copy_(x[0].to(self.power_iterate.dtype))
        return sigma[0]

    @torch.no_grad()
    def stacked_power_iteration(self, W: torch.Tensor, V: torch.Tensor, upper: float = math.inf, tol: float = 1e-9,
                                max_iter: int = 20_000):
        """The block power iteration for a stack of M weights of this layer's shape (W [M, ...], float64) from
        the iterates V [M, *iterate shape]: (σ per member, a list; the unit top Ritz vectors [M, *iterate shape]).
        Each member stops by the rule of `block_power_iteration` at its own step, as it would alone; a pack
        (bench/pack.py) converges all its members' layers in one call. M = 1 is the single layer. A layer that
        computes the iteration's limit directly (`_exact_top`: small dense layers) returns that instead."""
        M = W.shape[0]
        exact = self._exact_top(W, V)
        if exact is not None:
            return exact
        if M == 1:
            def op(Q, Wa):
                return self.operator(Q[0], Wa[0])[None]

            def adj(U, Wa):
                return self.adjoint(U[0], Wa[0])[None]
            V = self._warm_start(V[0], W[0])[None]
        elif getattr(self, "stackable", False):   # the layer's own ops broadcast over the stack
            op, adj = self.operator, self.adjoint
            V = self._warm_start(V, W)
        else:
            op, adj = torch.func.vmap(self.operator), torch.func.vmap(self.adjoint)
            V = torch.func.vmap(self._warm_start)(V, W)
        shape = tuple(V.shape[1:])
        n = V[0].numel()
        b = min(self.POWER_BLOCK, n)
        gen = torch.Generator().manual_seed(0)  # deterministic extra directions
        extra = torch.randn(b - 1, n, generator=gen, dtype=torch.float64).to(V.device)
        Q = _orthonormal_rows(torch.cat([V.reshape(M, 1, n), extra.expand(M, b - 1, n)], dim=1))
        block_tail = tuple(shape[1:]) if len(shape) > 1 else shape

        sigma, prev = [0.0] * M, [None] * M
        active, Wa = list(range(M)), W          # the members still iterating, and their weights
        x_out = torch.zeros(M, n, dtype=torch.float64, device=V.device)
        watched = min(2, b)
        for it in range(max_iter):
            out = op(Q.reshape(len(active), b, *block_tail), Wa)
            AQ = out.reshape(len(active), b, -1)
            Y = adj(out, Wa).reshape(len(active), b, -1)   # AᵀA Q
            H = AQ @ AQ.transpose(-1, -2)                    # Q A Qᵀ, b × b
            theta, S = torch.linalg.eigh(H)
            theta, S = theta.flip(-1), S.flip(-1)
            s0 = S[:, :, 0]
            x = (s0[:, None, :] @ Q)[:, 0]
            r = torch.linalg.vector_norm((s0[:, None, :] @ Y)[:, 0] - theta[:, :1] * x, dim=-1)
            theta_h, r_h = theta[:, :watched].tolist(), r.tolist()   # one host read per step for all members
            keep = []
            for k, m in enumerate(active):
                t0 = max(theta_h[k][0], 0.0)
                sigma[m] = math.sqrt(t0)
                stop = t0 == 0.0 or sigma[m] >= upper / (1.0 + self.GAP_TOL)
                # converged: the top *two* Ritz values stable (a near-degenerate top pair resolved, not only the
                # pair the iterate happened to start in), the top residual small, and a minimum of steps taken
                top = [max(v, 0.0) for v in theta_h[k]]
                if not stop and it >= self.POWER_MIN_ITER and prev[m] is not None and r_h[k] <= math.sqrt(tol) * t0:
                    # the top value to tol; the runner-up only to √tol: enough to show the block has settled (a
                    # start in a lower singular direction moves it by far more), without waiting out σ₃/σ₂
                    stop = (abs(top[0] - prev[m][0]) <= tol * t0
                            and abs(top[-1] - prev[m][-1]) <= math.sqrt(tol) * t0)
                prev[m] = top
                if stop or it == max_iter - 1:
                    x_out[m] = x[k]
                else:
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(active):   # stopped members leave the stack
                rows = torch.tensor(keep, dtype=torch.long, device=Y.device)
                Y, Wa = Y[rows], Wa[rows]
                active = [active[k] for k in keep]
            Q = _orthonormal_rows(Y)
        return sigma, torch.stack([_unit(v) for v in x_out]).reshape(M, *shape)

    def _warm_start(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Where cheap, replace the iterate by A^m v (m large) before the iteration; default: as is."""
        return v

    def _exact_top(self, W: torch.Tensor, V: torch.Tensor):
        """Where cheap, the iteration's limit computed directly: (σ per member, the unit top singular vectors
        [M, *iterate shape]) of the stack W [M, ...] (float64), each vector's sign that of its iterate V;
        None (the default): iterate."""
        return None

    def _check_fresh(self) -> None:
        if not self._weights_unchanged() or torch.isnan(self.sigma_power):
            raise UnconvergedBoundError(
                f"{type(self).__name__}: the spectral-norm bound is stale; call converge() before certifying")

    def certified_bound(self) -> torch.Tensor:
        """The guaranteed float64 Lipschitz constant (computed on first use after `converge()`); raises if the
        weights changed since `converge()`."""
        self._check_fresh()
        return self._guaranteed()

    def power_bound(self) -> torch.Tensor:
        """The converged power-iteration constant (the paper's way; from below, not a certificate)."""
        self._check_fresh()
        return self.sigma_power


class LipLinear(PowerIterated, nn.Linear):
    """nn.Linear with a power-iterated spectral norm of W (iterate of shape [in_features])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self._init_power_iteration()

    def _iterate_shape(self, x):
        return (self.in_features,)

    def operator_norm_bound(self) -> float:
        """‖W‖ from above by Gram iteration with its rounding allowance (bench/nn/spectral.py)."""
        return dense_norm_bound(self.weight)

    def stacked_norm_bound(self, W: torch.Tensor) -> torch.Tensor:
        """The Gram iteration of `operator_norm_bound` over the stack at once: each matrix's own proven bound."""
        return gram_norm_bound(W.detach())

    #: operator, adjoint and warm start broadcast over a leading stack axis of the weight ([M, out, in])
    stackable = True

    def operator(self, v, weight):  # v: [in] or a block [b, in]; with a stack of weights, [M, b, in]
        return v @ weight.transpose(-1, -2)

    def adjoint(self, u, weight):
        return u @ weight

    def forward(self, x):
        self._ensure_iterate(x)
        return super().forward(x)

    #: squarings of the Gram matrix in the warm start: v ← A^(2^k) v, i.e. 2^k power-iteration steps at once
    GRAM_SQUARINGS = 16
    GRAM_MAX_DIM = 1024

    #: the larger of a layer's two dimensions at which the converged iteration is replaced by its limit, the top
    #: eigenpair of the smaller Gram matrix (`_exact_top`): a 40×40 moons layer converges in ~30 block steps of
    #: Python-bound small ops; LAPACK's eigh of a 512×512 matrix takes a few milliseconds
    EXACT_MAX_DIM = 512

    def _exact_top(self, W, V):
        """σ₁ and v₁ of each W [M, out, in] (float64) from a dense symmetric eigensolver (LAPACK syevd) on the
        smaller Gram matrix, G = WᵀW (in ≤ out: v₁ = its top eigenvector) or G = WWᵀ (v₁ = Wᵀu₁/‖Wᵀu₁‖).
        This is the point the power iteration converges to: its top eigenvalue λ₁ = σ₁² carries an absolute
        error of O(n·ε_mach·‖G‖) (backward stability of syevd), far inside `ROUNDING_SLACK`, and a clustered
        top pair costs no accuracy in σ₁ (any unit vector of the cluster's span has a Rayleigh quotient within
        the cluster's width of λ₁). It remains an estimate: certificates use `operator_norm_bound`."""
        out_f, in_f = W.shape[-2:]
        if max(out_f, in_f) > self.EXACT_MAX_DIM:
            return None
        Wt = W.transpose(-1, -2)
        right = in_f <= out_f
        lam, E = torch.linalg.eigh(Wt @ W if right else W @ Wt)
        top = E[..., -1]
        x = top if right else (top[:, None, :] @ W)[:, 0]
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-300)
        # eigh's sign is arbitrary: keep the iterate's orientation, so the warm start of training moves least
        x = torch.where((x * V.reshape(x.shape)).sum(-1, keepdim=True) < 0, -x, x)
        sigma = lam[..., -1].clamp_min(0.0).sqrt()
        return sigma.tolist(), x.reshape(V.shape)

    def _warm_start(self, v, weight):
        """Power iteration with A^(2^k) formed by repeated squaring of the smaller Gram matrix (normalised
        at each squaring): the same fixed point, reached in k matrix products instead of 2^k steps."""
        out_f, in_f = weight.shape[-2:]
        if min(out_f, in_f) > self.GRAM_MAX_DIM:
            return v
        small_right = in_f <= out_f
        Wt = weight.transpose(-1, -2)
        G = Wt @ weight if small_right else weight @ Wt
        for _ in range(self.GRAM_SQUARINGS):
            G = G / torch.linalg.matrix_norm(G).clamp_min(1e-300)[..., None, None]
            G = G @ G
        v = v[..., None]
        if small_right:
            return (G @ v)[..., 0]
        # left singular side: u ← G u with u = W v, then back to the input side
        return (Wt @ (G @ (weight @ v)))[..., 0]


class LipConv2d(PowerIterated, nn.Conv2d):
    """nn.Conv2d with a power-iterated spectral norm of the zero-padded, strided conv operator.

    The iterate has the layer's real input shape [1, C, H, W]; conv_transpose2d gets the `output_padding`
    that restores H×W exactly, so the iteration runs on the true operator R^{C·H·W} → R^{C'·H'·W'}.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("LipConv2d supports numeric zero padding only")
        self._init_power_iteration()

    def operator_norm_bound(self) -> float:
        """The polyphase circular-embedding bound of the zero-padded strided conv at its input size
        (bench/nn/spectral.py, `conv_norm_bound`)."""
        return conv_norm_bound(self.weight, self.operator_input_shape[-2:], self.stride, self.padding, self.dilation,
                               self.groups)

    def _iterate_shape(self, x):
        return (1, *x.shape[-3:])

    def operator(self, v, weight):
        return F.conv2d(v, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def adjoint(self, u, weight):
        h, w = self.power_iterate.shape[-2:]
        out_pad = []
        for size, o, k, s, p, d in zip((h, w), u.shape[-2:], self.kernel_size, self.stride, self.padding,
                                       self.dilation):
            full = (o - 1) * s - 2 * p + d * (k - 1) + 1
            out_pad.append(size - full)
        return F.conv_transpose2d(u, weight, None, self.stride, self.padding, tuple(out_pad), self.groups,
                                  self.dilation)

    def forward(self, x):
        self._ensure_iterate(x)
        return super().forward(x)


class MaxMin(nn.Module):
    """MaxMin activation (Anil et al. 2019), 1-Lipschitz and gradient-norm preserving.

    Pairs adjacent channels (2k, 2k+1) and returns [max of each pair | min of each pair] along the channel
    axis, as the official CLL `MaxMin(num_units=C/2)` does.
    """

    lipschitz_one = True

    def forward(self, x):
        c = x.shape[1]
        if c % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {c}")
        pairs = x.unflatten(1, (c // 2, 2))
        a, b = pairs.select(2, 0), pairs.select(2, 1)
        if not torch.is_grad_enabled():
            # evaluation and certification: elementwise max/min, 8× faster than a sort on 20,000 moons points
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)
        # with autograd on (training, also under vmap, where `requires_grad` is not visible; the lower bound's
        # ascent): the whole gradient goes to the larger entry (to a at a tie), as a sort routes it; maximum()
        # would split it at ties, and its backward is slower. (A gather by each pair's order has a 2× faster
        # eager backward, bit-identical, but inductor compiles it to a slower moons step: 3.7 against 3.0 ms)
        first = a >= b
        return torch.cat([torch.where(first, a, b), torch.where(first, b, a)], 1)
