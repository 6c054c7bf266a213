"""Measured Lipschitz constants of every 1-Lipschitz layer (a benchmark: it prints numbers, it asserts nothing).

1. σ_max of each layer's exact Jacobian (float64; impulse response for maps linear in x, autograd at random
   inputs for the others), fresh and after 10 Adam steps that try to blow the layer up, next to the bound the
   certificate multiplies in. SOC is measured in eval (12 Taylor terms) and in train mode (5 terms).
2. Conformance: the largest deviation of lipbench's SOC and CPL layers from the official outputs stored in
   tests/fixtures (loaded by bench/conformance.py).
3. Parameter counts of the LipConv and CPL architectures (shape-only construction, no memory).

    python benchmarks/layer_sigma.py [--skip-conformance]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.nn.bound import NormalizedLinear  # noqa: E402
from bench.nn.verify import adversarial_steps, autograd_jacobians, impulse_jacobian, spectral_norm  # noqa: E402
from bench.nn.families import cpl, soc  # noqa: E402

Row = Tuple[str, str, float, float, str]


def _soc_rows(name: str, cin: int, cout: int, k: int, s: int, hw: int) -> List[Row]:
    torch.manual_seed(cin * 10 + s)
    layer = soc.SkewOrthogonalConv(cin, cout, kernel_size=k, stride=s).double()
    shape = (cin, hw, hw)
    x = torch.randn(4, *shape, dtype=torch.float64)
    rows = []
    for phase in ("fresh", "after 10 adv. steps"):
        layer.eval()
        layer(x[:1])
        bound = layer.converge()
        rows.append((f"{name}, eval (12 terms)", phase, spectral_norm(layer.matrix(shape)), bound, "certified bound"))
        rows.append((f"{name}, train (5 terms)", phase, spectral_norm(layer.matrix(shape, layer.train_terms)),
                     layer.truncation_bound(layer.train_terms), "1 + tail(‖A‖, 5)"))
        adversarial_steps(layer, x)
    return rows


def _nonlinear_rows(name: str, layer: torch.nn.Module, x: torch.Tensor, bound: Callable[[], float],
                    bound_name: str, lr: float = 0.05) -> List[Row]:
    rows = []
    has_params = any(True for _ in layer.parameters())
    for phase in ("fresh", "after 10 adv. steps") if has_params else ("fresh",):
        layer.eval()
        b = bound()
        rows.append((name, phase, spectral_norm(autograd_jacobians(layer, x)), b, bound_name))
        if has_params:
            adversarial_steps(layer, x, lr=lr)
    return rows


def _cpl_bound(layer: cpl.ConvexPotential, x: torch.Tensor) -> Callable[[], float]:
    def bound():
        layer(x[:1])
        return layer.converge()
    return bound


def sigma_table() -> List[Row]:
    rows: List[Row] = []
    rows += _soc_rows("SOC 3×3 s1, 8→16 (pad)", 8, 16, 3, 1, 6)
    rows += _soc_rows("SOC 3×3 s2, 4→16 (s2d)", 4, 16, 3, 2, 8)
    rows += _soc_rows("SOC 3×3 s2, 8→16 (s2d, trunc.)", 8, 16, 3, 2, 6)
    rows += _soc_rows("SOC 1×1 s1, 16→10 (trunc.)", 16, 10, 1, 1, 3)
    torch.manual_seed(11)
    conv, xc = cpl.ConvexPotentialConv(6, 10).double(), torch.randn(8, 6, 8, 8, dtype=torch.float64)
    rows += _nonlinear_rows("CPL conv 3×3, 6 ch, inner 10", conv, xc, _cpl_bound(conv, xc), "certified bound")
    lin, xl = cpl.ConvexPotentialLinear(24, 40).double(), torch.randn(8, 24, dtype=torch.float64)
    rows += _nonlinear_rows("CPL linear 24, inner 40", lin, xl, _cpl_bound(lin, xl), "certified bound")
    torch.manual_seed(5)
    xa = torch.randn(8, 8, 2, 2, dtype=torch.float64)
    for act_name in ("maxmin", "hh1", "hh2"):
        act = soc.ACTIVATIONS[act_name](8).double()
        rows += _nonlinear_rows(f"activation {act_name}", act, xa, lambda: 1.0, "taken as 1", lr=0.5)
    for glue_name, glue, shape in [("CPL channel pad 3→5", cpl.ChannelPad(5), (3, 8, 8)),
                                   ("CPL sum-pool 4×4 / 4", cpl.SumPool(), (3, 8, 8)),
                                   ("truncation 40→10", cpl.Truncate(10), (40,))]:
        rows.append((glue_name, "fixed", spectral_norm(impulse_jacobian(glue, shape)), 1.0, "taken as 1"))
    torch.manual_seed(6)
    lln = NormalizedLinear(12, 5).double()
    J = impulse_jacobian(lambda b: lln(b) - lln.bias, (12,))
    worst_pair = float(torch.linalg.vector_norm(J[:, None] - J[None], dim=2).max())
    rows.append(("LLN 12→5: max_ij ‖∇(z_i − z_j)‖", "fresh", worst_pair,
                 float(lln.rows().detach().unsqueeze(1).sub(lln.rows().detach()).norm(dim=2).max()),
                 "pairwise ‖ŵ_i − ŵ_j‖"))
    return rows


def conformance_table() -> List[Tuple[str, str, float]]:
    from bench import conformance as official
    t64 = official.t64
    out = []
    for case in sorted(official.SOC_CASES):
        layer, z = official.soc_layer(case)
        x = t64(z["x"])
        with torch.no_grad():
            y = layer.eval()(x)
        out.append((case, "y_eval (12 terms), max abs. Δ", float(np.abs(y.numpy() - z["y_eval"]).max())))
        with torch.no_grad():
            sig = float(layer.sigma(layer.skew_filter()))
        out.append((case, "σ (min of 4), relative Δ", abs(sig - float(z["sigma"])) / abs(float(z["sigma"]))))
        fresh, _ = official.soc_layer(case, before=True)
        with torch.no_grad():
            y = fresh.train()(x)
        out.append((case, "y_train (50 σ steps, 5 terms), max abs. Δ", float(np.abs(y.numpy() - z["y_train"]).max())))
        out.append((case, "u1 after the train forward, max abs. Δ", float(np.abs(fresh.u1.numpy() - z["u1"]).max())))
    for case in sorted(official.CPL_CASES):
        layer, z = official.cpl_layer(case)
        x = t64(z["x"])
        trained = copy.deepcopy(layer)  # the official eval case starts from the stored iterate, not after a step
        with torch.no_grad():
            y = trained.train()(x)
        out.append((case, "y_train (1 power step), max abs. Δ", float(np.abs(y.numpy() - z["y_train_from_init"]).max())))
        out.append((case, "pm.u after the train step, max abs. Δ",
                    float(np.abs(trained.power_iterate.numpy() - z["pm_u_after_train_step"]).max())))
        with torch.no_grad():
            y = layer.eval()(x)
        out.append((case, "eval_sv_max (100 steps), relative Δ",
                    abs(float(layer.eval_sv_max) - float(z["eval_sv_max"][0])) / float(z["eval_sv_max"][0])))
        out.append((case, "y_eval, max abs. Δ", float(np.abs(y.numpy() - z["y_eval"]).max())))
        layer.converge()
        exact = float(z["exact_weight_spectral_norm"])
        out.append((case, "converged σ (ours) vs exact ‖W‖, relative Δ", abs(float(layer.eval_sv_max) - exact) / exact))
    return out


#: what the sources say (reference/peer-methods.md §2–3, reference/cll-paper.md §4.2); "" where none gives one
PUBLISHED_PARAMS = {
    "lipconv-10": "20.9 M trainable (official LipConvNet-10; it also registers 117,771 σ-iterate values as "
                  "frozen parameters, buffers here)",
    "lipconv-20": "27.2 M trainable (official LipConvNet-20; 181,269 frozen σ-iterate values besides)",
    "lipconv-20-linear": "",
    "cpl-s": "41.4 M (reference notes: 20 conv × 45 ch, 7 × 2048; lipbench's cpl-s-lln has 41,371,426)",
    "cpl-m": "", "cpl-l": "",
    "cpl-xl": "472 M (the reference paper's fork, 70 conv × 120 ch); LBDN's XL (120 conv × 70 ch): 276 M; "
              "the CLL paper's text: 'XL: 1.1B' (citing LBDN)",
    "cpl-xl-linear": "",
}


def parameter_table() -> List[Tuple[str, int, str]]:
    from bench.registry import ARCHS
    rows = []
    for arch, published in PUBLISHED_PARAMS.items():
        spec = ARCHS.get(arch).spec
        with torch.device("meta"):
            modules = (soc.lipconv_modules if arch.startswith("lipconv") else cpl.cpl_modules)(
                (3, 32, 32), 10, **spec)
        rows.append((arch, sum(p.numel() for m in modules[:2] for p in m.parameters()), published))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-conformance", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("## σ_max of the exact Jacobian (float64) vs the bound the certificate uses\n")
    print("| layer | phase | σ_max (exact) | bound | bound is |")
    print("|---|---|---|---|---|")
    for name, phase, sigma, bound, what in sigma_table():
        print(f"| {name} | {phase} | {sigma:.9f} | {bound:.9f} | {what} |")
    if not args.skip_conformance:
        print("\n## Deviation from the official implementations (tests/fixtures)\n")
        print("| case | quantity | deviation |")
        print("|---|---|---|")
        for case, what, dev in conformance_table():
            print(f"| {case} | {what} | {dev:.2e} |")
    print("\n## Parameters (CIFAR-10, 32×32, 10 classes)\n")
    print("| arch | parameters | sources |")
    print("|---|---|---|")
    for arch, n, published in parameter_table():
        print(f"| {arch} | {n:,} | {published} |")


if __name__ == "__main__":
    main()
