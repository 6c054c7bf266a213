"""SOC layers: conformance with the official code, the training map's truncation bound, the sound per-layer bound
under stale σ iterates, the fantastic-four bound, HH1 at init, the CR loss, parameter counts. The layer contract
(exact Jacobians against the certificate before and after adversarial steps, stale bounds, state_dict round
trips; SOC, LLN, HH1, HH2, MaxMin) is tests/test_layer_contract.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.nn.verify import adversarial_steps, impulse_jacobian
from bench.nn.families import soc
from methods import soc as soc_method
from tests import official
from tests.conftest import fixture, t64

@pytest.mark.parametrize("case", sorted(official.SOC_CASES))
def test_conformance_with_official_soc(case):
    fixture(case)  # skips when tests/fixtures is absent
    layer, z = official.soc_layer(case)
    layer.eval()
    x = t64(z["x"])
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).numpy(), z["y_eval"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(float(layer.sigma(layer.skew_filter())), float(z["sigma"]), rtol=1e-12)
    # the training forward from the construction-time iterates: 50 σ updates, then 5 terms. The official
    # l2_normalize takes the norm in float32 (fixtures README), so this matches to ~1e-7 only.
    fresh, _ = official.soc_layer(case, before=True)
    fresh.train()
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), z["y_train"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fresh.u1.numpy(), z["u1"], atol=1e-6)
    assert int(fresh.total_iters) == int(z["total_iters"])
    # lipbench's bounds of the official layer's eval map (explicit fp64 matrix): power ≤ exact ≤ guaranteed
    layer.converge()
    exact = float(torch.linalg.matrix_norm(layer.matrix(tuple(x.shape[1:])), 2))
    assert exact * (1 - 1e-9) <= float(layer.power_bound()) <= exact * (1 + 1e-12)
    assert exact <= float(layer.certified_bound()) <= 1.001


JAC_CASES = [(4, 8, 3, 1, 6), (4, 8, 3, 2, 6), (8, 6, 1, 1, 3)]  # cin, cout, k, stride, H: pad, s2d+truncate, 1×1


@pytest.mark.parametrize("cin,cout,k,s,hw", JAC_CASES)
def test_train_mode_map_is_within_its_truncation_bound(cin, cout, k, s, hw):
    """The eval map (12 terms) is covered by tests/test_layer_contract.py. The training map (5 terms) is only
    near-orthogonal; the truncation bound the certificate method gives for it holds, before and after 10
    adversarial steps."""
    torch.manual_seed(cin * 10 + s)
    layer = soc.SkewOrthogonalConv(cin, cout, kernel_size=k, stride=s).double()
    shape = (cin, hw, hw)
    x = torch.randn(4, *shape, dtype=torch.float64)
    for phase in ("fresh", "after 10 adversarial steps"):
        layer.eval()
        J5 = layer.matrix(shape, layer.train_terms)
        assert float(torch.linalg.matrix_norm(J5, 2)) <= layer.truncation_bound(layer.train_terms), phase
        adversarial_steps(layer, x)


def test_fresh_model_certifies_without_a_training_step():
    """The official init-order bug: σ's iterates come from a discarded filter. Here they match the filter."""
    torch.manual_seed(3)
    layer = soc.SkewOrthogonalConv(8, 8, 3).double().eval()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x) - layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-6)
    A = layer.skew_filter().detach()
    reshapes = [A.permute(0, 2, 1, 3).reshape(24, 24), A.permute(0, 3, 1, 2).reshape(24, 24),
                A.reshape(8, 72), A.permute(1, 0, 2, 3).reshape(8, 72)]
    exact = min(float(torch.linalg.matrix_norm(R, 2)) for R in reshapes)
    # σ comes from 50 power steps on *this* filter (from below; the official one is a mismatched quotient)
    assert 0.95 * exact <= float(layer.sigma(A)) <= exact * (1 + 1e-9)


