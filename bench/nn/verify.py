"""Exact Lipschitz checks of single layers: the Jacobian itself, not a bound on it.

A bound that a certificate multiplies in must dominate the layer's true Lipschitz constant. These helpers
measure that constant exactly on small inputs (float64), so tests and `benchmarks/layer_sigma.py` can compare
it with the bound, before and after training steps chosen to break the layer (as orthogonium's tests do).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def impulse_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int]) -> torch.Tensor:
    """The matrix [out, in] of a map linear in x, from its responses to the standard basis (float64)."""
    n = math.prod(int(d) for d in in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        return fn(basis).reshape(n, -1).T


def autograd_jacobians(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians [B, out, in] of a nonlinear map at each row of x, by autograd."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi)
        out.append(J.reshape(-1, xi.numel()))
    return torch.stack(out)


def spectral_norm(J: torch.Tensor) -> float:
    """σ_max of one Jacobian, or the largest over a batch of them."""
    return float(torch.linalg.matrix_norm(J, 2).max())


def adversarial_steps(module: torch.nn.Module, x: torch.Tensor, steps: int = 10, lr: float = 0.05,
                      seed: int = 1) -> None:
    """`steps` Adam steps in training mode that maximise ‖y‖ plus a fixed random projection of y (so that
    norm-preserving layers still move their parameters), then back to eval: a layer whose constraint holds only
    at initialisation fails its Jacobian check afterwards."""
    g = torch.Generator().manual_seed(seed)
    module.train()
    direction = torch.randn(module(x).shape, generator=g, dtype=x.dtype)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        y = module(x)
        loss = -(y.norm() + (direction * y).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
