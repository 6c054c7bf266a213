"""Layers whose spectral norm is bounded by power iteration on the true operator.

`LipLinear` and `LipConv2d` are drop-in `nn.Linear` / `nn.Conv2d` that carry a persistent power-iteration
iterate (a buffer, so it lives in the state_dict) and give two numbers:

* `train_bound(n_iter)`: a few warm-started power-iteration steps (no gradient), then the Rayleigh estimate
  σ = ‖W v‖ with the gradient flowing through W. This is what a loss sees during training (GloRo, CLL:
  5 steps per training step, supplement B).
* `certified_bound()`: the bound used for certificates. It exists only after `converge()`, which iterates in
  float64 until the relative change of σ is below `tol` (1e-9), then inflates the Rayleigh estimate by the
  eigen-residual ‖A v − ρ v‖/ρ of A = WᵀW (power iteration approaches σ from below; the residual accounts for
  what is left) with a floor of `safety` (1e-5: the unresolved spread of a near-degenerate top singular-value cluster
  at the stopping tolerance; the tests check the result against exact norms). Any in-place change of the weight
  after `converge()` invalidates the bound, so a certificate can never be computed from a stale one.

A conv layer is iterated with conv2d / conv_transpose2d on an iterate of the layer's real input shape
(recorded on the first forward). `output_padding` makes the transpose return the full input shape: the
official CLL code omits it, shrinks the iterate for 3×3 stride-2 convs and under-estimates the norm
(reference/cll-official-code.md §8.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class UnconvergedBoundError(RuntimeError):
    """A certificate was requested from a bound that is not converged for the current weights."""


def _unit(v: torch.Tensor) -> torch.Tensor:
    # clamp instead of branching on the norm: no host sync in the hot path; a zero weight gives σ = 0 either way
    return v / torch.linalg.vector_norm(v).clamp_min(1e-30)


class PowerIterated:
    """Mixin: power iteration for the linear part (bias ignored) of a layer. Subclasses define the operator."""

    power_iterate: torch.Tensor
    sigma_bound: torch.Tensor
    weight: nn.Parameter

    def _init_power_iteration(self) -> None:
        self.register_buffer("power_iterate", torch.empty(0))
        self.register_buffer("sigma_bound", torch.tensor(float("nan"), dtype=torch.float64))
        self._bound_key = None

    # Subclasses define operator(v, weight), adjoint(u, weight) and _iterate_shape(x).

    # -- lazy iterate --------------------------------------------------------------------------------
    def _ensure_iterate(self, x: torch.Tensor) -> None:
        if self.power_iterate.numel() == 0:
            v = torch.randn(self._iterate_shape(x), device=self.weight.device, dtype=self.weight.dtype)
            self.power_iterate = _unit(v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "power_iterate"
        if key in state_dict and state_dict[key].shape != self.power_iterate.shape:
            self.power_iterate = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def _require_iterate(self) -> None:
        if self.power_iterate.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}: run one forward pass first to record the input shape")

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

    # -- certified bound -----------------------------------------------------------------------------
    def _weight_key(self):
        return (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device)

    @torch.no_grad()
    def converge(self, tol: float = 1e-9, max_iter: int = 100_000, safety: float = 1e-5) -> float:
        """Iterate in float64 to relative change < tol; store an upper bound on ‖W‖₂. Returns it."""
        self._require_iterate()
        w = self.weight.detach().double()
        v = _unit(self._warm_start(self.power_iterate.detach().double(), w))
        prev = None
        for _ in range(max_iter):
            u = self.operator(v, w)
            rho = torch.sum(u * u)                      # vᵀ A v with A = WᵀW, ‖v‖ = 1
            av = self.adjoint(u, w)                     # A v
            sigma = math.sqrt(rho.item())
            if prev is not None and abs(sigma - prev) <= tol * max(sigma, 1e-300):
                break
            prev = sigma
            v = _unit(av)
        else:
            raise UnconvergedBoundError(
                f"{type(self).__name__}: power iteration did not reach relative change {tol:g} in {max_iter} steps")
        if rho.item() == 0.0:
            bound = 0.0
        else:
            residual = torch.linalg.vector_norm(av - rho * v).item() / rho.item()
            bound = sigma * (1.0 + max(safety, residual))
        self.power_iterate.copy_(v.to(self.power_iterate.dtype))
        self.sigma_bound.fill_(bound)
        self._bound_key = self._weight_key()
        return bound

    def _warm_start(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Where cheap, replace the iterate by A^m v (m large) before the stopping-rule loop; default: as is."""
        return v

    def certified_bound(self) -> torch.Tensor:
        """The converged float64 upper bound; raises if the weights changed since `converge()`."""
        if self._bound_key is None or self._bound_key != self._weight_key() or torch.isnan(self.sigma_bound):
            raise UnconvergedBoundError(
                f"{type(self).__name__}: the spectral-norm bound is stale; call converge() before certifying")
        return self.sigma_bound


class LipLinear(PowerIterated, nn.Linear):
    """nn.Linear with a power-iterated spectral norm of W (iterate of shape [in_features])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self._init_power_iteration()

    def _iterate_shape(self, x):
        return (self.in_features,)

    def operator(self, v, weight):
        return weight @ v

    def adjoint(self, u, weight):
        return u @ weight

    def forward(self, x):
        self._ensure_iterate(x)
        return super().forward(x)

    #: squarings of the Gram matrix in the warm start: v ← A^(2^k) v, i.e. 2^k power-iteration steps at once
    GRAM_SQUARINGS = 16
    GRAM_MAX_DIM = 1024

    def _warm_start(self, v, weight):
        """Power iteration with A^(2^k) formed by repeated squaring of the smaller Gram matrix (normalised
        at each squaring): the same fixed point, reached in k matrix products instead of 2^k steps."""
        out_f, in_f = weight.shape
        if min(out_f, in_f) > self.GRAM_MAX_DIM:
            return v
        small_right = in_f <= out_f
        G = weight.t() @ weight if small_right else weight @ weight.t()
        for _ in range(self.GRAM_SQUARINGS):
            G = G / torch.linalg.matrix_norm(G).clamp_min(1e-300)
            G = G @ G
        if small_right:
            return G @ v
        # left singular side: u ← G u with u = W v, then back to the input side
        return weight.t() @ (G @ (weight @ v))


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
        ordered, _ = pairs.sort(dim=2, descending=True)  # [max, min] per pair; cheaper than amax + amin + cat
        return ordered.transpose(1, 2).flatten(1, 2)
