"""Local-Lip-B (bench/nn/families/local_lip.py): conformance with the official code on both fixtures (every stored
array), the architectures and their parameter counts, θ projection, and the sound rule: its local norms dominate
the exact masked-operator norms (explicit fp64 matrices), which dominate the published power iteration, its boxes,
balls and worst-case logits hold against attacks, and its certified points survive L2 PGD."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import certify
from bench.nn.archs import count_parameters
from bench.nn.families import local_lip as ll
from bench.nn.lipschitz import LipConv2d, LipLinear
from bench.nn.verify import impulse_jacobian
from bench.registry import ARCHS
from tests.conftest import fixture, t64

CASES = ["locallip_tiny_eps0.0200", "locallip_tiny_eps0.1412"]
TINY = [("c", 4, 3, 1, 1), ("c", 8, 4, 2, 1), ("d", 32)]
#: fixture key of each hidden layer (official Sequential index) and of its ReLU_x
OFFICIAL = [("conv0", "relux1", 0), ("conv2", "relux3", 2), ("fc5", "relux6", 5)]


def official_net(z) -> ll.LocalLipNet:
    """The fixture's tiny network (float64) with its stored weights, biases and thresholds."""
    torch.manual_seed(0)
    net = ll.build_local_lip((3, 8, 8), 10, layers=TINY).double()
    with torch.no_grad():
        for (layer, act), (name, relu, _) in zip(net.hidden, OFFICIAL):
            layer.weight.copy_(t64(z[f"{name}_weight"]))
            layer.bias.copy_(t64(z[f"{name}_bias"]))
            act.theta.copy_(t64(z[f"{relu}_threshold"]))
        net.classifier.weight.copy_(t64(z["fc7_weight"]))
        net.classifier.bias.copy_(t64(z["fc7_bias"]))
    return net.eval()


def official_outputs(net, z):
    """Every array of the fixture, recomputed from its stored inputs and start vectors."""
    x, y, eps = t64(z["x"]), torch.as_tensor(z["y"]), float(z["epsilon"])
    g, _ = ll.official_global_norms(net, 2000, [t64(z[f"u_global_init_layer{i}"]) for *_, i in OFFICIAL])
    ib = ll.interval_bounds(net, x, eps, g)
    norms, _ = ll.local_layer_norms(net, ib.masks, 2000, [t64(z[f"u_local_init_layer{i}"]) for *_, i in OFFICIAL])
    r = ll.penultimate_radius(eps, norms)
    T = ll.bcp_translation(net.classifier.weight, ib.mu, r, ib.centre, ib.radius, 1000)
    worst = ll.worst_case_logits(ib.logits, T, y)
    glog = ll.gloro_logits(ib.logits, worst, y)
    out = {f"mask_layer{i}": m for (*_, i), m in zip(OFFICIAL, ib.masks)}
    out.update(logits=ib.logits, penultimate_mu=ib.mu, penultimate_ibp_mu=ib.centre, penultimate_ibp_r=ib.radius,
               local_layer_norms=norms, r_penultimate=r, bcp_translation=T, worst_logits=worst, gloro_logits=glog,
               certified=worst.max(1)[1] == y)
    out["robust_loss_bcp"], out["robust_err_bcp"] = ll.robust_loss(ib.logits, worst, y)
    out["robust_loss_gloro"], out["robust_err_gloro"] = ll.gloro_loss(glog, y)
    return out


# measured max deviations (float64, torch 2.14 CPU, both cases): masks, certified and errors exact; absolute
# ≤ 4.4e-16 logits, 3.3e-16 penultimate, 6.7e-16 box, 7.8e-16 translation, 8.9e-16 worst and gloro logits;
# relative ≤ 5.5e-16 norms, 9.7e-16 r, 1.9e-16 losses: the official arithmetic is reproduced operation by
# operation. The tolerances leave room for another BLAS moving a stop by one iteration.
TOL = {"local_layer_norms": 1e-9, "r_penultimate": 1e-9}


