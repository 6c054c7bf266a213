"""Every bounded layer's guaranteed bound dominates its exact norm (fp64 explicit matrices; autograd Jacobians for
the nonlinear CPL), on (a) random weights, (b) weights after 10 adversarial optimizer steps and (c) weights whose
top singular values form a near-degenerate cluster (the case that stalls power iteration). Also: a seeded fuzz of
`conv_norm_bound` against exact norms, and `gram_norm_bound` on repeated top singular values and complex matrices.
(a) and (b) for the 1-Lipschitz families' layers (SOC, CPL, ...) are the layer contract,
tests/test_layer_contract.py; here LipLinear and LipConv2d.

In every case power_bound ≤ exact ≤ certified_bound: the power estimate is from below (the "published" number),
only the guaranteed bound is a certificate.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from bench.nn.lipschitz import LipConv2d, LipLinear
from bench.nn.spectral import conv_norm_bound, gram_norm_bound, max_gram_norm_bound
from bench.nn.verify import adversarial_steps, autograd_jacobians, impulse_jacobian
from bench.nn.families import cpl, soc

PHASES = ("random", "after 10 adversarial steps")


def exact_norm(J: torch.Tensor) -> float:
    """σ_max of an explicit fp64 matrix (LAPACK SVD, relative error ~1e-15)."""
    return float(torch.linalg.matrix_norm(J, 2))


def conv_matrix(layer: LipConv2d) -> torch.Tensor:
    w = layer.weight.detach().double()
    return impulse_jacobian(lambda b: F.conv2d(b, w, None, layer.stride, layer.padding, layer.dilation,
                                               layer.groups), layer.operator_input_shape)


def assert_sandwich(layer, exact: float, what: str) -> None:
    """power ≤ exact ≤ certified (the power estimate may not exceed exact beyond rounding)."""
    certified, power = float(layer.certified_bound()), float(layer.power_bound())
    assert exact <= certified, (what, certified, exact)
    assert power <= exact * (1 + 1e-10), (what, power, exact)


def orthonormal(n: int, k: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """n × k with orthonormal columns."""
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=dtype))[0]


def clustered_matrix(m: int, n: int, s, seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ, m × n, with the given singular values."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    return orthonormal(m, len(s), g) @ torch.diag(s) @ orthonormal(n, len(s), g).T


def start_in_second_direction(layer, J: torch.Tensor) -> None:
    """Put the persistent power iterate on the second right singular vector of the layer's operator."""
    _, _, Vh = torch.linalg.svd(J)
    layer.power_iterate = Vh[1].reshape(layer.power_iterate.shape).to(layer.power_iterate.dtype).clone()


# -- LipLinear ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (16, 24), (30, 30)])
def test_liplinear_random_and_adversarial(shape):
    torch.manual_seed(shape[0])
    layer = LipLinear(shape[1], shape[0]).double()
    x = torch.randn(8, shape[1], dtype=torch.float64)
    for phase in PHASES:
        layer.eval()
        layer(x[:1])
        layer.converge()
        assert_sandwich(layer, exact_norm(layer.weight.detach()), phase)
        adversarial_steps(layer, x)


@pytest.mark.parametrize("s", [
    [1.0, 1 - 1e-4, 1 - 1e-4, 1 - 1e-4, 0.5, 0.2],    # a gap of 1e-4 to three equal values
    [1.0, 1.0, 1.0, 1.0 - 1e-4, 0.3],                  # three exactly equal top values
], ids=["gap1e-4", "repeated"])
def test_liplinear_clustered(s):
    W = clustered_matrix(9, 7, s, seed=1)
    sv = torch.linalg.svdvals(W)
    assert torch.allclose(sv[:len(s)], torch.tensor(s, dtype=torch.float64), rtol=0, atol=1e-14)  # the cluster
    layer = LipLinear(7, 9, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(W)
    layer(torch.zeros(1, 7, dtype=torch.float64))
    start_in_second_direction(layer, W)
    layer.converge()
    assert_sandwich(layer, exact_norm(W), "clustered")


# -- LipConv2d ---------------------------------------------------------------------------------------------------
#: (c_in, c_out, kernel, stride, padding, dilation, groups, H, W)
CONV_CONFIGS = [
    (3, 4, 3, 1, 1, 1, 1, 6, 6),     # 3×3 'same'
    (3, 4, 3, 2, 1, 1, 1, 8, 8),     # 3×3 stride 2 on an even input (the official iterate shrinks here)
    (3, 4, 4, 2, 1, 1, 1, 7, 9),     # 4×4 stride 2, non-square
    (3, 4, 1, 1, 0, 1, 1, 5, 5),     # 1×1
    (3, 4, 1, 2, 0, 1, 1, 6, 7),     # 1×1 stride 2 (a subsampling), non-square
    (3, 4, 3, 1, 0, 1, 1, 6, 8),     # no padding, non-square
    (3, 4, 3, 1, 2, 2, 1, 7, 7),     # dilation 2
    (4, 6, 3, 1, 1, 1, 2, 6, 6),     # groups 2
    (4, 6, 3, 2, 1, 2, 2, 9, 8),     # groups 2, dilation 2, stride 2, non-square
    (2, 3, 4, 1, 0, 1, 1, 5, 8),     # even kernel, no padding, non-square
]


def _conv_id(c):
    return "c{}-{}_k{}_s{}_p{}_d{}_g{}_{}x{}".format(*c)


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=_conv_id)
def test_lipconv_random_and_adversarial(config):
    cin, cout, k, s, p, d, g, h, w = config
    torch.manual_seed(sum(config))
    layer = LipConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g).double()
    x = torch.randn(4, cin, h, w, dtype=torch.float64)
    for phase in PHASES:
        layer.eval()
        layer(x[:1])
        layer.converge()
        assert tuple(layer.power_iterate.shape) == (1, cin, h, w), phase   # the full input shape
        assert_sandwich(layer, exact_norm(conv_matrix(layer)), phase)
        adversarial_steps(layer, x)