def test_truncation_bound_covers_a_badly_scaled_filter():
    """With stale σ iterates ‖A_n‖ can exceed 1: the certified bound still dominates the exact norm."""
    torch.manual_seed(4)
    layer = soc.SkewOrthogonalConv(4, 4, 3).double().eval()
    with torch.no_grad():
        layer.correction.fill_(3.0)  # ‖A_n‖ ≈ 3/0.7 × the usual: 12 terms leave a visible truncation error
    shape = (4, 5, 5)
    layer(torch.zeros(1, *shape, dtype=torch.float64))
    bound = layer.converge()
    A_n = layer.scaled_filter().detach()
    exact = float(torch.linalg.matrix_norm(layer.matrix(shape), 2))
    assert exact > 1 + 1e-6 and exact <= bound
    assert layer.filter_norm_bound() >= float(torch.linalg.matrix_norm(
        impulse_jacobian(lambda b: F.conv2d(b, A_n, padding=1), shape), 2))


@pytest.mark.parametrize("cin,cout,k,hw,seed", [(4, 4, 3, 5, 0), (6, 3, 3, 4, 1), (3, 6, 5, 6, 2), (5, 5, 1, 3, 3)])
def test_fantastic_four_bound_dominates_the_conv_norm(cin, cout, k, hw, seed):
    """a = √(hw)·min_r ‖R_r‖ ≥ ‖conv(A_n)‖ for the zero-padded conv, also for unskewed, badly conditioned filters
    (the proof does not use skew symmetry), and it is what σ's four estimates approach from below."""
    torch.manual_seed(seed)
    layer = soc.SkewOrthogonalConv(cin, cout, k).double().eval()
    M = layer.max_channels
    with torch.no_grad():  # a filter with one dominant spatial tap and a spread of channel scales
        layer.random_conv_filter.mul_(torch.logspace(-1, 1, M, dtype=torch.float64).view(M, 1, 1, 1))
        layer.random_conv_filter[:, :, k // 2, k // 2] *= 5
    A_n = layer.scaled_filter().detach()
    exact = float(torch.linalg.matrix_norm(
        impulse_jacobian(lambda b: F.conv2d(b, A_n, padding=k // 2), (M, hw, hw)), 2))
    a = layer.filter_norm_bound()
    assert exact <= a
    # a is √(hw)·min_r ‖R_r‖ with each ‖R_r‖ a guaranteed Gram bound (never below the exact reshape norm), times
    # the float32 allowance; FILTER_GRAM_STEPS = 14 squarings leave it ≤ rank^(1/2^15) above: measured ≤ 6e-14,
    # and 2.1e-5 for the 1×1 filter (a skew matrix: its singular values come in equal pairs, 2^(1/2^15) − 1)
    norms = [float(torch.linalg.matrix_norm(R, 2)) for R in layer.filter_reshapes(A_n).values()]
    reference = k * min(norms) * (1 + layer.FILTER_ROUNDING)
    assert reference * (1 - 1e-13) <= a <= reference * (1 + 1e-4)
    assert min(norms) == pytest.approx(min(norms[0], norms[2]), rel=1e-13)  # R₂ = −R₁ᵀ, R₄ = −R₃ᵀ (skew)
    for P in (torch.randn(M, M, k, k, dtype=torch.float64), torch.randn(M, M, k, k, dtype=torch.float64) ** 3):
        R_min = min(float(torch.linalg.matrix_norm(R, 2)) for R in layer.filter_reshapes(P).values())
        conv = float(torch.linalg.matrix_norm(impulse_jacobian(lambda b: F.conv2d(b, P, padding=k // 2),
                                                               (M, hw, hw)), 2))
        assert conv <= k * R_min * (1 + 1e-12)


def test_taylor_tail():
    for a, K in [(0.5, 5), (2.1, 12), (3.0, 5), (1e-3, 12), (20.0, 12)]:
        expected = math.fsum(math.exp(i * math.log(a) - math.lgamma(i + 1)) for i in range(K + 1, K + 200))
        assert soc.taylor_tail(a, K) == pytest.approx(expected, rel=1e-12)
    assert soc.taylor_tail(0.0, 5) == 0.0


def test_hh1_at_init_is_minmax():
    act = soc.HouseHolder(4)
    x = torch.randn(5, 4, 3, 3)
    a, b = x.split(2, 1)
    assert torch.allclose(act(x), torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1), atol=1e-6)


def small_lipconv(head):
    features, classifier, one = soc.lipconv_modules((3, 32, 32), 10, block_size=1, init_channels=4, head=head)
    return soc.LipConvNet(features, classifier, (3, 32, 32), 10, normalize=(soc.CIFAR_MEAN, soc.SOC_STD),
                          last_layer_one_lipschitz=one).double()


@pytest.mark.parametrize("head", ["soc", "lln"])
def test_cr_loss_matches_official_certificates(head):
    torch.manual_seed(7)
    net = small_lipconv(head).train()
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    y = torch.arange(6) % 10
    z = net(x)
    L = net.input_factor  # 1/0.2507 (of the float32 std)
    assert L == pytest.approx(1 / 0.2507, rel=1e-7)
    bound = net.bound()
    cert = soc_method.label_certificates(z, y, bound, 10)
    if head == "soc":  # ortho_certificates: (z_y − max_{j≠y} z_j)/(√2·L)
        other = z.masked_fill(F.one_hot(y, 10).bool(), -1e9).amax(1)
        expected = (z.gather(1, y[:, None])[:, 0] - other) / (math.sqrt(2) * L)
    else:              # lln_certificates: min_{j≠y} (z_y − z_j)/(‖ŵ_y − ŵ_j‖·L)
        W = net.classifier.rows()
        d = (W[y][:, None] - W[None]).norm(dim=2) + F.one_hot(y, 10)
        expected = ((z.gather(1, y[:, None]) - (z - 1e6 * F.one_hot(y, 10))) / (d * L)).amin(1)
    assert torch.allclose(cert, expected, rtol=1e-10)
    method = soc_method.SOC({"gamma": 0.3, "eps": 0.1}, 10)
    loss, _ = method.loss(z, y, bound, 0.0)
    expected_loss = F.cross_entropy(z, y) - 0.3 * F.relu(expected).mean()
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-10)


def test_no_weight_decay_on_activation_parameters():
    net = small_lipconv("soc")
    groups = net.param_groups(5e-4)
    no_wd = [g for g in groups if g["weight_decay"] == 0.0][0]["params"]
    thetas = [p for m in net.modules() if isinstance(m, soc.HouseHolder) for p in m.parameters()]
    assert {id(p) for p in no_wd} == {id(p) for p in thetas}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


# LipConvNet-10 / -20 (block size 2 / 4), CIFAR 32×32, 10 classes, HH1. The reference notes count 20.9 M and
# 27.2 M parameters for the official LipConvNet (reference/peer-methods.md §2); the official module also holds
# its σ iterates u1..v4 and `correction` as parameters (117,771 / 181,269 more), which are buffers here.
PARAMS = {("lipconv-10", "soc"): 20_923_770, ("lipconv-10", "lln"): 19_885_434, ("lipconv-10", "linear"): 19_885_434,
          ("lipconv-20", "soc"): 27_212_058, ("lipconv-20", "lln"): 26_173_722, ("lipconv-20", "linear"): 26_173_722}


@pytest.mark.parametrize("arch,head", sorted(PARAMS))
def test_lipconv_parameter_counts(arch, head):
    with torch.device("meta"):  # no memory, no forward: the count of the same modules the factory builds
        features, classifier, _ = soc.lipconv_modules((3, 32, 32), 10, block_size=int(arch[-2:]) // 5, head=head)
    count = sum(p.numel() for m in (features, classifier) for p in m.parameters())
    assert count == PARAMS[(arch, head)]


def test_registered_lipconv_factory_matches_spec():
    from bench.registry import ARCHS
    spec = ARCHS.get("lipconv-20-lln-maxmin").spec
    assert spec == {"block_size": 4, "activation": "maxmin", "head": "lln"}
    assert ARCHS.get("lipconv-10").family == "lipconv"