@pytest.mark.parametrize("case", CASES)
def test_conformance_with_official_local_lip(case):
    z = fixture(case)
    net = official_net(z)
    with torch.no_grad():
        got = official_outputs(net, z)
        np.testing.assert_allclose(net(t64(z["x"])).numpy(), z["logits"], rtol=0, atol=1e-13)
    for key, value in got.items():
        want = z[key]
        value = value.detach().numpy()
        if key.startswith("mask") or key in ("certified", "robust_err_bcp", "robust_err_gloro"):
            np.testing.assert_array_equal(value.astype(want.dtype), want, err_msg=key)
        else:
            np.testing.assert_allclose(value, want, rtol=TOL.get(key, 1e-12), atol=1e-13, err_msg=key)


@pytest.mark.parametrize("case", CASES)
def test_published_certificate_end_to_end(case):
    """local_certificate("published") from the stored start vectors: worst-case logits w.r.t. the prediction, BCP
    on the predicted column only (its batch-wide stop sees fewer pairs: ~1e-12), certified ∧ correct = official."""
    z = fixture(case)
    net = official_net(z)
    x, y, eps = t64(z["x"]), torch.as_tensor(z["y"]), float(z["epsilon"])
    init = [t64(z[f"u_local_init_layer{i}"]) for *_, i in OFFICIAL]
    cert = ll.local_certificate(net, x, eps, "published", init_vectors=init,
                                global_init=[t64(z[f"u_global_init_layer{i}"]) for *_, i in OFFICIAL])
    correct = cert.predicted == y
    np.testing.assert_array_equal((cert.certified & correct).numpy(), z["certified"])
    np.testing.assert_allclose(cert.worst[correct].numpy(), z["worst_logits"][correct.numpy()], rtol=0, atol=1e-10)
    np.testing.assert_allclose(cert.K.numpy(), z["local_layer_norms"].prod(1), rtol=1e-12)
    np.testing.assert_allclose(cert.r.numpy(), z["r_penultimate"], rtol=1e-12)
    assert [tuple(v.shape) for v in cert.vectors] == [(4, 3, 8, 8), (4, 4, 8, 8), (4, 128)]


def test_losses_kappa_and_nan_handling():
    z = fixture(CASES[0])
    logits, worst, y = t64(z["logits"]), t64(z["worst_logits"]), torch.as_tensor(z["y"])
    clean = F.cross_entropy(logits, y)
    assert float(ll.robust_loss(logits, worst, y, kappa=1.0)[0]) == pytest.approx(float(clean), rel=1e-15)
    mixed = 0.3 * clean + 0.7 * F.cross_entropy(worst, y)
    assert float(ll.robust_loss(logits, worst, y, kappa=0.3)[0]) == pytest.approx(float(mixed), rel=1e-15)
    # a failed bound: the official code sets NaN to 0 (a pair then looks unchangeable); the sound bound is +∞
    W, mu = t64(z["fc7_weight"]), t64(z["penultimate_mu"])
    c, rho, r = t64(z["penultimate_ibp_mu"]), t64(z["penultimate_ibp_r"]), torch.full((4,), float("nan"))
    assert float(ll.bcp_translation(W, mu, r, c, rho, 10).abs().max()) == 0.0
    assert torch.isinf(ll.bcp_upper_bound(W, mu, r, c, rho, y)).all()


def test_bcp_upper_bound_dominates_the_maximum_and_is_tight():
    """The dual bound ≥ the exact maximum over ball ∩ box (bisection on the KKT multiplier) ≥ random feasible
    points, and exceeds the maximum only by its rounding allowance; the official iteration is within 1e-10."""
    g = torch.Generator().manual_seed(0)
    B, N, h = 6, 7, 20
    W = torch.randn(N, h, generator=g, dtype=torch.float64)
    mu = torch.randn(B, h, generator=g, dtype=torch.float64)
    centre = mu + 0.3 * torch.randn(B, h, generator=g, dtype=torch.float64)
    radius = torch.maximum(0.5 * torch.rand(B, h, generator=g, dtype=torch.float64), (centre - mu).abs())
    r = 1.5 * torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.randint(0, N, (B,), generator=g)
    U = ll.bcp_upper_bound(W, mu, r, centre, radius, y)
    T = ll.bcp_translation(W, mu, r, centre, radius, 1000, target=y)
    lo, hi = (centre - radius - mu)[:, None], (centre + radius - mu)[:, None]
    c = W[None] - W[y][:, None]
    a, b = torch.zeros(B, N, 1, dtype=torch.float64), torch.full((B, N, 1), 1e6, dtype=torch.float64)
    for _ in range(200):
        m = (a + b) / 2
        big = torch.clamp(m * c, lo, hi).norm(dim=-1, keepdim=True) > r[:, None, None]
        a, b = torch.where(big, a, m), torch.where(big, m, b)
    exact = (c * torch.clamp(a * c, lo, hi)).sum(-1)
    off = torch.ones(B, N, dtype=torch.bool)
    off[torch.arange(B), y] = False
    assert bool((U[off] >= exact[off]).all())
    assert float((U - exact)[off].max()) < 1e-10
    assert float((T - exact)[off].abs().max()) < 1e-9
    for _ in range(100):
        d = torch.randn(B, h, generator=g, dtype=torch.float64)
        d = d / d.norm(dim=1, keepdim=True) * r[:, None] * torch.rand(B, 1, generator=g, dtype=torch.float64)
        d = torch.maximum(torch.minimum(d, hi[:, 0]), lo[:, 0])
        assert bool(((c * d[:, None]).sum(-1)[off] <= U[off]).all())


