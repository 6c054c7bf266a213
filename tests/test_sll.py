"""SLL layers (bench/nn/families/sll.py) and the `sll` method: conformance with the official code (both variants),
the paper variant's excess over 1, staleness and state_dict round trips of a network, the loss, the recipe and
parameter counts. The layer contract (the guaranteed bound against exact Jacobians and their spectrum before and
after adversarial steps, per layer and variant) is tests/test_layer_contract.py."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.sll as sll_method
from bench.nn.families import sll
from bench.nn.families.common import FlattenLinear
from bench.nn.lipschitz import UnconvergedBoundError
from bench.nn.verify import autograd_jacobians
from tests.conftest import fixture, t64

#: case → (kind, variant, C, inner, seed): the seed is the fixture generator's (manifest: 1000·0 + k; found by
#: matching the stored parameters), with which the official constructor drew them in float64
CASES = {
    "sll_current_conv_c6_inner10_hw8": ("conv", "current", 6, 10, 40),
    "sll_current_linear_c24_inner40": ("linear", "current", 24, 40, 41),
    "sll_paper_a478875_conv_c6_inner10_hw8": ("conv", "paper", 6, 10, 42),
    "sll_paper_a478875_linear_c24_inner40": ("linear", "paper", 24, 40, 43),
}


def make(kind, variant, c, inner):
    return sll.SLLConv(c, inner, variant=variant) if kind == "conv" else sll.SLLLinear(c, inner, variant=variant)


def official_layer(case):
    z = fixture(case)
    kind, variant, c, inner, _ = CASES[case]
    layer = make(kind, variant, c, inner).double()
    layer.load_official({name: t64(z[name]) for name, _ in layer.named_parameters()})
    return layer.eval(), z


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_official_sll(case):
    layer, z = official_layer(case)
    kind, variant, c, inner, seed = CASES[case]
    # the official parameter names and shapes (official state_dicts load as they are)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == \
        {n: tuple(z[n].shape) for n, _ in layer.named_parameters()}
    x = t64(z["x"])
    with torch.no_grad():
        y = layer(x)
    np.testing.assert_allclose(y.numpy(), z["y"], rtol=1e-12, atol=1e-12)
    if "T" in z:  # the official compute_t() (already inverted)
        np.testing.assert_allclose(layer.compute_t().detach().numpy(), z["T"], rtol=1e-13, atol=0)
    # the certificate's scaling s̄ = t_lo^{-1/2} dominates the layer's s = √(coefficient/2), and barely
    s, s_up = layer.compute_t().detach().sqrt(), layer.scale_upper()
    assert bool((s <= s_up).all()) and bool((s_up <= s * (1 + 1e-12)).all())
    # per-sample Jacobians: spectral norm and smallest eigenvalue as the fixture measured them
    J = autograd_jacobians(layer, x)
    assert torch.allclose(J, J.transpose(1, 2), atol=1e-13)  # I − 2 Wᵀ S² D W is symmetric
    np.testing.assert_allclose(torch.linalg.matrix_norm(J, 2).numpy(), z["jacobian_opnorm_per_sample"], rtol=1e-10)
    np.testing.assert_allclose(torch.linalg.eigvalsh(J)[:, 0].numpy(), z["jacobian_min_eigenvalue_per_sample"],
                               rtol=1e-9, atol=1e-12)
    # the official initialisation, drawn in the official order: the same seed gives the same parameters
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        fresh = make(kind, variant, c, inner)
    finally:
        torch.set_default_dtype(dtype)
    for name, p in fresh.named_parameters():   # the same draws (ATen's scalar kernels round their scaling ~1e-15 apart)
        np.testing.assert_allclose(p.detach().numpy(), z[name], rtol=1e-14, atol=0, err_msg=name)


def test_current_conv_q_has_no_effect_and_kernel_gram_is_the_conv():
    torch.manual_seed(1)
    layer = sll.SLLConv(4, 6).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    y = layer(x)
    y.sum().backward()
    assert layer.q.grad is None   # official: exp(−q_i)·exp(q_i) cancels, ∂y/∂q = 0 (Adam leaves q as it is)
    with torch.no_grad():
        layer.q.mul_(3).add_(1)
        assert torch.equal(layer(x), y.detach())
    K = layer.kernel.detach()
    torch.testing.assert_close(sll.kernel_gram(K), F.conv2d(K, K, padding=2), rtol=1e-14, atol=1e-14)


def test_paper_dense_layer_is_not_one_lipschitz_and_its_bound_says_so():
    """Orthonormal rows make W Wᵀ = I, so the Gershgorin sum is exact and the paper's 1e-6 in q⁻¹ alone pushes
    ‖S W‖² to max (|q_i| + 1e-6)/|q_i| > 1; with every unit active (D = I) the Jacobian reaches 1 − 2‖SW‖² < −1."""
    torch.manual_seed(22)
    n, inner = 16, 8
    Q, _ = torch.linalg.qr(torch.randn(n, inner, dtype=torch.float64))
    q = torch.full((inner,), 0.5, dtype=torch.float64)
    q[3] = 1e-4
    layers = {}
    for variant in ("paper", "current"):
        layer = sll.SLLLinear(n, inner, variant=variant).double().eval()
        with torch.no_grad():
            layer.weight.copy_(Q.T)
            layer.bias.fill_(100.0)   # every pre-activation positive on the inputs below: D = I
            layer.q.copy_(q if variant == "paper" else q.log())
        layer(torch.zeros(1, n, dtype=torch.float64))
        layers[variant] = layer
    x = torch.randn(4, n, dtype=torch.float64)
    paper, current = layers["paper"], layers["current"]
    worst = float(torch.linalg.matrix_norm(autograd_jacobians(paper, x), 2).max())
    expected = 2 * (1e-4 + 1e-6) / 1e-4 - 1                                  # 1.02
    assert worst == pytest.approx(expected, rel=1e-9) and worst > 1.01
    bound = paper.converge()
    assert worst <= bound <= worst * (1 + 1e-8)
    assert float(torch.linalg.matrix_norm(autograd_jacobians(current, x), 2).max()) == pytest.approx(1.0, abs=1e-12)
    assert current.converge() <= 1 + 1e-9


def small_net(variant="current", head="lln", seed=0):
    torch.manual_seed(seed)
    features, classifier, one_lip = sll.sll_modules((3, 8, 8), 4, n_conv=2, n_dense=2, w=6, dense_inner=16,
                                                    conv_inner=5, head=head, variant=variant)
    return sll.SLLNet(features, classifier, (3, 8, 8), 4, normalize=([0.5, 0.4, 0.3], [1.0, 1.0, 1.0]),
                      last_layer_one_lipschitz=one_lip).double()


@pytest.mark.parametrize("variant", sll.VARIANTS)
def test_state_dict_round_trip_and_network_bound(variant):
    net = small_net(variant, seed=3)
    net.converge()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    other = small_net(variant, seed=4)
    other.load_state_dict(copy.deepcopy(net.state_dict()))
    assert torch.equal(other(x), net(x))
    with pytest.raises(UnconvergedBoundError):  # loaded bounds are never trusted
        other.certified_bound()
    other.converge()
    assert other.layer_bounds() == net.layer_bounds()
    assert net.published_rule_nominal and not net.last_layer_one_lipschitz
    K = float(net.certified_bound().K_up)
    assert 1.0 <= K <= 1 + 1e-9 if variant == "current" else K >= 1.0


def test_stale_bound_raises_after_a_fused_adam_step():
    net = small_net()
    net.converge()
    net.certified_bound()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(net(x), y).backward()
    opt.step()   # fused Adam does not bump Tensor._version: the digest catches it
    with pytest.raises(UnconvergedBoundError):
        net.certified_bound()
    net.converge()
    net.certified_bound()
    layer = net._layers[-1]   # q alone changes T
    with torch.no_grad():
        layer.q.add_(0.1)
    with pytest.raises(UnconvergedBoundError):
        layer.certified_bound()


def test_heads_and_training_bound():
    trunc = small_net(head="trunc")
    assert trunc.last_layer_one_lipschitz and trunc.bound().W is None
    linear = small_net(head="linear")
    assert type(linear.classifier) is FlattenLinear and not linear.last_layer_one_lipschitz  # unconstrained rows
    b = small_net().bound()
    assert float(b.K_up) == 1.0 and b.K_up.grad_fn is None   # trains with its nominal constant


def test_loss_is_the_offset_cross_entropy():
    torch.manual_seed(5)
    z, y = torch.randn(7, 10, dtype=torch.float64), torch.randint(0, 10, (7,))
    method = sll_method.SLL({**sll_method.SLL.hparams}, 10)
    loss, logs = method.loss(z, y, None, 0.0)
    u, t = 1.5 * math.sqrt(2), 0.25
    shifted = (z - u * F.one_hot(y, 10).double()) / t
    hand = t * (torch.logsumexp(shifted, 1) - shifted.gather(1, y[:, None])[:, 0]).mean()
    assert float(loss) == pytest.approx(float(hand), rel=1e-12)
    assert logs == {}  # nothing read on the host per step


def test_recipe_aliases_and_augmentation():
    from bench.config import resolve
    from bench.data.augment import ImageAugment
    from bench.registry import ARCHS
    for ds, mean in sll.SLL_MEANS.items():
        cfg = resolve({"method": "sll", "arch": "xl", "dataset": ds})
        assert cfg["arch"] == "sll-xl" and ARCHS.get(cfg["arch"]).family == "sll"
        assert (cfg["epochs"], cfg["protocol_epochs"], cfg["batch_size"], cfg["optimizer"], cfg["lr"],
                cfg["weight_decay"], cfg["lr_schedule"], cfg["betas"]) == \
            (1000, 1000, 256, "adam", 0.01, 0.0, "triangular", [0.5, 0.9])
        assert cfg["normalize"] == [mean, [1.0, 1.0, 1.0]]
        assert cfg["cert_eps"] == ["36/255", "72/255", "108/255", "255/255"]
        side = 64 if ds == "tinyimagenet" else 32
        aug = ImageAugment(side, 8).configured(cfg["augment"])
        assert (aug.padding, aug.padding_mode, aug.degrees, aug.flip) == (4, "reflect", 0.0, True)
        assert aug.ranges == [(0.9, 1.1), (0.5, 2.0), (0.3, 2.0), (-0.02, 0.02)]
    for name in ("sll-s", "sll-m-trunc", "sll-l-linear", "sll-xl-paper", "sll-xl-paper-trunc", "sll-s-paper-linear"):
        assert ARCHS.get(name).family == "sll"
    assert ARCHS.get("sll-xl-paper").spec["variant"] == "paper" and ARCHS.get("sll-xl").spec["variant"] == "current"


def test_optimizer_uses_the_official_betas():
    from bench.config import resolve
    from bench.optim import make_optimizer
    cfg = resolve({"method": "sll", "arch": "xl", "dataset": "cifar10"})
    opt = make_optimizer(cfg, torch.nn.Linear(2, 2))
    assert tuple(opt.param_groups[0]["betas"]) == (0.5, 0.9)


# Official parameter counts from the official shapes: conv 5·w·9 + 5 + 5, dense 2048·flat + 2048 + 2048,
# LLN N·flat + N (reference notes: S 41.4 M, M 78.8 M, L 118.3 M, XL 236.4 M; XL on Tiny-ImageNet 950 M).
def official_count(n_conv, n_dense, w, inner, side, classes, head="lln"):
    flat = w * (side // 4) ** 2
    return n_conv * (5 * w * 9 + 10) + n_dense * (inner * flat + 2 * inner) + (classes * flat + classes
                                                                                 if head != "trunc" else 0)


PARAMS = {("sll-s", 32, 10): 41_385_862, ("sll-m", 32, 10): 78_803_870, ("sll-l", 32, 10): 118_266_370,
          ("sll-xl", 32, 10): 236_446_550, ("sll-xl-trunc", 32, 10): 236_369_740,
          ("sll-xl-paper-linear", 32, 10): 236_446_550, ("sll-xl", 32, 100): 237_137_840,
          ("sll-xl", 64, 200): 950_302_740, ("sll-s", 64, 200): 167_524_292}


@pytest.mark.parametrize("arch,side,classes", sorted(PARAMS))
def test_sll_parameter_counts(arch, side, classes):
    from bench.registry import ARCHS
    spec = ARCHS.get(arch).spec
    with torch.device("meta"):  # 950 M parameters would need 3.8 GB: count the modules without memory
        features, classifier, _ = sll.sll_modules((3, side, side), classes, **spec)
    count = sum(p.numel() for m in (features, classifier) for p in m.parameters())
    assert count == PARAMS[(arch, side, classes)]
    assert count == official_count(spec["n_conv"], spec["n_dense"], spec["w"], spec["dense_inner"], side, classes,
                                   spec["head"])


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_zero_row_is_dropped_by_safe_inv_and_bounded(kind):
    torch.manual_seed(23)
    layer = make(kind, "current", 4, 6).double().eval()
    with torch.no_grad():
        layer.weight[2].zero_()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64) if kind == "conv" else torch.randn(3, 4, dtype=torch.float64)
    y = layer(x)
    assert bool(torch.isfinite(y).all())
    assert float(layer.compute_t().detach()[2]) == 0.0 and float(layer.scale_upper()[2]) == 0.0
    assert layer.converge() <= 1 + 1e-9
    J = autograd_jacobians(layer, x)
    assert float(torch.linalg.matrix_norm(J, 2).max()) <= 1 + 1e-12


TINY = "test-sll-tiny"


def _register_tiny():
    from bench.nn.archs import register_spec_arch
    from bench.registry import ARCHS
    if TINY not in ARCHS.names():
        register_spec_arch(TINY, sll.build_sll, "a tiny SLL net for the end-to-end run", family="sll", n_conv=2,
                           n_dense=1, w=6, dense_inner=16, conv_inner=5, head="lln", variant="current")


def _write_cifar_npz(path, n_train=32, n_test=8):
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), y_train=np.arange(n_train) % 10,
             x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), y_test=np.arange(n_test) % 10)


def test_short_sll_run_through_the_engine(tmp_path, monkeypatch):
    """The sll recipe (triangular lr, offset CE, augment mapping, ε up to 255/255) for one epoch of a tiny SLL net
    on a generated CIFAR-10 npz: a complete result whose layer bounds are 1 and whose sound CRA equals the
    published one."""
    import json
    from bench import store
    from bench.config import resolve
    from bench.train import train_run
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _register_tiny()
    _write_cifar_npz(tmp_path / "data" / "cifar10.npz")
    cfg = resolve({"method": "sll", "arch": TINY, "dataset": "cifar10", "epochs": 1, "batch_size": 16,
                   "data_root": str(tmp_path / "data"), "lower_bound_steps_short": 2, "lower_bound_pairs_short": 4})
    cfg["seed"] = 1
    folder = store.run_dir(tmp_path / "results", cfg)
    result = train_run(cfg, folder)
    on_disk = json.loads((folder / "result.json").read_text())
    assert on_disk["status"] == "complete"
    assert set(on_disk["eval"]["test"]["cra"]) == {"36/255", "72/255", "108/255", "255/255"}
    assert all(1.0 <= b <= 1 + 1e-9 for b in result["layer_bounds"])


def test_dataset_applies_the_augment_mapping(tmp_path):
    from bench.registry import DATASETS
    _write_cifar_npz(tmp_path / "cifar10.npz", 4, 2)
    bundle = DATASETS.get("cifar10")({"data_root": str(tmp_path), "augment": sll.SLL_AUGMENT}, 1)
    assert (bundle.augment.padding_mode, bundle.augment.degrees, len(bundle.augment.ranges)) == ("reflect", 0.0, 4)


def test_audit_checks_sll_layers_exactly_and_the_operator_never_reads_a_stale_scale():
    from bench import audit
    net = small_net(seed=7).eval()
    net.converge()
    rows, findings = audit.check_layers(net, {}, 2e7)
    assert not findings and len(rows) == 4 and all(r["checked_exactly"] for r in rows)
    assert all(r["norm_power"] <= r["exact"] * (1 + 1e-9) and r["exact"] <= r["norm_upper"] for r in rows)
    layer = net._layers[-1]
    w = layer.weight.detach().double()
    v = torch.randn(3, *layer.operator_input_shape, dtype=torch.float64)
    before = layer.operator(v, w)
    with torch.no_grad():
        w[0].mul_(3.0)   # the same tensor object, changed in place
    assert not torch.allclose(layer.operator(v, w), before)
    assert layer._scale_cache is None
