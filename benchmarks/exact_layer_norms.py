"""Every bounded layer of a trained run: its exact spectral norm next to the power-iteration estimate and the
guaranteed bound the certificate uses (a benchmark: it prints numbers and asserts nothing).

"Exact" is computed independently of both lipbench bounds, in float64:
  * dense layers: the singular values of W (LAPACK);
  * conv layers: ARPACK's Lanczos (scipy.sparse.linalg.eigsh, tol 1e-13, 6 Ritz values) on AᵀA applied with
    conv2d / conv_transpose2d on the true input shape; with --explicit (or for operators with at most
    --explicit-max columns) the explicit matrix and `eigvalsh` of its smaller Gram matrix, as a second check.

    python benchmarks/exact_layer_norms.py RUN_FOLDER [--explicit] [--explicit-max 5000]

It ends with the product of the exact norms against the run's K_up (without the input-normalisation factor):
the certificate is sound only if the product of the guaranteed bounds dominates it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load_run  # noqa: E402
from bench.nn.verify import impulse_jacobian  # noqa: E402


def lanczos_norm(layer) -> float:
    from scipy.sparse.linalg import LinearOperator, eigsh

    w = layer.weight.detach().double().cpu()
    shape = tuple(layer.power_iterate.shape)
    n = int(np.prod(shape))

    def gram(v):
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(shape)
        with torch.no_grad():
            return layer.adjoint(layer.operator(x, w), w).reshape(-1).numpy()

    op = LinearOperator((n, n), matvec=gram, dtype=np.float64)
    vals = eigsh(op, k=min(6, n - 1), which="LA", tol=1e-13, return_eigenvectors=False,
                 v0=np.random.default_rng(0).standard_normal(n))
    return math.sqrt(max(float(vals.max()), 0.0))


def explicit_norm(layer) -> float:
    w = layer.weight.detach().double().cpu()
    shape = tuple(layer.power_iterate.shape)
    in_shape = shape[1:] if len(shape) > 1 else shape
    J = impulse_jacobian(lambda b: layer.operator(b, w), in_shape)
    G = J @ J.T if J.shape[0] <= J.shape[1] else J.T @ J
    return math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--explicit", action="store_true", help="also form every conv layer's explicit matrix")
    ap.add_argument("--explicit-max", type=int, default=5000,
                    help="form the explicit matrix when the smaller side has at most this many entries")
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    run = load_run(args.run)
    print(f"run {args.run}\n  K_f (guaranteed) {run.result['K_f']!r}, K_f_power {run.result.get('K_f_power')!r}")
    layers = run.model._layers
    header = f"{'layer':<34} {'exact':>16} {'power it.':>16} {'guaranteed':>16} {'g/exact − 1':>12} {'p/exact − 1':>12}"
    print(header)
    prod_exact = prod_g = prod_p = 1.0
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        shape = tuple(layer.power_iterate.shape)
        name = f"{i + 1}: {type(layer).__name__} {tuple(layer.weight.shape)}"
        if isinstance(layer, torch.nn.Linear):
            exact = float(torch.linalg.matrix_norm(layer.weight.detach().double(), 2))
            how = "svd"
        else:
            exact = lanczos_norm(layer)
            how = "lanczos"
            in_dim = int(np.prod(shape))
            out_dim = int(np.prod(layer.operator(torch.zeros(shape, dtype=torch.float64),
                                                 layer.weight.detach().double()).shape))
            if args.explicit or min(in_dim, out_dim) <= args.explicit_max:
                ex2 = explicit_norm(layer)
                how += f", explicit {ex2!r}"
                exact = max(exact, ex2)
        g, p = float(layer.certified_bound()), float(layer.power_bound())
        prod_exact, prod_g, prod_p = prod_exact * exact, prod_g * g, prod_p * p
        print(f"{name:<34} {exact:16.10f} {p:16.10f} {g:16.10f} {g / exact - 1:12.3e} {p / exact - 1:12.3e}"
              f"   ({how}; {time.perf_counter() - t0:.0f}s)")
    print(f"{'product':<34} {prod_exact:16.6f} {prod_p:16.6f} {prod_g:16.6f} {prod_g / prod_exact - 1:12.3e} "
          f"{prod_p / prod_exact - 1:12.3e}")
    print("sound" if prod_g >= prod_exact else "UNSOUND: the guaranteed product is below the exact one")
    return 0 if prod_g >= prod_exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