# -- architectures ----------------------------------------------------------------------------------------------

ARCH_TABLE = [  # name, input, classes, weights, θs, activation sizes, θ init, default dataset
    ("6c2f-relux", (3, 32, 32), 10, 2_250_378, 111_104, [32, 32, 16, 16, 16, 8], 2.0, "cifar10"),
    ("4c3f-relux", (3, 32, 32), 10, 2_466_858, 62_464, [32, 16, 16, 8], 1.0, "cifar10"),
    ("8c2f-relux", (3, 64, 64), 200, 4_342_984, 916_544, [64, 64, 31, 31, 31, 14, 14, 6], 1.0, "tinyimagenet"),
]


@pytest.mark.parametrize("name,shape,classes,weights,thetas,sizes,init,dataset", ARCH_TABLE,
                         ids=[a[0] for a in ARCH_TABLE])
def test_architectures_and_parameter_counts(name, shape, classes, weights, thetas, sizes, init, dataset):
    factory = ARCHS.get(name)
    assert factory.family == "local_lip" and factory.data == "image" and factory.default_dataset == dataset
    torch.manual_seed(0)
    net = factory(shape, classes)
    assert isinstance(net, ll.LocalLipNet) and net.input_aware
    theta = sum(a.theta.numel() for _, a in net.hidden)
    assert theta == thetas and count_parameters(net) == weights + thetas
    convs = [layer for layer, _ in net.hidden if isinstance(layer, LipConv2d)]
    assert [a.theta.shape[-1] for layer, a in net.hidden if isinstance(layer, LipConv2d)] == sizes
    assert isinstance(net.hidden[-1][0], LipLinear) and type(net.classifier) is torch.nn.Linear
    assert all(float(a.theta.detach().min()) == float(a.theta.detach().max()) == init for _, a in net.hidden)
    for conv in convs:  # official init: N(0, 2/(k²·c_out)), zero bias
        std = math.sqrt(2.0 / (conv.kernel_size[0] ** 2 * conv.out_channels))
        assert float(conv.weight.detach().std()) == pytest.approx(std, rel=0.15)
        assert float(conv.bias.detach().abs().max()) == 0.0
    if name == "8c2f-relux":  # the stride-2 convs are unpadded
        assert [c.padding for c in convs if c.stride == (2, 2)] == [(0, 0)] * 3


def test_relu_theta_and_projection():
    act = ll.ReLUTheta((3,), init=2.0)
    assert act.lipschitz_one and act.theta.shape == (1, 3)
    with torch.no_grad():
        act.theta.copy_(torch.tensor([[0.5, 1.0, 2.0]]))
    x = torch.tensor([[-1.0, 0.7, 3.0], [0.2, 1.5, 1.9]])
    assert torch.equal(act(x), torch.tensor([[0.0, 0.7, 2.0], [0.2, 1.0, 1.9]]))
    opt = torch.optim.SGD(act.parameters(), lr=10.0)
    act(torch.full((2, 3), 10.0)).sum().backward()     # saturated: dθ = 1, the step drives θ below 0
    opt.step()
    assert float(act.theta.detach().max()) < 0
    act.project_()
    assert torch.equal(act.theta.detach(), torch.zeros(1, 3))
    net = ll.build_local_lip((3, 8, 8), 10, layers=TINY)
    with torch.no_grad():
        net.hidden[1][1].theta.fill_(-1.0)
    net.project_()
    thetas = [a.theta.detach() for _, a in net.hidden]
    assert all(float(t.min()) >= 0 for t in thetas) and float(thetas[1].max()) == 0.0


