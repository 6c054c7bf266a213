"""One small test per known soundness bug of Lipschitz-margin certificates. Each test first shows that the buggy
variant really gives a wrong (unsound) answer on the case, then that lipbench's answer is sound on it."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import certify
from bench.data.base import DataBundle
from bench.method import Method
from bench.nn.archs import build_plain
from bench.nn.bound import LipschitzNet, PairwiseBound, bounded_layers
from bench.nn.lipschitz import LipConv2d, LipLinear, MaxMin, UnconvergedBoundError
from bench.nn.verify import autograd_jacobians, impulse_jacobian


def exact_norm(J: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(J, 2))


def conv_matrix(weight: torch.Tensor, shape, stride=1, padding=0) -> torch.Tensor:
    w = weight.detach().double()
    return impulse_jacobian(lambda b: F.conv2d(b, w, None, stride, padding), shape)


# -- 1. power iteration stopped by a relative-change rule under a near-degenerate top pair ----------------------
def old_converge(layer, v: torch.Tensor, tol: float = 1e-9, safety: float = 1e-5, max_iter: int = 100_000) -> float:
    """lipbench's converge() before the guaranteed bounds: single-vector power iteration in float64 until the
    relative change of σ is below tol, then σ·(1 + max(safety, eigen-residual))."""
    w = layer.weight.detach().double()
    v = v / v.norm()
    prev = None
    for _ in range(max_iter):
        u = layer.operator(v, w)
        rho = float((u * u).sum())
        av = layer.adjoint(u, w)
        sigma = math.sqrt(rho)
        if prev is not None and abs(sigma - prev) <= tol * sigma:
            break
        prev = sigma
        v = av / av.norm()
    residual = float(torch.linalg.vector_norm(av - rho * v)) / rho
    return sigma * (1 + max(safety, residual))


def test_near_degenerate_pair_stalls_power_iteration_but_not_the_guaranteed_bound():
    w0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    weight[0, 0], weight[1, 1] = w0, w0 * (1 - 1e-4)      # two channels, frequency responses 1e-4 apart
    layer = LipConv2d(2, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    shape = (2, 6, 6)
    layer(torch.zeros(1, *shape, dtype=torch.float64))
    J = conv_matrix(weight, shape, padding=1)
    _, sv, Vh = torch.linalg.svd(J)
    exact = float(sv[0])
    assert float((sv[0] - sv[1]) / sv[0]) == pytest.approx(1e-4, rel=1e-6)   # the pair is near-degenerate
    v2 = Vh[1].reshape(1, *shape)                                               # the second singular direction

    buggy = old_converge(layer, v2.clone())
    assert buggy < exact * (1 - 5e-5)     # residual inflation (≤ 1e-5 here) cannot bridge the 1e-4 gap

    layer.power_iterate = v2.clone()
    layer.converge()
    assert float(layer.certified_bound()) >= exact
    assert float(layer.power_bound()) <= exact * (1 + 1e-12)   # the power column stays a lower estimate


# -- 2. compositions of unknown Lipschitz constant: residual merges -----------------------------------------------
class Residual(nn.Module):
    """scale·(x + g(x)): a plain residual merge (scale 1) or an orthogonium-style (x + g(x))/√2."""

    def __init__(self, g: nn.Module, scale: float = 1.0):
        super().__init__()
        self.g, self.scale = g, scale

    def forward(self, x):
        return self.scale * (x + self.g(x))


@pytest.mark.parametrize("scale,expected", [(1.0, 2.0), (1 / math.sqrt(2), math.sqrt(2))])
def test_residual_merge_is_refused(scale, expected):
    g = LipLinear(6, 6, bias=False).double()
    with torch.no_grad():
        g.weight.copy_(torch.eye(6, dtype=torch.float64))       # 1-Lipschitz, and its bound says so
    g(torch.zeros(1, 6, dtype=torch.float64))
    assert g.converge() == pytest.approx(1.0, abs=1e-12)
    block = Residual(g, scale).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    exact = max(exact_norm(J) for J in autograd_jacobians(block, x))
    claimed = float(g.certified_bound())      # the buggy composition: the block "is as Lipschitz as g" (= 1)
    assert exact == pytest.approx(expected, rel=1e-12) and exact > claimed * 1.4
    with pytest.raises(TypeError):
        list(bounded_layers(nn.Sequential(block)))
    with pytest.raises(TypeError):
        LipschitzNet(nn.Sequential(block), LipLinear(6, 3).double(), (6,), 3)


# -- 3. input normalisation: 1/min(std), not 1/max(std) -----------------------------------------------------------
def test_normalization_factor_is_one_over_the_smallest_std():
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    classifier = LipLinear(12, 12, bias=False)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(12))
    net = LipschitzNet(nn.Sequential(nn.Flatten()), classifier, (3, 2, 2), 12, normalize=(mean, std)).double()
    net.converge()
    assert net.input_factor == pytest.approx(1 / 0.2, rel=1e-7)
    J = impulse_jacobian(lambda b: net(b) - net(torch.zeros_like(b)), (3, 2, 2))   # the logits' exact Jacobian
    K = net.certified_bound().pairwise()
    buggy = PairwiseBound(torch.tensor(1 / max(std), dtype=torch.float64), classifier.weight.detach()).pairwise()
    exact = torch.linalg.vector_norm(J[:, None, :] - J[None, :, :], dim=-1)   # ‖∇(f_i − f_j)‖ = exact K_ij
    assert exact_norm(J) == pytest.approx(1 / 0.2, rel=1e-6)      # the normalisation's norm: 1/min(std)
    assert exact_norm(J) > 1 / max(std) * 1.4
    assert bool((buggy < exact * (1 - 1e-3)).any())                # 1/max(std) under-states some pair
    assert bool((K >= exact * (1 - 1e-12)).all())


# -- 4. the bound is not accumulated across evaluation batches ----------------------------------------------------
def _small_net(seed=0):
    torch.manual_seed(seed)
    return build_plain([("c", 8, 3, 1, 0), ("c", 8, 4, 2, 1), ("d", 32)], (3, 8, 8), 4,
                       normalize=([0.5, 0.4, 0.3], [0.25, 0.2, 0.3])).eval()


def test_certificates_do_not_depend_on_the_batching():
    net = _small_net()
    net.converge()
    bound = net.certified_bound()
    K_up, W = bound.K_up.clone(), bound.W.clone()
    x = torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    one = certify.predict(net, x, torch.float64, batch_size=1000)
    many = certify.predict(net, x, torch.float64, batch_size=7)
    radii = certify.certified_radius(one, bound, 4).sort().values
    eps = float(radii[24] + radii[25]) / 2           # half the points certified, none near the boundary
    assert float(radii[25] - radii[24]) > 1e-6 * eps
    flags = certify.certified(one, bound, eps, 4)
    assert 0 < int(flags.sum()) < len(x)          # a radius where the flags can differ
    assert torch.equal(certify.certified(many, bound, eps, 4), flags)
    per_batch = torch.cat([certify.certified(one[i:i + 7], bound, eps, 4) for i in range(0, len(x), 7)])
    assert torch.equal(per_batch, flags)
    # nothing was mutated: neither the bound object nor what the model gives next time
    assert torch.equal(bound.K_up, K_up) and torch.equal(bound.W, W)
    again = net.certified_bound()
    assert torch.equal(again.K_up, K_up) and torch.equal(again.W, W)

    # the buggy variant: a running K_up that every batch multiplies the layer bounds into again (never reset)
    layer_product = math.prod(net.layer_bounds())
    assert abs(layer_product - 1) > 0.05
    running, buggy_flags = torch.tensor(net.input_factor, dtype=torch.float64), []
    for i in range(0, len(x), 7):
        running = running * layer_product
        buggy_flags.append(certify.certified(one[i:i + 7], PairwiseBound(running, W), eps, 4))
    assert not torch.equal(torch.cat(buggy_flags), flags)


# -- 5. certification under the caller's TF32 / reduced matmul precision -------------------------------------------
class PrecisionRecorder(nn.Module):
    """1-Lipschitz (the identity); records the matmul precision settings its forward runs under."""

    lipschitz_one = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(_knob_values())
        return x


class _Plain(Method):
    """A method for certification only (evaluate never trains, so its loss is never called)."""

    def loss(self, logits, y, bound, progress):
        return torch.nn.functional.cross_entropy(logits, y), {}


def _knob_values():
    return tuple(k.fp32_precision for k in certify._precision_knobs())


@pytest.fixture
def reduced_precision():
    """The caller's settings, made the way users make them (legacy API: medium precision, TF32 on — in the order
    that leaves torch's legacy getter raising); every knob's original value restored after."""
    saved = [(k, k.fp32_precision) for k in certify._precision_knobs()]
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield _knob_values()
    finally:
        for k, value in saved:
            k.fp32_precision = value


def _recording_net():
    torch.manual_seed(0)
    recorder = PrecisionRecorder()
    net = LipschitzNet(nn.Sequential(recorder, LipLinear(2, 8), MaxMin()), LipLinear(8, 3), (2,), 3)
    recorder.seen.clear()
    return net, recorder


def test_certification_runs_at_full_precision_and_restores_the_callers(reduced_precision):
    from bench.train import evaluate
    assert any(v != "ieee" for v in reduced_precision)   # the caller really reduced something
    net, recorder = _recording_net()
    x = torch.randn(20, 2)
    net(x)                                                # the buggy path: a forward under the caller's settings
    assert recorder.seen == [reduced_precision]
    recorder.seen.clear()

    certify.predict(net, x, torch.float32, batch_size=8)
    assert recorder.seen and all(set(s) == {"ieee"} for s in recorder.seen)
    assert _knob_values() == reduced_precision

    recorder.seen.clear()
    data = DataBundle("toy", x, torch.arange(20) % 3, x.flip(0), torch.arange(20) % 3, 3, (2,))
    cfg = {"converge_tol": 1e-9, "certify_dtype": "float32", "eval_batch": 8, "cert_eps": ["0.1"]}
    evaluate(net, _Plain(cfg, 3), data, cfg, splits=("test",))
    assert recorder.seen and all(set(s) == {"ieee"} for s in recorder.seen)
    assert _knob_values() == reduced_precision


# -- 6. a conv iterate that shrinks (no output_padding) -----------------------------------------------------------
def test_shrinking_conv_iterate_under_estimates_and_lipbench_keeps_the_shape():
    torch.manual_seed(0)
    layer = LipConv2d(3, 4, 3, stride=2, padding=1).double()
    shape = (3, 8, 8)                                      # even input, 3×3 stride 2: the official shrinking case
    layer(torch.zeros(1, *shape, dtype=torch.float64))
    w = layer.weight.detach()
    exact = exact_norm(conv_matrix(w, shape, stride=2, padding=1))

    v = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(3000):                                  # the official iteration: transpose without output_padding
        v = F.conv_transpose2d(F.conv2d(v / v.norm(), w, None, 2, 1), w, None, 2, 1)
    assert tuple(v.shape) == (1, 3, 7, 7)                  # the iterate lost a row and a column
    buggy = float(F.conv2d(v / v.norm(), w, None, 2, 1).norm())
    assert buggy < exact * (1 - 1e-3)                      # measured 2.0 % below

    probe = torch.randn(1, *shape, dtype=torch.float64)
    assert layer.adjoint(layer.operator(probe, w), w).shape == probe.shape
    layer.converge()
    assert tuple(layer.power_iterate.shape) == (1, *shape)
    assert float(layer.certified_bound()) >= exact
    assert exact * (1 - 1e-6) <= float(layer.power_bound()) <= exact * (1 + 1e-12)


# -- 7. ties are never certified ------------------------------------------------------------------------------------
def test_ties_are_not_certified():
    eps = 0.5
    # pairwise: K_01 = 1, K_02 = 3 (K_up = 1, rows 0, 1, 3); margin to class 1 exactly ε·K_01
    bound = PairwiseBound(torch.tensor(1.0, dtype=torch.float64), torch.tensor([[0.0], [1.0], [3.0]]))
    logits = torch.tensor([[0.5, 0.0, -10.0],      # margin = ε·K exactly
                           [1.0, 1.0, -10.0],      # a zero margin (argmax picks class 0)
                           [0.5 + 1e-12, 0.0, -10.0]], dtype=torch.float64)
    _, gap, K = certify.margins(logits, bound, 3)
    assert float(gap[0, 1]) == eps * float(K[0, 1]) and float(gap[1, 1]) == 0.0
    buggy = ((gap >= eps * K) | (K == 0)).all(dim=1)       # a non-strict comparison
    assert bool(buggy[0]) and bool(((gap >= 0) | (K == 0)).all(dim=1)[1])
    assert certify.certified(logits, bound, eps, 3).tolist() == [False, False, True]
    assert not bool(certify.certified(logits[1:2], bound, 0.0, 3)[0])   # a zero margin, even at ε = 0
    assert float(certify.certified_radius(logits[1:2], bound, 3)[0]) == 0.0
    # a 1-Lipschitz head (K = √2·K_up): the same tie through the √2 path
    head = PairwiseBound(torch.tensor(0.75, dtype=torch.float64))
    a = eps * (0.75 * math.sqrt(2.0))
    assert not bool(certify.certified(torch.tensor([[a, 0.0, 0.0]], dtype=torch.float64), head, eps, 3)[0])
    assert bool(certify.certified(torch.tensor([[a * (1 + 1e-12), 0.0, 0.0]], dtype=torch.float64), head, eps, 3)[0])


# -- 8. a fused optimizer step must make the bound stale -----------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: LipLinear(5, 4), lambda: LipConv2d(2, 3, 3, padding=1)],
                         ids=["linear", "conv"])
def test_fused_adam_step_makes_the_bound_stale(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 5) if isinstance(layer, LipLinear) else torch.randn(3, 2, 5, 5)
    layer(x)
    layer.converge()
    layer.certified_bound()
    try:
        opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    except (RuntimeError, ValueError) as e:  # pragma: no cover (fused Adam is on CPU since torch 2.4)
        pytest.skip(f"fused Adam unavailable: {e}")
    before, version = layer.weight.detach().clone(), layer.weight._version
    layer(x).square().sum().backward()
    opt.step()
    assert not torch.equal(layer.weight.detach(), before)   # the weights moved ...
    assert layer.weight._version == version                 # ... but a Tensor._version key would not notice
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()
    with pytest.raises(UnconvergedBoundError):
        layer.power_bound()
    copy.deepcopy(layer).converge()                         # and a fresh converge() is what makes it usable again


@pytest.mark.parametrize("change", ["one ulp", "sign of zero"])
def test_a_one_bit_change_of_a_weight_makes_the_bound_stale(change):
    # the freshness check compares the weights' bytes with those the bound was computed for: one bit is enough
    torch.manual_seed(0)
    layer = LipLinear(5, 4)
    with torch.no_grad():
        layer.weight[1, 2] = 0.0 if change == "sign of zero" else layer.weight[1, 2]
    layer(torch.randn(3, 5))
    layer.converge()
    layer.certified_bound()
    with torch.no_grad():
        w = layer.weight[1, 2]
        layer.weight[1, 2] = -0.0 if change == "sign of zero" else torch.nextafter(w, w + 1)
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()
    layer.converge()
    layer.certified_bound()
