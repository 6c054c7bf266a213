"""The conformance cases in tests/fixtures (inputs, parameters and outputs of the official implementations; their
README.md and fixtures.json describe every array), loaded into lipbench layers. Shared by the conformance tests
and `benchmarks/layer_sigma.py`."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from bench.nn.families import cpl, soc

#: the fixtures ship with the repository (1.2 MB)
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

#: case → (c_in, c_out, kernel, stride)
SOC_CASES = {"soc_c16_k3_s1": (16, 16, 3, 1), "soc_c8to16_k3_s1": (8, 16, 3, 1),
             "soc_c8to16_k3_s2": (8, 16, 3, 2), "soc_c16to10_k1_s1": (16, 10, 1, 1)}
#: case → (layer kind, c_in, inner)
CPL_CASES = {"cpl_conv_c6_inner10_hw8": ("conv", 6, 10), "cpl_linear_c24_inner40": ("linear", 24, 40)}


def load_fixture(name: str, root: Path = FIXTURES) -> Dict[str, np.ndarray]:
    """The arrays of conformance case `name` (`<root>/<name>.npz`, loaded without pickle)."""
    path = Path(root) / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"conformance fixture {path} not found")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def soc_layer(case: str, before: bool = False) -> Tuple[soc.SkewOrthogonalConv, Dict[str, np.ndarray]]:
    """The official SOC layer of `case` (float64): its filter, bias, correction and σ iterates, either the
    final ones or (`before`) those at construction, before the recorded training forward."""
    z = load_fixture(case)
    cin, cout, k, s = SOC_CASES[case]
    layer = soc.SkewOrthogonalConv(cin, cout, kernel_size=k, stride=s).double()
    with torch.no_grad():
        layer.random_conv_filter.copy_(t64(z["random_conv_filter"]))
        layer.bias.copy_(t64(z["bias"]))
        layer.correction.copy_(t64(z["correction"]))
        for i in range(1, 5):
            for side in "uv":
                getattr(layer, f"{side}{i}").copy_(t64(z[f"{side}{i}_before" if before else f"{side}{i}"]))
    return layer, z


def cpl_layer(case: str) -> Tuple[cpl.ConvexPotential, Dict[str, np.ndarray]]:
    """The official CPL layer of `case` (float64) with its stored power-iteration start `pm_u_init`."""
    z = load_fixture(case)
    kind, cin, inner = CPL_CASES[case]
    if kind == "conv":
        layer, name = cpl.ConvexPotentialConv(cin, inner).double(), "kernel"
    else:
        layer, name = cpl.ConvexPotentialLinear(cin, inner).double(), "weights"
    with torch.no_grad():
        getattr(layer, name).copy_(t64(z[name]))
        layer.bias.copy_(t64(z["bias"]))
    layer.power_iterate = t64(z["pm_u_init"]).clone()
    return layer, z