def _conv_layer(weight: torch.Tensor, shape, stride=1, padding=0) -> LipConv2d:
    layer = LipConv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride=stride, padding=padding,
                      bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer(torch.zeros(1, *shape, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("stride,shape", [(1, (4, 5, 5)), (2, (4, 6, 4))])
def test_lipconv_clustered_1x1(stride, shape):
    """A 1×1 conv is I ⊗ M on the (subsampled) pixels: M's clustered spectrum, each value repeated per pixel.
    M has σ = 1, 1 − 1e-4 (twice), 0.5: the operator's top value is 25-fold (or 6-fold), the next 1e-4 below."""
    M = clustered_matrix(4, 4, [1.0, 1 - 1e-4, 1 - 1e-4, 0.5], seed=2)
    layer = _conv_layer(M[:, :, None, None], shape, stride=stride)
    J = conv_matrix(layer)
    sv = torch.linalg.svdvals(J)
    pixels = J.shape[0] // 4
    assert float(sv[0] - sv[pixels - 1]) < 1e-13                                 # degenerate top
    assert float(sv[0] - sv[pixels]) == pytest.approx(1e-4, rel=1e-6)           # gap 1e-4 to the next
    start_in_second_direction(layer, J)
    layer.converge()
    assert_sandwich(layer, exact_norm(J), "clustered 1x1")


@pytest.mark.parametrize("stride,shape", [(1, (2, 6, 6)), (2, (2, 8, 7))])
def test_lipconv_clustered_two_channels(stride, shape):
    """Two channels with the same 3×3 kernel up to a factor 1 − 1e-4: the explicit operator's top pair is
    σ₁ and (1 − 1e-4)·σ₁ (checked), the rest ≥ 1 % lower."""
    w0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    weight[0, 0], weight[1, 1] = w0, w0 * (1 - 1e-4)
    layer = _conv_layer(weight, shape, stride=stride, padding=1)
    J = conv_matrix(layer)
    sv = torch.linalg.svdvals(J)
    assert float((sv[0] - sv[1]) / sv[0]) == pytest.approx(1e-4, rel=1e-6)
    assert float((sv[1] - sv[2]) / sv[0]) > 1e-2
    start_in_second_direction(layer, J)
    layer.converge()
    assert_sandwich(layer, exact_norm(J), "clustered pair")


# -- SOC ---------------------------------------------------------------------------------------------------------
def _soc(kind: str):
    """(layer, inputs, operator input shape) for a SOC layer of the given kind, float64."""
    if kind == "stride1":
        return soc.SkewOrthogonalConv(4, 6, 3).double(), torch.randn(3, 4, 5, 5, dtype=torch.float64), (4, 5, 5)
    if kind == "stride2":
        return (soc.SkewOrthogonalConv(3, 8, 3, stride=2).double(), torch.randn(3, 3, 6, 6, dtype=torch.float64),
                (3, 6, 6))
    return soc.SOCHead(12, 5).double(), torch.randn(3, 12, dtype=torch.float64), (12, 1, 1)


@pytest.mark.parametrize("kind", ["stride1", "stride2", "head1x1"])
def test_soc_clustered(kind):
    """A SOC eval map is orthogonal up to its truncation: its whole spectrum is one cluster (top gap far below
    1e-4, checked). With stale σ iterates (correction × 3, so ‖A_n‖ is ~3× too large) the truncation error is
    visible for the stride-1 layer (its top pair: 1.000398, 1.000392), and the bound still dominates."""
    torch.manual_seed(7)
    layer, x, shape = _soc(kind)
    for correction in (None, 3.0):
        if correction is not None:
            with torch.no_grad():
                layer.correction.mul_(correction)
        layer.eval()
        layer(x[:1])
        J = layer.matrix(shape)
        sv = torch.linalg.svdvals(J)
        assert float(sv[0] - sv[1]) < 1e-4, correction
        start_in_second_direction(layer, J)
        layer.converge()
        assert_sandwich(layer, exact_norm(J), f"correction ×{correction}")
        if correction is not None and kind == "stride1":
            # measured σ₁, σ₂ = 1.000398, 1.000392: a near-degenerate pair above 1 (the truncation error is real)
            assert float(sv[0]) > 1 + 1e-4


# -- CPL ---------------------------------------------------------------------------------------------------------
def _cpl(kind: str):
    if kind == "conv":
        return cpl.ConvexPotentialConv(3, 5).double(), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    return cpl.ConvexPotentialLinear(8, 12).double(), torch.randn(4, 8, dtype=torch.float64)


def weight_matrix(layer) -> torch.Tensor:
    return impulse_jacobian(lambda b: layer.operator(b, layer.weight.detach().double()), layer.operator_input_shape)


def assert_cpl_sound(layer, x, what: str) -> None:
    """certified ≥ every autograd Jacobian of the layer (at x, and with every unit active: bias raised, which
    the bound does not depend on), ≥ max(1, h·‖W‖² − 1) at the exact ‖W‖, and ḡ ≥ ‖W‖."""
    layer.eval()
    layer(x[:1])
    bound = layer.converge()
    W = weight_matrix(layer)
    exact_w = exact_norm(W)
    h = 2.0 / (float(layer.eval_sv_max) ** 2 + layer.epsilon)
    assert exact_w <= layer.weight_norm_bound, what
    assert bound >= max(1.0, h * exact_w ** 2 - 1.0), what
    assert float(layer.power_bound()) <= bound, what
    bias = layer.bias.detach().clone()
    J = autograd_jacobians(layer, x)
    with torch.no_grad():
        layer.bias.fill_(1e6)                 # D = I: J = I − h·WᵀW, the widest Jacobian of the layer
    J_active = autograd_jacobians(layer, x[:1])
    with torch.no_grad():
        layer.bias.copy_(bias)
    worst = max(float(torch.linalg.matrix_norm(J, 2).max()), float(torch.linalg.matrix_norm(J_active, 2).max()))
    assert worst <= float(layer.certified_bound()) * (1 + 1e-12), (what, worst, bound)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_cpl_clustered(kind):
    """W with σ₁ − σ₂ = 1e-4 (dense: U diag(s) Vᵀ; conv: a centre-tap-only 3×3 kernel, i.e. I ⊗ M on the pixels,
    whose top value repeats per pixel), power iterate started in the second singular direction."""
    layer, x = _cpl(kind)
    s = [2.0, 2.0 - 2e-4, 2.0 - 2e-4, 1.0]
    with torch.no_grad():
        if kind == "linear":
            layer.weights.copy_(clustered_matrix(12, 8, s, seed=3))
        else:
            layer.kernel.zero_()
            layer.kernel[:, :, 1, 1] = clustered_matrix(5, 3, [2.0, 2.0 - 2e-4, 1.0], seed=3)
    layer.eval()
    layer(x[:1])
    W = weight_matrix(layer)
    sv = torch.linalg.svdvals(W)
    top = (sv[0] - sv).abs() < 1e-12
    below = sv[~top]
    assert float((sv[0] - below[0]) / sv[0]) == pytest.approx(1e-4, rel=1e-6)   # the gap below the top value
    _, _, Vh = torch.linalg.svd(W)
    layer.power_iterate = Vh[int(top.sum())].reshape(layer.power_iterate.shape).clone()
    assert_cpl_sound(layer, x, "clustered")


# -- conv_norm_bound fuzz ----------------------------------------------------------------------------------------
def _fuzz_config(seed: int):
    """kernel 1–5, stride 1–3, padding 0–k, dilation 1–2 (per axis in ~40 % of cases), groups 1–2, small inputs
    that leave at least one output."""
    r = random.Random(seed)
    k, g = r.randint(1, 5), r.randint(1, 2)
    per_axis = r.random() < 0.4

    def draw(f):
        return (f(), f()) if per_axis else (lambda v: (v, v))(f())
    s, d, p = draw(lambda: r.randint(1, 3)), draw(lambda: r.randint(1, 2)), draw(lambda: r.randint(0, k))
    cin, cout = g * r.randint(1, 2), g * r.randint(1, 3)
    hw = []
    for axis in range(2):
        lo = max(1, d[axis] * (k - 1) + 1 - 2 * p[axis])
        hw.append(r.randint(lo, lo + 5))
    return k, s, p, d, g, cin, cout, tuple(hw)


@pytest.mark.parametrize("seed", range(60))
def test_conv_norm_bound_fuzz(seed):
    """Measured over these 60 cases: bound/exact ∈ [1 + 2.2e-14, 3.07] (loose where the padding reaches k on tiny
    inputs, never below); seeds 14 and 19 are zero operators (every tap reads padding), bounded by 1.52 and 0.40."""
    k, s, p, d, g, cin, cout, hw = _fuzz_config(seed)
    w = torch.randn(cout, cin // g, k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if seed % 3 == 0:
        w = w.float()   # the float32 weights of a real layer, up-cast exactly
    w64 = w.double()
    J = impulse_jacobian(lambda b: F.conv2d(b, w64, None, s, p, d, g), (cin, *hw))
    exact = exact_norm(J)
    bound = conv_norm_bound(w, hw, s, p, d, g)
    assert bound >= exact * (1 - 1e-12), (k, s, p, d, g, cin, cout, hw, bound, exact)


# -- gram_norm_bound ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["real", "complex"])
def test_gram_norm_bound_repeated_top_singular_values(dtype):
    """Exactly repeated top values: 4-fold in U diag(2, 2, 2, 2, 1, 0.5) Vᴴ, and all 16 equal in 2·Q. Gram
    iteration pays r^(1/2^(T+1)) for an r-fold top, i.e. measured ≤ 1.4e-12 here."""
    g = torch.Generator().manual_seed(4)
    U, V = orthonormal(8, 6, g, dtype), orthonormal(6, 6, g, dtype)
    s = torch.tensor([2, 2, 2, 2, 1, 0.5], dtype=torch.float64).to(dtype)
    cases = [U @ torch.diag(s) @ V.mH, 2 * orthonormal(16, 16, g, dtype)]
    for A in cases:
        sv = torch.linalg.svdvals(A)
        assert float(sv[0] - sv[3]) < 1e-14                       # the repetition is real
        exact = exact_norm(A)
        bound = float(gram_norm_bound(A))
        assert exact * (1 - 1e-14) <= bound <= exact * (1 + 1e-9)
        assert bound >= 2.0 * (1 - 1e-14)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (12, 12), (1, 9)])
def test_gram_norm_bound_complex(shape):
    g = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    A = torch.complex(torch.randn(shape, generator=g, dtype=torch.float64),
                      torch.randn(shape, generator=g, dtype=torch.float64))
    exact = exact_norm(A)
    bound = float(gram_norm_bound(A))
    assert exact * (1 - 1e-14) <= bound <= exact * (1 + 1e-9)
    # complex64 input: up-cast exactly, so the bound holds for the stored single-precision matrix
    A32 = A.to(torch.complex64)
    assert float(gram_norm_bound(A32)) >= exact_norm(A32.to(torch.complex128)) * (1 - 1e-14)


def test_gram_norm_bound_batched_and_max():
    """A batch gives one bound per matrix; max_gram_norm_bound's upper dominates the largest exact norm (also
    when two matrices tie for the max) and its lower estimate does not exceed it."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    A[3] = A[1] * (1 + 1e-13)        # a near tie for the maximum between two matrices
    exact = torch.linalg.matrix_norm(A, 2)
    bounds = gram_norm_bound(A)
    assert bounds.shape == (6,)
    assert bool((bounds >= exact * (1 - 1e-14)).all())
    upper, lower = max_gram_norm_bound(A)
    assert lower <= float(exact.max()) * (1 + 1e-12) and upper >= float(exact.max()) * (1 - 1e-14)
    assert upper <= float(exact.max()) * (1 + 1e-9)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_gram_norm_bound_at_float32_extremes(scale):
    """Weights anywhere in float32's range (up-cast) keep a sound, tight bound: the power-of-two rescale."""
    A = torch.randn(6, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * scale
    exact = exact_norm(A)
    bound = float(gram_norm_bound(A))
    assert math.isfinite(bound) and exact * (1 - 1e-14) <= bound <= exact * (1 + 1e-9)
