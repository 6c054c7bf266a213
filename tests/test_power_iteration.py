"""The converged power-iteration bound is an upper bound on the exact spectral norm, within 1e-4 of it."""
import itertools

import numpy as np
import pytest
import torch

from bench.nn.lipschitz import LipConv2d, LipLinear, UnconvergedBoundError
from tests.conftest import fixture, t64


def exact_norm(layer: torch.nn.Module, input_shape) -> float:
    """σ_max of the layer's linear part from its impulse-response Jacobian (float64 SVD)."""
    layer = layer.double()
    n = int(np.prod(input_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        cols = layer.operator(basis, layer.weight.double())
    return float(torch.linalg.matrix_norm(cols.reshape(n, -1), ord=2))


@pytest.mark.parametrize("shape", [(7, 5), (32, 64), (64, 16)])
def test_linear_bound_is_upper_and_tight(shape):
    torch.manual_seed(0)
    layer = LipLinear(shape[1], shape[0])
    layer(torch.zeros(1, shape[1]))
    bound = layer.converge()
    exact = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    assert exact <= bound <= exact * (1 + 1e-4)


CONV_CASES = list(itertools.product([1, 2], [3, 4], [0, 1]))


@pytest.mark.parametrize("stride,kernel,padding", CONV_CASES)
def test_conv_bound_is_upper_and_tight(stride, kernel, padding):
    torch.manual_seed(stride * 100 + kernel * 10 + padding)
    shape = (3, 9, 9)  # odd size: 3×3 stride-2 is the case where the official iterate shrinks
    layer = LipConv2d(3, 4, kernel, stride=stride, padding=padding)
    layer(torch.zeros(1, *shape))
    bound = layer.converge()
    exact = exact_norm(layer, shape)
    assert layer.power_iterate.shape[-3:] == shape  # output_padding keeps the iterate at the input shape
    assert exact <= bound <= exact * (1 + 1e-4), (bound, exact)


def test_conv_even_input_stride2_k3_reaches_exact_norm():
    """The official case that under-estimates (reference §8.1): 3×3, stride 2, padding 1 on 32×32."""
    z = fixture("cll_conv_power_iteration_k3s2p1")
    layer = LipConv2d(3, 4, 3, stride=2, padding=1).double()
    with torch.no_grad():
        layer.weight.copy_(t64(z["weight"]))
    layer(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    layer.power_iterate = t64(z["power_iterate_init"]) / torch.linalg.vector_norm(t64(z["power_iterate_init"]))
    bound = layer.converge()
    exact = float(z["exact_spectral_norm"])
    assert float(z["sigma_post_training_hook"]) < exact  # the official bound is below the true norm
    assert exact <= bound <= exact * (1 + 1e-4)
    assert tuple(layer.power_iterate.shape) == (1, 3, 32, 32)


def test_conv_trajectory_matches_official_where_shapes_agree():
    """k4s2p1 keeps the iterate's shape in the official code too: the same algorithm, the same trajectory.
    The official σ divides by ‖x‖² + 1e-9, so the two agree to ~5e-10 relative, not bit for bit."""
    z = fixture("cll_conv_power_iteration_k4s2p1")
    layer = LipConv2d(3, 4, 4, stride=2, padding=1).double()
    with torch.no_grad():
        layer.weight.copy_(t64(z["weight"]))
    layer(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    layer.power_iterate = t64(z["power_iterate_init"])
    ours, done = [], 0
    for n in z["trajectory_iterations"]:
        ours.append(float(layer.train_bound(int(n) - done).detach()))
        done = int(n)
    np.testing.assert_allclose(ours, z["sigma_trajectory"], rtol=1e-8)
    assert z["exact_spectral_norm"] <= layer.converge() <= z["exact_spectral_norm"] * (1 + 1e-4)


def test_bound_goes_stale_after_a_weight_update():
    layer = LipLinear(6, 4)
    layer(torch.zeros(1, 6))
    layer.converge()
    layer.certified_bound()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 6)).sum().backward()
    opt.step()
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()


def test_iterate_lives_in_state_dict_and_loads_into_a_fresh_layer():
    torch.manual_seed(1)
    a = LipConv2d(2, 3, 3, padding=1)
    a(torch.zeros(1, 2, 6, 6))
    a.train_bound(7)
    state = a.state_dict()
    assert "power_iterate" in state and tuple(state["power_iterate"].shape) == (1, 2, 6, 6)
    b = LipConv2d(2, 3, 3, padding=1)
    b.load_state_dict(state)
    assert torch.equal(b.power_iterate, a.power_iterate)
    assert torch.allclose(b.train_bound(0), a.train_bound(0))


def test_training_bound_carries_gradient_to_the_weight():
    layer = LipLinear(5, 5)
    layer(torch.zeros(1, 5))
    sigma = layer.train_bound(5)
    sigma.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
