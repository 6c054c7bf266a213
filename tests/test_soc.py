"""SOC layers: conformance with the official code, exact Jacobians before and after adversarial training steps,
the sound per-layer bound, HH activations, LLN, the CR loss, parameter counts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.nn.bound import LipschitzNet, NormalizedLinear, PairwiseBound
from bench.nn.lipschitz import UnconvergedBoundError
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
def test_soc_exact_jacobian_before_and_after_adversarial_steps(cin, cout, k, s, hw):
    torch.manual_seed(cin * 10 + s)
    layer = soc.SkewOrthogonalConv(cin, cout, kernel_size=k, stride=s).double()
    shape = (cin, hw, hw)
    x = torch.randn(4, *shape, dtype=torch.float64)
    for phase in ("fresh", "after 10 adversarial steps"):
        layer.eval()
        layer(x[:1])
        bound = layer.converge()
        J = layer.matrix(shape)
        # the bias only shifts: the eval layer is exactly x ↦ J x + b
        with torch.no_grad():
            np.testing.assert_allclose(layer(x).flatten(1).numpy(),
                                       (x.flatten(1) @ J.T + layer.bias.repeat_interleave(
                                           J.shape[0] // cout)).numpy(), atol=1e-10)
        sv = torch.linalg.svdvals(J)
        # power ≤ exact ≤ guaranteed; the power estimate of the eval map within 1e-9 of exact (all its singular
        # values lie within ~1e-7 of 1: a full cluster, which the block iteration still resolves)
        assert float(sv[0]) <= float(layer.certified_bound()) == bound, phase
        power = float(layer.power_bound())
        assert float(sv[0]) * (1 - 1e-9) <= power <= float(sv[0]) * (1 + 1e-12), phase
        assert 1.0 <= bound <= 1.001, phase
        # 12 terms: orthogonal to far below 1e-6 (an isometry when nothing is truncated)
        assert abs(float(sv[0]) - 1.0) <= 1e-6, phase
        if cout >= cin * s * s:
            assert float(sv[-1]) >= 1.0 - 1e-6, phase
        # train mode (5 terms): only near-orthogonal; the bound the certificate method gives for it holds
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


def test_bound_goes_stale_on_any_change():
    torch.manual_seed(0)
    layer = soc.SkewOrthogonalConv(4, 4, 3).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    layer(x)
    layer.converge()
    layer.certified_bound()
    layer.train()(x)  # a training forward moves σ's iterates: the eval map changed
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()
    layer.eval()
    layer.converge()
    with torch.no_grad():
        layer.random_conv_filter.add_(0.01)
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()


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


@pytest.mark.parametrize("name", ["maxmin", "hh1", "hh2"])
def test_activation_jacobians_and_global_lipschitz(name):
    torch.manual_seed(5)
    act = soc.ACTIVATIONS[name](8).double()
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    for phase in ("init", "after 10 adversarial steps"):
        act.eval()
        for xi in x:
            J = torch.autograd.functional.jacobian(lambda v: act(v[None])[0], xi).reshape(32, 32)
            sv = torch.linalg.svdvals(J)
            assert float(sv[0]) <= 1 + 1e-6 and float(sv[-1]) >= 1 - 1e-6, phase  # piecewise orthogonal
        # continuity across the pieces: 1-Lipschitz on random pairs, also close ones straddling boundaries
        a = torch.randn(2000, 8, 1, 1, dtype=torch.float64)
        scale = torch.logspace(-6, 0, 2000, dtype=torch.float64)[:, None, None, None]
        b = a + torch.randn(2000, 8, 1, 1, dtype=torch.float64) * scale
        with torch.no_grad():
            ratio = (act(a) - act(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        assert float(ratio.max()) <= 1 + 1e-9, phase
        if any(True for _ in act.parameters()):
            adversarial_steps(act, x, lr=0.5)


def test_hh1_at_init_is_minmax():
    act = soc.HouseHolder(4)
    x = torch.randn(5, 4, 3, 3)
    a, b = x.split(2, 1)
    assert torch.allclose(act(x), torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1), atol=1e-6)


def test_lln_jacobian_and_pairwise_bound():
    torch.manual_seed(6)
    lln = NormalizedLinear(12, 5).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    for phase in ("init", "after 10 adversarial steps"):
        J = impulse_jacobian(lambda b: lln(b) - lln.bias, (12,))
        W_hat = lln.weight / lln.weight.norm(dim=1, keepdim=True)
        assert torch.allclose(J, W_hat.detach(), atol=1e-12), phase
        bound = PairwiseBound(torch.tensor(3.0, dtype=torch.float64), lln.rows().detach())
        K = bound.pairwise()
        for i in range(5):
            for j in range(5):  # the exact Lipschitz constant of z_i − z_j is ‖ŵ_i − ŵ_j‖, times the upstream 3
                exact = 3 * float(torch.linalg.vector_norm(J[i] - J[j]))
                assert float(K[i, j]) == pytest.approx(exact, rel=1e-12), phase
        adversarial_steps(lln, x, lr=0.5)


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