# -- the sound rule ---------------------------------------------------------------------------------------------

def exact_masked_norms(net, masks) -> torch.Tensor:
    """‖D_k W_k D_{k−1}‖ per sample from the explicit fp64 matrix (impulse responses) and its SVD."""
    out = torch.zeros(masks[0].shape[0], len(net.hidden), dtype=torch.float64)
    for k, (layer, _) in enumerate(net.hidden):
        shape = layer.operator_input_shape
        for b in range(out.shape[0]):
            d_in = None if k == 0 else masks[k - 1][b].reshape(shape)
            fn = lambda v: ll._affine(layer, v if d_in is None else v * d_in, layer.weight.detach()) * masks[k][b]
            out[b, k] = torch.linalg.matrix_norm(impulse_jacobian(fn, shape), 2)
    return out


@pytest.mark.parametrize("case", CASES)
def test_sound_norms_dominate_exact_which_dominate_power(case):
    z = fixture(case)
    net = official_net(z)
    net.converge()
    x, eps = t64(z["x"]), float(z["epsilon"])
    with torch.no_grad():
        ib = ll.interval_bounds(net, x, eps)
        ibs = ll.interval_bounds(net, x, eps, sound=True)
        power, _ = ll.local_layer_norms(net, ib.masks, 2000)
        exact = exact_masked_norms(net, ib.masks)
        tight = ll.local_norm_bounds(net, ib.masks)                    # Gram on the explicit masked matrices
        loose = ll.local_norm_bounds(net, ib.masks, explicit_limit=0)  # global bound and Schur only
    rounding = 1e-14  # of the SVD of a ≤ 256 × 192 matrix
    assert bool((tight >= exact * (1 - rounding)).all()) and bool((loose >= tight).all())
    assert float((tight / exact).max()) < 1 + 1e-9                      # Gram iteration converges to the norm
    assert bool((exact >= power * (1 - 1e-9)).all())                    # power iteration approaches from below
    assert bool((loose <= torch.tensor(net.layer_bounds(), dtype=torch.float64)).all())
    # the sound boxes contain the published ones: more units vary, never fewer
    for a, b in zip(ib.masks, ibs.masks):
        assert bool((b >= a).all())
    assert bool((ibs.radius >= ib.radius - 1e-15).all())


def attack(objective, x, eps, steps=60, restarts=2, seed=0):
    """max over ‖x' − x‖ ≤ ε of objective(x') [B] by normalised-gradient ascent with projection."""
    g = torch.Generator().manual_seed(seed)
    best = torch.full((x.shape[0],), -math.inf, dtype=x.dtype)
    view = (-1,) + (1,) * (x.dim() - 1)
    for r in range(restarts):
        d = 0.5 * eps * torch.randn(x.shape, generator=g, dtype=x.dtype) / math.sqrt(x[0].numel()) if r else \
            torch.zeros_like(x)
        for _ in range(steps):
            d.requires_grad_(True)
            val = objective(x + d)
            best = torch.maximum(best, val.detach())
            (grad,) = torch.autograd.grad(val.sum(), d)
            with torch.no_grad():
                d = d + 0.1 * eps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)
                d = d * torch.clamp(eps / d.flatten(1).norm(dim=1).clamp_min(1e-30), max=1.0).view(view)
        best = torch.maximum(best, objective(x + d).detach())
    return best


