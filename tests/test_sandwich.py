"""Sandwich layers (LBDN): conformance with the official code, the float32 Q's allowance, the lemma behind the
floating-point allowance, the bit-keyed eval cache and stale bounds, state_dict round trips of a network, the
DNN's parameter counts, the lbdn method and its recipe. The layer contract (guaranteed constants against exact
Jacobians before and after adversarial steps, stale bounds, state_dict round trips, per layer) is
tests/test_layer_contract.py."""
import copy
import math

import numpy as np
import pytest
import torch

from bench.nn.families import sandwich as sw
from bench.nn.lipschitz import UnconvergedBoundError
from bench.nn.verify import adversarial_steps, autograd_jacobians, impulse_jacobian, spectral_norm
from methods import lbdn  # noqa: F401  (registers the method; methods/__init__ may not import it yet)
from tests.conftest import fixture

#: case → (layer class, c_in, c_out, stride)
CASES = {"sandwich_conv_c4to6_k3_s1_hw8": ("conv", 4, 6, 1), "sandwich_conv_c4to8_k3_s2_hw8": ("conv", 4, 8, 2),
         "sandwich_fc_16to12": ("fc", 16, 12, 1), "sandwich_lin_16to10": ("lin", 16, 10, 1)}


def make_layer(kind, cin, cout, stride=1, **kw):
    if kind == "conv":
        return sw.SandwichConv(cin, cout, 3, stride=stride, **kw)
    return (sw.SandwichFc if kind == "fc" else sw.SandwichLin)(cin, cout, **kw)


