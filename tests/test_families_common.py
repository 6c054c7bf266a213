"""The shared head builder (bench/nn/families/common.py) and the family/method split."""
import subprocess
import sys

import pytest
import torch

from bench.nn.bound import NormalizedLinear
from bench.nn.families import cpl, sandwich, sll, soc
from bench.nn.families.common import FlattenLinear, Truncate, make_head, truncate_head
from bench.registry import ARCHS


def test_make_head_kinds():
    own = {"trunc": truncate_head}
    lln, one = make_head("lln", 12, 5, own, "X")
    assert type(lln) is NormalizedLinear and not one
    lin, one = make_head("linear", 12, 5, own, "X")
    assert type(lin) is FlattenLinear and not one
    x = torch.randn(3, 3, 2, 2)   # flattens its input; rows are its weight
    assert torch.allclose(lin(x), x.flatten(1) @ lin.weight.t() + lin.bias)
    trunc, one = make_head("trunc", 12, 5, own, "X")
    assert type(trunc) is Truncate and one
    with pytest.raises(ValueError, match="unknown X head 'soc'; use trunc, lln, linear"):
        make_head("soc", 12, 5, own, "X")
    with pytest.raises(ValueError, match="truncation needs at least 13 features"):
        make_head("trunc", 12, 13, own, "X")


@pytest.mark.parametrize("builder,spec,heads", [
    (soc.lipconv_modules, dict(block_size=1, init_channels=4), {"soc": soc.SOCHead}),
    (cpl.cpl_modules, dict(depth=1, channels=4, depth_linear=1, n_features=16), {"trunc": Truncate}),
    (sll.sll_modules, dict(n_conv=1, n_dense=1, w=4, dense_inner=16), {"trunc": Truncate}),
    (sandwich.sandwich_modules, dict(convs=[(4, 2)], fcs=(16,)), {"lin": sandwich.SandwichLin}),
])
def test_every_family_builds_its_heads_with_make_head(builder, spec, heads):
    for kind, cls in {**heads, "lln": NormalizedLinear, "linear": FlattenLinear}.items():
        with torch.device("meta"):
            _, classifier, one = builder((3, 32, 32), 10, head=kind, **spec)
        assert type(classifier) is cls and one == (kind in heads)
    with pytest.raises(ValueError, match="unknown .* head"):
        builder((3, 32, 32), 10, head="nope", **spec)


def test_families_register_without_methods():
    """The families register their architectures by themselves and never import methods/."""
    code = ("import sys, bench.nn.families; from bench.registry import ARCHS; "
            "assert not any(m == 'methods' or m.startswith('methods.') for m in sys.modules), sorted(sys.modules); "
            "print(ARCHS.get('lipconv-10').family, ARCHS.get('cpl-s').family)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["lipconv", "cpl"]


def test_registry_loads_the_families():
    assert {"lipconv-10", "cpl-s", "sll-s", "sandwich"} <= set(ARCHS.names())
