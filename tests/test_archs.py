"""The image architectures of Table B2: parameter counts, layer specs, MaxMin placement, kaiming init."""
import math

import pytest
import torch
import torch.nn as nn

import bench.nn.archs  # noqa: F401  (registers the architectures)
from bench.nn.archs import count_parameters
from bench.nn.lipschitz import LipConv2d, LipLinear, MaxMin
from bench.registry import ARCHS

# (arch, input shape, classes, parameters, [(kind, out, kernel, stride, padding) | ("d", out)], flatten width)
TABLE_B2 = [
    ("4c3f", (3, 32, 32), 10, 2_466_858,
     [("c", 32, 3, 1, 1), ("c", 32, 4, 2, 1), ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 1), ("d", 512), ("d", 512),
      ("d", 10)], 4096),
    # the official CLL 4C3F configs: 3×3 stride-2 convs (reference/cll-official-code.md §3)
    ("4c3f-k3", (3, 32, 32), 10, 2_431_018,
     [("c", 32, 3, 1, 1), ("c", 32, 3, 2, 1), ("c", 64, 3, 1, 1), ("c", 64, 3, 2, 1), ("d", 512), ("d", 512),
      ("d", 10)], 4096),
    ("6c2f", (3, 32, 32), 10, 2_250_378,
     [("c", 32, 3, 1, 1), ("c", 32, 3, 1, 1), ("c", 32, 4, 2, 1), ("c", 64, 3, 1, 1), ("c", 64, 3, 1, 1),
      ("c", 64, 4, 2, 1), ("d", 512), ("d", 10)], 4096),
    ("8c2f", (3, 64, 64), 200, 4_342_984,
     [("c", 64, 3, 1, 1), ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 0), ("c", 128, 3, 1, 1), ("c", 128, 3, 1, 1),
      ("c", 128, 4, 2, 0), ("c", 256, 3, 1, 1), ("c", 256, 4, 2, 0), ("d", 256), ("d", 200)], 9216),
]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {name: ARCHS.get(name)(shape, classes) for name, shape, classes, *_ in TABLE_B2}


@pytest.mark.parametrize("name,shape,classes,params,spec,flat", TABLE_B2, ids=[r[0] for r in TABLE_B2])
def test_parameter_count_and_layers_follow_table_b2(nets, name, shape, classes, params, spec, flat):
    net = nets[name]
    assert count_parameters(net) == params
    layers = [m for m in list(net.features) + [net.classifier] if isinstance(m, (LipConv2d, LipLinear))]
    got = [("c", m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) if isinstance(m, LipConv2d)
           else ("d", m.out_features) for m in layers]
    assert got == spec
    first_dense = next(m for m in layers if isinstance(m, LipLinear))
    assert first_dense.in_features == flat
    assert net(torch.zeros(2, *shape)).shape == (2, classes)


@pytest.mark.parametrize("name", [r[0] for r in TABLE_B2])
def test_maxmin_follows_every_layer_but_the_last(nets, name):
    children = [m for m in nets[name].features if not isinstance(m, nn.Flatten)]
    kinds = ["L" if isinstance(m, (LipConv2d, LipLinear)) else "A" if isinstance(m, MaxMin) else "?" for m in children]
    assert "".join(kinds) == "LA" * (len(kinds) // 2)
    assert isinstance(nets[name].classifier, LipLinear)  # the last layer has no activation after it


def test_kaiming_normal_init_and_zero_bias(nets):
    """kaiming_normal_ (fan_in, gain √2), zero bias: the official `util.init_weights('kaiming')`."""
    for name in ("4c3f", "8c2f"):
        for m in list(nets[name].features) + [nets[name].classifier]:
            if not isinstance(m, (LipConv2d, LipLinear)):
                continue
            w = m.weight.detach()
            fan_in = w[0].numel()
            if w.numel() >= 20_000:  # large enough for a tight estimate of the std
                assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)
                assert abs(w.mean().item()) < 0.05 * math.sqrt(2.0 / fan_in)
            assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize("shape", [(5, 8), (3, 6, 4, 4)])
def test_maxmin_training_path_equals_evaluation_and_routes_each_gradient_to_one_entry(shape):
    # training's MaxMin (a gather by the pair's order) against its evaluation path and against the rule written
    # out: the max slot's gradient goes to the larger entry of its pair, to the first at a tie; the min slot's to
    # the other
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    x[:, 1] = x[:, 0]                                    # a tie in the first pair
    w = torch.randn(shape, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = MaxMin()(xg)
    with torch.no_grad():
        assert torch.equal(out, MaxMin()(x))
    (grad,) = torch.autograd.grad((out * w).sum(), xg)
    c = shape[1] // 2
    a, b = x[:, 0::2], x[:, 1::2]
    first = a >= b
    w_max, w_min = w[:, :c], w[:, c:]
    expected = torch.empty_like(x)
    expected[:, 0::2] = torch.where(first, w_max, w_min)
    expected[:, 1::2] = torch.where(first, w_min, w_max)
    assert torch.equal(grad, expected)