def trained_tiny(normalize, spread, seed=3):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ll.build_local_lip((3, 8, 8), 4, normalize=normalize, layers=TINY, init=1.0).double()
    protos = 0.5 + spread * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(96) % 4
    x = protos[y] + 0.1 * torch.randn(96, 3, 8, 8, generator=g, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(net(x[:64]), y[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.project_()
    net.eval()
    net.converge()
    return net, x[64:]


@pytest.mark.parametrize("normalize,spread,eps", [(None, 0.1, 0.1), (((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), 0.2, 0.05)],
                         ids=["plain", "normalized"])
def test_sound_certificate_survives_attacks(normalize, spread, eps):
    net, x = trained_tiny(normalize, spread)
    cert = ll.local_certificate(net, x, eps, "sound")
    published = ll.local_certificate(net, x, eps, "published", n_iter=500, opt_iter=200)
    n_cert = int(cert.certified.sum())
    assert 0 < n_cert < len(x) and n_cert <= int(published.certified.sum())
    assert bool((cert.K <= float(net.certified_bound().K_up) * (1 + 1e-12)).all())   # local ≤ global
    # L2 PGD never breaks a certified point
    broken = certify.l2_pgd(net, x[cert.certified], cert.predicted[cert.certified], eps, steps=50, restarts=2,
                            generator=torch.Generator().manual_seed(0))
    assert not bool(broken.any())
    # attacks on what the certificate rests on: the penultimate ball and box, and the worst-case logits
    ib = ll.interval_bounds(net, x, eps, sound=True)
    j = cert.predicted

    def penultimate(v):
        return net.features((v - net.norm_mean) / net.norm_std if normalize else v)

    dist = attack(lambda v: (penultimate(v) - ib.mu).norm(dim=1) - cert.r, x, eps)
    outside = attack(lambda v: torch.maximum(penultimate(v) - (ib.centre + ib.radius),
                                             (ib.centre - ib.radius) - penultimate(v)).amax(1), x, eps)
    excess = attack(lambda v: (net(v) - net(v).gather(1, j[:, None]) - (cert.worst - cert.logits.gather(1, j[:, None])))
                    .scatter(1, j[:, None], -math.inf).amax(1), x, eps)
    assert float(dist.max()) <= 0 and float(outside.max()) <= 0 and float(excess.max()) <= 0


def test_certify_split_uses_the_local_certificate():
    """The input-aware protocol of bench/certify.py: per-batch `local_certificate(x, eps, rule)` → (certified, K̄,
    predicted class)."""
    net, x = trained_tiny(None, 0.1)
    net.cert_n_iter, net.cert_opt_iter = 200, 100
    sc = certify.certify_split(net, x, {"e": 0.1}, torch.float64, batch_size=16, rules=("sound", "power"))
    cert = ll.local_certificate(net, x, 0.1, "sound")
    assert torch.equal(sc.certified["sound"]["e"], cert.certified)
    W = net.classifier.weight.detach().double()
    spread = float(torch.cdist(W, W).max())
    np.testing.assert_allclose(sc.K["sound"]["e"].numpy(), cert.K.numpy() * spread, rtol=1e-12)
    assert int(sc.certified["power"]["e"].sum()) >= int(cert.certified.sum())


def test_published_rule_is_reproducible_and_leaves_the_global_rng_alone():
    """The power rule's random start is seeded (`CERT_SEED`): two certifications agree bit for bit, whatever the
    global RNG holds, and certification does not advance the global RNG (training's data order stays put)."""
    net, x = trained_tiny(None, 0.1)
    net.cert_n_iter, net.cert_opt_iter = 3, 2      # few steps: a different start would show in K
    torch.manual_seed(1)
    a = certify.certify_split(net, x, {"e": 0.1}, torch.float64, batch_size=16, rules=("power",))
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = certify.certify_split(net, x, {"e": 0.1}, torch.float64, batch_size=16, rules=("power",))
    assert torch.equal(a.K["power"]["e"], b.K["power"]["e"])
    assert torch.equal(a.certified["power"]["e"], b.certified["power"]["e"])
    torch.set_rng_state(state)
    certify.certify_split(net, x, {"e": 0.1}, torch.float64, batch_size=16, rules=("power",))
    assert torch.equal(torch.get_rng_state(), state)


def test_training_bound_is_differentiable_and_converges_to_the_published_one():
    """`net.bound(x, eps, n_iter)`: the training-time local bound (method `local-lip`); without (x, eps) the global
    PairwiseBound. With many steps it reaches the official outputs; with 2 (official --sniter) it trains."""
    z = fixture(CASES[0])
    net = official_net(z)
    x, y, eps = t64(z["x"]), torch.as_tensor(z["y"]), float(z["epsilon"])
    assert net.bound().K_up.dim() == 0 and net.bound(x, None).K_up.dim() == 0
    with torch.no_grad():
        converged = net.bound(x, eps, n_iter=2000)
        worst = converged.worst_logits(y, 1000)
    # the official norms stop at ‖u − u_prev‖ < 1e-3, i.e. a few 1e-6 below the masked norms (other start vectors)
    np.testing.assert_allclose(converged.K_up.numpy(), z["local_layer_norms"].prod(1), rtol=1e-5)
    np.testing.assert_allclose(worst.numpy(), z["worst_logits"], rtol=0, atol=1e-5)
    net.train()
    bound = net.bound(x, eps, n_iter=2)
    loss, err = ll.robust_loss(bound.logits, bound.worst_logits(y), y, kappa=0.5)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(a.theta.grad.abs().max()) > 0 for _, a in net.hidden)
    assert 0.0 <= float(err) <= 1.0


def test_warm_start_store_plan_codes_and_fallbacks():
    """The 4-bit per-image store: CIFAR-10 6C2F under 2 GB holds its first four layers (1.92 GB, against the
    official float32 store's 22.7 GB); a code decodes to the start within half a level of every entry; an image
    not yet seen, a layer not stored and an iterate that was zero start at the shared iterate."""
    net = ARCHS.get("6c2f-relux")((3, 32, 32), 10)
    shapes = [layer.operator_input_shape for layer, _ in net.hidden]
    plan = ll.WarmStartStore(shapes, 50_000, int(2e9), "cpu")
    assert sorted(plan.codes) == [0, 1, 2, 3] and plan.nbytes == 50_000 * (1 + (3072 + 32768 * 2 + 8192) // 2)
    assert sum(math.prod(s) for s in shapes) * 4 * 50_000 > 22.7e9
    del plan
    shapes = [(2, 3, 3), (5,), (40,)]
    store = ll.WarmStartStore(shapes, 6, 6 + 6 * (9 + 3), "cpu")          # room for the first two layers only
    assert sorted(store.codes) == [0, 1]
    g = torch.Generator().manual_seed(0)
    u = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes]
    u[1][2] = 0.0                                                           # a zero iterate
    shared = [torch.full((3, *s), 0.5, dtype=torch.float64) for s in shapes]
    idx = torch.tensor([4, 0, 2])
    assert all(torch.equal(a, b) for a, b in zip(store.starts(idx, shared), shared))   # nothing seen yet
    store.save(idx, u)
    starts = store.starts(torch.tensor([2, 4, 1]), shared)
    for k in (0, 1):
        got, want = starts[k][1], u[k][0]                                   # image 4 was row 0 of the save
        scale = want.abs().max() / ll.WarmStartStore.LEVELS
        assert float((got * scale - want).abs().max()) <= 0.5 * float(scale) * (1 + 1e-6)
        assert torch.equal(starts[k][2], shared[k][2])                      # image 1: never seen
    assert torch.equal(starts[1][0], shared[1][0])                          # image 2's layer-1 iterate was zero
    assert not torch.equal(starts[0][0], shared[0][0])
    assert torch.equal(starts[2], shared[2])                                # layer 2 is not stored


def test_training_bound_warm_starts_per_image():
    """`net.bound(x, eps, n_iter, index)` restarts each image where its last iteration ended: two steps per call
    approach the converged local norms call after call, as the official per-image store does; without a budget
    (or without `index`) every call starts afresh at the global iterates. The store is outside the state dict,
    and a copy of the network has none."""
    import copy
    z = fixture(CASES[1])
    net = official_net(z)
    net.converge()
    x, eps = t64(z["x"]), float(z["epsilon"])
    idx = torch.arange(x.shape[0]) + 3
    with torch.no_grad():
        limit = net.bound(x, eps, n_iter=3000).K_up
        net.warm_start_bytes, net.train_size = 0, 64
        fresh = [net.bound(x, eps, n_iter=1, index=idx).K_up for _ in range(3)]
        net.warm_start_bytes = 10 ** 6
        warm = [net.bound(x, eps, n_iter=1, index=idx).K_up for _ in range(6)]
    # (each call also advances the converged global iterates, by rounding only)
    assert all(torch.allclose(f, fresh[0], rtol=1e-9) for f in fresh + warm[:1])
    gaps = [float((limit - w).abs().max() / limit.max()) for w in warm]
    assert gaps[-1] < 0.2 * gaps[0] and gaps[-1] < float((limit - fresh[0]).abs().max() / limit.max())
    assert sorted(net.warm_starts.codes) == [0, 1, 2]
    assert not any("warm" in k for k in net.state_dict())
    assert copy.deepcopy(net).warm_starts is None and net.warm_starts is not None