def official_layer(case, dtype=torch.float64):
    """The official layer of `case` in the fixtures README's order: built, one forward (which creates conv α
    from the initial weight and caches Q), then the stored parameters copied in — α too, stale, never recomputed
    — so the eval forward must not reuse the Q cached for the initial weight."""
    z = fixture(case)
    kind, cin, cout, stride = CASES[case]
    layer = make_layer(kind, cin, cout, stride).to(dtype).eval()
    x = torch.as_tensor(z["x"]).to(dtype)
    with torch.no_grad():
        layer(x)
        for name in ("weight", "bias", "psi", "alpha"):
            if name in z:
                getattr(layer, name).copy_(torch.as_tensor(z[name]))
    return layer, x, z


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_official_sandwich(case):
    layer, x, z = official_layer(case)
    with torch.no_grad():
        y = layer(x)
    np.testing.assert_allclose(y.numpy(), z["y"], rtol=1e-10, atol=1e-10)
    Q = layer.current_q().numpy()
    if "Q" in z:
        np.testing.assert_allclose(Q, z["Q"], atol=1e-12)
    else:  # the per-frequency complex Cayley step
        np.testing.assert_allclose(Q.real, z["Qfft_real"], atol=1e-12)
        np.testing.assert_allclose(Q.imag, z["Qfft_imag"], atol=1e-12)
        assert float(layer.alpha) == float(z["alpha"]) != pytest.approx(float(z["wfft_norm_of_stored_weight"]))
    # the official Jacobian norms (fp64 SVD of the official layer) lie below lipbench's guaranteed constant
    bound = layer.converge()
    assert float(np.max(z["jacobian_opnorm_per_sample"])) <= bound
    assert float(layer.power_bound()) <= bound
    kind = CASES[case][0]
    if kind == "lin":   # ‖B‖ itself: every per-sample Jacobian is B
        assert bound == pytest.approx(float(z["jacobian_opnorm_per_sample"][0]), rel=1e-9)
    else:               # 1 + an allowance of the float64 Cayley's rounding, not an assumed 1
        assert 1.0 < bound <= 1.0 + 1e-11
    # float32, as the fixtures README asks (FFT conv: ~1e-4)
    layer32, x32, _ = official_layer(case, torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(layer32(x32).double().numpy(), z["y"], rtol=1e-4, atol=1e-4)


def test_conv_alpha_is_frozen_at_the_first_forward_and_never_trained():
    torch.manual_seed(1)
    layer = sw.SandwichConv(3, 4, 3).double()
    assert math.isnan(float(layer.alpha)) and "alpha" not in dict(layer.named_parameters())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    layer(x)
    wfft = layer._kernel_fft(layer.weight.detach(), 6)
    assert float(layer.alpha) == pytest.approx(float(torch.linalg.vector_norm(wfft)), rel=1e-14)
    alpha0 = float(layer.alpha)
    adversarial_steps(layer, x)
    assert float(layer.alpha) == alpha0 and "alpha" in layer.state_dict()
    trained = sw.SandwichConv(3, 4, 3, conv_alpha="trained").double()
    trained(x)
    assert "alpha" in dict(trained.named_parameters())
    a0 = float(trained.alpha.detach())
    adversarial_steps(trained, x)
    assert float(trained.alpha.detach()) != a0
    with pytest.raises(ValueError):   # the operator (and its bound) is per frequency of the first input size
        layer(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_float32_bound_covers_the_computed_q():
    """float32 Cayley: Q is orthonormal only to ~1e-7. The guaranteed e bounds the exact deviation of the very Q
    the eval forward uses, tightly, and the layer certifies 1 + 2e, not 1."""
    torch.manual_seed(2)
    for layer, x in ((sw.SandwichFc(48, 32), torch.randn(2, 48)), (sw.SandwichConv(4, 8, 3), torch.randn(2, 4, 8, 8))):
        layer.eval()
        layer(x)
        bound = layer.converge()
        Q = layer.current_q()
        assert Q is layer.current_q()                   # the eval forward's cached tensor ...
        Q64 = Q.detach().to(torch.complex128 if Q.is_complex() else torch.float64)
        E = Q64 @ Q64.mH - torch.eye(Q.shape[-2], dtype=Q64.dtype)
        exact = float(torch.linalg.matrix_norm(E, 2).max())
        assert exact > 1e-9                             # ... is visibly not orthonormal
        assert exact <= layer.deviation_bound <= 1.2 * exact + 1e-12
        assert bound >= sw.sandwich_constant(exact) > 1.0 + 1e-9
        # a float64 copy (certify_dtype: float64) multiplies with exactly the float64 Q the bound also covers
        copy64 = copy.deepcopy(layer).double().eval()
        copy64(x.double())
        assert torch.equal(copy64.current_q(), layer._q_cache[torch.float64][2])


def test_lemma_with_an_inexact_q():
    """The allowance is needed and sufficient: with A = B = (1 + δ)I/√2 (QQᵀ = (1 + δ)²I) and every ReLU active
    the Jacobian is (1 + δ)²I, above 1; the certified constant √(1 + 4q²(q² − 1)) covers it, and random
    perturbations of Q at random inputs too."""
    torch.manual_seed(3)
    m, delta = 5, 1e-3
    eye = torch.eye(m, dtype=torch.float64)
    layer = sw.SandwichFc(m, m).double().eval()
    Q = torch.cat([eye, eye], 1) * (1 + delta) / math.sqrt(2)
    layer._compute_q = lambda w, a: Q           # the forward and the bound both use this Q
    with torch.no_grad():
        layer.bias.fill_(100.0)
        layer.psi.normal_(0, 0.3)
    x = torch.randn(3, m, dtype=torch.float64)
    layer(x[:1])
    bound = layer.converge()
    J = spectral_norm(autograd_jacobians(layer, x))
    assert J == pytest.approx((1 + delta) ** 2, rel=1e-12)
    assert J <= bound <= 1 + 5 * delta
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        layer = sw.SandwichFc(6, 4).double().eval()
        Qr = sw.cayley(torch.randn(4, 10, generator=g, dtype=torch.float64))
        Qr = Qr + 0.05 * torch.randn(4, 10, generator=g, dtype=torch.float64)
        layer._compute_q = lambda w, a, Qr=Qr: Qr
        with torch.no_grad():
            layer.psi.copy_(0.5 * torch.randn(4, generator=g, dtype=torch.float64))
            layer.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
        xr = torch.randn(16, 6, generator=g, dtype=torch.float64)
        layer(xr[:1])
        assert spectral_norm(autograd_jacobians(layer, xr)) <= layer.converge()


def test_conv_operator_is_the_hermitian_average_on_self_conjugate_columns():
    """irfft2 keeps only what a real signal holds: with Q̂ perturbed off Hermitian consistency, the layer's linear
    map is exactly the multiplier with (Q̂(ω) + conj Q̂(−ω))/2 on the columns ω₂ = 0, n/2 (Q̂ elsewhere), its
    adjoint is the one the power iteration uses, and the guaranteed bound (which takes e over both Q̂ and the
    averages) covers the operator and the nonlinear layer (an inexact Q with e ≈ 0.4)."""
    torch.manual_seed(5)
    n = 6
    layer = sw.SandwichConv(2, 3, 3).double().eval()
    layer(torch.zeros(1, 2, n, n, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    Q0 = layer.current_q()
    noise = torch.complex(torch.randn(Q0.shape, generator=g, dtype=torch.float64),
                          torch.randn(Q0.shape, generator=g, dtype=torch.float64))
    Qp = Q0 + 0.1 * noise
    layer._compute_q = lambda w, a: Qp
    layer._q_cache.clear()
    w = layer.weight.detach()
    T = impulse_jacobian(lambda v: layer.operator(v, w), (5, n, n))
    Tadj = impulse_jacobian(lambda u: layer.adjoint(u, w), (3, n, n))
    assert torch.allclose(Tadj, T.T, atol=1e-13)
    grid = Qp.reshape(n, n // 2 + 1, 3, 5).clone()
    mirror = torch.remainder(-torch.arange(n), n)
    for c in (0, n // 2):
        grid[:, c] = 0.5 * (grid[:, c] + grid[mirror, c].conj())
    expected = float(torch.linalg.matrix_norm(grid, 2).max())
    exact = spectral_norm(T)
    assert exact == pytest.approx(expected, rel=1e-12)
    assert exact > float(torch.linalg.matrix_norm(Q0, 2).max()) + 0.05    # the perturbation is visible
    bound = layer.converge()
    assert exact <= math.sqrt(1 + layer.deviation_bound) and float(layer.power_bound()) <= bound
    with torch.no_grad():
        layer.psi.normal_(0, 0.3)
        layer.bias.normal_(0, 0.5)
    x = torch.randn(4, 2, n, n, dtype=torch.float64)
    assert spectral_norm(autograd_jacobians(layer, x)) <= bound


@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_eval_cache_never_outlives_its_weights(kind):
    """A fused Adam step changes the weights in place (without bumping Tensor._version) while the layer is in
    eval mode: the next eval output is that of the new weights, and the old bound raises as stale."""
    torch.manual_seed(4)
    layer = (sw.SandwichConv(3, 4, 3) if kind == "conv" else sw.SandwichFc(6, 5)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64) if kind == "conv" else torch.randn(2, 6, dtype=torch.float64)
    y0 = layer(x).detach()
    layer.converge()
    layer.certified_bound()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, fused=True)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    version = layer.weight._version
    opt.step()
    assert layer.weight._version == version     # the change is invisible to a version key
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()
    y1 = layer(x).detach()
    fresh = copy.deepcopy(layer)
    fresh._q_cache.clear()
    assert not torch.allclose(y1, y0)
    assert torch.equal(y1, fresh(x).detach())   # exactly the new weights' output
    layer.converge()
    assert layer.certified_bound() >= 1.0


def tiny_net(head="lln", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    features, classifier, one = sw.sandwich_modules((3, 8, 8), 5, head=head, convs=((4, 1), (6, 2)), fcs=(16, 12))
    net = sw.SandwichNet(features, classifier, (3, 8, 8), 5, normalize=((0.5, 0.4, 0.3), (1.0, 1.0, 1.0)),
                         last_layer_one_lipschitz=one)
    return net.to(dtype)


@pytest.mark.parametrize("head", ["lln", "lin", "linear"])
def test_state_dict_round_trip_and_net_bound(head):
    net = tiny_net(head)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    adversarial_steps(net, x, steps=2)
    net.converge()
    K = net.certified_bound()
    other = tiny_net(head, seed=1)
    other.load_state_dict(copy.deepcopy(net.state_dict()))
    other.eval()
    other.converge()
    assert torch.equal(net(x), other(x))
    assert torch.equal(other.certified_bound().K_up, K.K_up) and net.layer_bounds() == other.layer_bounds()
    # the feature map's (and for the 1-Lipschitz head the whole net's) exact Jacobian lies below K_up
    fn = net if head == "lin" else (lambda b: net.features(b - net.norm_mean))
    assert spectral_norm(autograd_jacobians(fn, x)) <= float(K.K_up)
    assert (0.5 if head == "lin" else 1.0) < float(K.K_up) <= 1 + 1e-8   # lin: ‖B‖ < 1 enters K_up
    assert float(net.nominal_bound().K_up) == 1.0 and net.published_rule_nominal
    assert not any(k.endswith("alpha") for k, _ in net.named_parameters() if k.startswith("features.0"))


def test_load_official_state_dict():
    net = tiny_net("lln")
    n_feat = len(net.features)
    official = {}
    for key, value in net.state_dict().items():
        if key.split(".")[-1] in ("power_iterate", "sigma_bound", "sigma_power") or key.startswith("norm_"):
            continue
        head, rest = key.split(".", 1)
        official["model." + (rest if head == "features" else f"{n_feat}.{key.split('.', 1)[1]}")] = value
    assert "model.0.alpha" in official and f"model.{n_feat}.weight" in official
    other = tiny_net("lln", seed=5)
    sw.load_official_state_dict(other, official)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    other.eval(), net.eval()
    assert torch.allclose(other(x), net(x), rtol=0, atol=1e-13)


def test_cayley_rows_are_orthonormal():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 3, 8, generator=g, dtype=torch.complex128)
    Q = sw.cayley(W)
    assert torch.allclose(Q @ Q.mH, torch.eye(3, dtype=torch.complex128).expand(7, 3, 3), atol=1e-13)
    assert sw.orthonormality_deviation(Q) < 1e-12


# The official DNN, counted as its train.py counts (before the first forward: conv α not yet created; here a
# buffer). README/reference notes: 25.8 M (CIFAR-100), 39.1 M (Tiny-ImageNet).
PARAMS = {((3, 32, 32), 100, "lln"): 25_806_375, ((3, 64, 64), 200, "lln"): 39_149_195,
          ((3, 32, 32), 100, "lin"): 25_816_376, ((3, 32, 32), 100, "linear"): 25_806_375,
          ((3, 32, 32), 10, "lln"): 25_714_125}


@pytest.mark.parametrize("shape,classes,head", sorted(PARAMS))
def test_dnn_parameter_counts(shape, classes, head):
    with torch.device("meta"):
        features, classifier, _ = sw.sandwich_modules(shape, classes, head=head)
    assert sum(p.numel() for m in (features, classifier) for p in m.parameters()) == PARAMS[(shape, classes, head)]
    convs = [m for m in features if isinstance(m, sw.SandwichConv)]
    assert [(m.out_channels, m.stride, m.kernel_size) for m in convs][:2] == [(64, 1, 3), (64, 2, 1)]
    assert len(convs) == (6 if shape[-1] == 32 else 8)


def test_lbdn_method_recipe_and_loss():
    from bench.config import resolve
    from bench.optim import triangular_factor
    from bench.registry import ARCHS, METHODS
    cfg = resolve({"method": "lbdn", "arch": "dnn", "dataset": "cifar100"})
    assert cfg["arch"] == "sandwich" and ARCHS.get("sandwich").family == "sandwich"
    assert resolve({"method": "lbdn", "arch": "sandwich-lin"})["dataset"] == "cifar100"   # the default dataset
    assert (cfg["epochs"], cfg["protocol_epochs"], cfg["batch_size"], cfg["optimizer"], cfg["lr"],
            cfg["weight_decay"], cfg["lr_schedule"]) == (400, 400, 256, "adam", 0.01, 0.0, "triangular")
    assert cfg["normalize"] == [[0.5071, 0.4865, 0.4409], [1.0, 1.0, 1.0]]
    from bench.data.augment import ImageAugment
    for side, padding in ((32, 4), (64, 8)):     # the dataset pipelines, then the official LBDN one
        aug = ImageAugment(side, padding).configured(cfg["augment"])
        assert (aug.padding, aug.padding_mode, aug.degrees, aug.flip) == (4, "reflect", 0.0, True)
        assert aug.jitter == (0.1, (0.5, 2.0), (0.3, 2.0), 0.02)
    assert resolve({"method": "lbdn", "arch": "sandwich", "dataset": "tinyimagenet"})["normalize"][0] == \
        [0.485, 0.456, 0.406]
    # official lr_schedule(epoch + (batch + 1)/steps) = np.interp in epochs with knots E·2//5, E·4//5, E
    E, spe = 400, 195
    for k in (0, 1, 194, 195, 31_199, 31_200, 45_000, 62_399, 62_400, 70_000, 77_999):
        epoch, batch = divmod(k, spe)
        official = float(np.interp(epoch + (batch + 1) / spe, [0, E * 2 // 5, E * 4 // 5, E], [0, 1, 1 / 20, 0]))
        assert triangular_factor(k + 1, E * spe) == pytest.approx(official, abs=1e-12)
    # the official Xent: t·CE((z − √2·1.5·onehot)/t)
    method = METHODS.get("lbdn")(cfg, 100)
    z, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
    loss, _ = method.loss(z, y, None, 0.0)
    shifted = (z - math.sqrt(2) * 1.5 * torch.nn.functional.one_hot(y, 100)) / 0.25
    assert float(loss) == pytest.approx(0.25 * float(torch.nn.functional.cross_entropy(shifted, y)), rel=1e-6)


@pytest.fixture
def tiny_engine_plugins():
    from bench.data.base import DataBundle
    from bench.registry import ARCHS, DATASETS
    shape = (3, 16, 16)

    def images(n, seed):
        g = torch.Generator().manual_seed(0)
        proto = torch.rand(4, *shape, generator=g)
        g.manual_seed(seed)
        y = torch.arange(n) % 4
        x = 0.3 + 0.4 * proto[y] + 0.1 * torch.rand(n, *shape, generator=g)
        return (x * 255).round().to(torch.uint8), y

    def load(cfg, seed):
        return DataBundle("_sw-images", *images(96, 1), *images(32, 9), num_classes=4, input_shape=shape,
                          domain=(0.0, 1.0), scale=255.0)
    load.input_shape, load.defaults = shape, {"cert_eps": ["36/255", "0.25"]}
    DATASETS.register("_sw-images")(load)
    ARCHS.register("_sw-tiny")(lambda s, n, normalize=None: sw.build_sandwich(
        s, n, normalize, convs=((4, 1), (4, 2)), fcs=(16, 12)))
    yield
    DATASETS._entries.pop("_sw-images")
    ARCHS._entries.pop("_sw-tiny")


@pytest.mark.parametrize("certify_dtype", ["float32", "float64"])
def test_engine_run(tmp_path, tiny_engine_plugins, certify_dtype):
    import json
    from bench.config import resolve
    from bench.train import train_run
    cfg = resolve({"method": "lbdn", "arch": "_sw-tiny", "dataset": "_sw-images", "epochs": 2, "batch_size": 32,
                   "lr": 0.01, "lr_schedule": "triangular", "normalize": [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]],
                   "lower_bound_pairs": 4, "lower_bound_steps": 3, "device": "cpu", "certify_dtype": certify_dtype})
    from bench import store
    folder = store.run_dir(tmp_path, {**cfg, "seed": 1})
    result = train_run({**cfg, "seed": 1}, folder)
    saved = json.loads((folder / "result.json").read_text())
    assert result["status"] == saved["status"] == "complete"
    bounds = saved["layer_bounds"]
    assert len(bounds) == 4 and all(1.0 < b <= 1.0 + 1e-4 for b in bounds)   # float32 Q: 1 + O(1e-6)
    test = saved["eval"]["test"]
    published = test.get("cra_published", test["cra"])
    assert all(published[k] >= test["cra"][k] for k in test["cra"])
    if certify_dtype == "float32":   # `bench audit`: re-certifies, attacks, and checks every layer's operator exactly
        from bench import audit
        report = audit.audit_run(folder, audit.AuditOptions(points=16, restarts=1, steps=10), write=False)
        assert report["status"] == "pass", report["findings"]
        layers = report["layers_summary"]
        assert layers["bounded"] == layers["checked_exactly"] == 4 and layers["max_exact_over_bound"] <= 1.0
