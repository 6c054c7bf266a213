"""Certificates of trained 1-Lipschitz nets (SOC LipConvNet, CPL), end to end: tiny nets trained on a real
CIFAR-10 subset (airplane vs frog) have no certified point broken by L2 PGD and every pairwise constant
dominates the exact Jacobian; a full run through the engine (synthetic images) writes the sound CRA beside the
published rule's."""
import json

import pytest
import torch
import torch.nn.functional as F

from bench import certify
from bench.config import resolve
from bench.data.base import DataBundle
from bench.registry import ARCHS, DATASETS
from bench.train import train_run
from bench.nn.families import cpl, soc

SHAPE = (3, 32, 32)


def synthetic_images(n, seed, num_classes=10):
    """CIFAR-like data: one random prototype image per class plus noise, uint8 NCHW."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(num_classes, *SHAPE, generator=g)
    g.manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 0.3 + 0.4 * prototypes[y] + 0.1 * torch.rand(n, *SHAPE, generator=g)
    return (x * 255).round().to(torch.uint8), y


def tiny_lipconv(head="soc"):
    return soc.build_lipconv(SHAPE, 10, normalize=(soc.CIFAR_MEAN, soc.SOC_STD), block_size=1, init_channels=4,
                             head=head)


def tiny_cpl(head="trunc"):
    return cpl.build_cpl(SHAPE, 10, normalize=((0.5, 0.5, 0.5), (1.0, 1.0, 1.0)), depth=2, channels=8,
                         depth_linear=2, n_features=64, inner=4, head=head)


#: two CIFAR-10 classes a tiny net separates within a few steps: airplane and frog
PGD_CLASSES = (0, 6)


@pytest.fixture(scope="module")
def cifar_subset(real_cifar10):
    """256 training images and the first 40 lossless test images of PGD_CLASSES from the real CIFAR-10;
    labels keep their CIFAR indices (10 outputs)."""
    data = real_cifar10

    def pick(x, y, n, allowed=None):
        keep = (y == PGD_CLASSES[0]) | (y == PGD_CLASSES[1])
        if allowed is not None:
            keep &= allowed
        idx = keep.nonzero()[:, 0][:n]
        return data.inputs(x[idx]), y[idx]
    return pick(data.x_train, data.y_train, 256), pick(data.x_test, data.y_test, 40, data.test_subsets["lossless"])


def train(model, loss_fn, data, steps=15, lr=1e-2):
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=g)[:32]
        loss = loss_fn(model(x[idx]), y[idx], model.bound())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.converge()
    return model


CASES = {
    "lipconv-soc-head": (lambda: tiny_lipconv("soc"), lambda z, y, b: F.cross_entropy(z, y)),
    "lipconv-lln": (lambda: tiny_lipconv("lln"), lambda z, y, b: F.cross_entropy(z, y)),
    "cpl-trunc": (lambda: tiny_cpl("trunc"), lambda z, y, b: F.multi_margin_loss(z, y, margin=0.7)),
    "cpl-linear": (lambda: tiny_cpl("linear"), lambda z, y, b: F.cross_entropy(z, y)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_net_certificates_hold(case, cifar_subset):
    torch.manual_seed(3)
    build, loss_fn = CASES[case]
    train_data, (x, y) = cifar_subset
    model = train(build(), loss_fn, train_data)
    bound = model.certified_bound()
    with torch.no_grad():
        logits = model(x).double()
    radius = certify.certified_radius(logits, bound, 10)
    correct = logits.argmax(1) == y
    assert float(correct.double().mean()) > 0.65, "the tiny net did not learn airplane vs frog"
    # exact local check of every pairwise constant: ‖∇(f_i − f_j)(x)‖ ≤ K_ij at a few inputs
    K = bound.pairwise(10)
    for xi in x[:3]:
        J = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi).reshape(10, -1).double()
        local = torch.linalg.vector_norm(J[:, None] - J[None], dim=2)
        assert bool((local <= K * (1 + 1e-5) + 1e-7).all()), float((local - K).max())
    # L2 PGD on the certified points at their certified radius: none may fall
    ok = correct & (radius > 0)
    assert int(ok.sum()) >= 4, "too few certified points to test"
    eps = float(radius[ok].median())
    pts = ok & (radius >= eps)
    broken = certify.l2_pgd(model, x[pts], y[pts], eps, steps=25, restarts=2, domain=(0.0, 1.0),
                            generator=torch.Generator().manual_seed(4))
    assert not bool(broken.any()), f"{int(broken.sum())} certified points broken at ε = {eps:.3f}"
    # the attack itself works: far outside the certified radius it does flip predictions
    far = certify.l2_pgd(model, x[pts], y[pts], 40 * eps, steps=10, restarts=1, domain=(0.0, 1.0))
    assert bool(far.any())


def test_sound_bound_dominates_the_published_rule():
    model = tiny_lipconv("soc").eval()
    model.converge()
    sound, nominal = model.certified_bound(), model.nominal_bound()
    assert float(nominal.K_up) == pytest.approx(1 / 0.2507, rel=1e-7)         # L = 3.99
    assert float(sound.K_up) >= float(nominal.K_up)                           # truncation error multiplied in
    assert float(sound.K_up) <= float(nominal.K_up) * 1.001
    assert all(b >= 1.0 for b in model.layer_bounds())


# -------------------------------------------------------------------------------------------------------------
# A full run through the engine (train_run → result.json) on registered tiny archs and synthetic images
# -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_plugins():
    def load(cfg, seed):
        x_train, y_train = synthetic_images(128, seed=1)
        x_test, y_test = synthetic_images(64, seed=9)
        return DataBundle("_tiny-images", x_train, y_train, x_test, y_test, num_classes=10, input_shape=SHAPE,
                          domain=(0.0, 1.0), scale=255.0)
    load.input_shape = SHAPE
    load.defaults = {"cert_eps": ["36/255", "0.5"]}
    names = {"_tiny-lipconv": lambda s, n, normalize=None: soc.build_lipconv(s, n, normalize, block_size=1,
                                                                                init_channels=4),
             "_tiny-lipconv-linear": lambda s, n, normalize=None: soc.build_lipconv(
                 s, n, normalize, block_size=1, init_channels=4, head="linear"),
             "_tiny-cpl": lambda s, n, normalize=None: cpl.build_cpl(s, n, normalize, depth=2, channels=8,
                                                                      depth_linear=1, n_features=32, inner=4)}
    DATASETS.register("_tiny-images")(load)
    for name, factory in names.items():
        ARCHS.register(name)(factory)
    yield
    DATASETS._entries.pop("_tiny-images")
    for name in names:
        ARCHS._entries.pop(name)


@pytest.mark.parametrize("method,arch,extra", [
    ("soc", "_tiny-lipconv", {"gamma": 0.1}),
    ("cpl", "_tiny-cpl", {"lr_schedule": "triangular"}),
    ("cll", "_tiny-lipconv-linear", {"eps": 0.25, "p": 0.05, "lam": 1e-3, "optimizer": "adamw", "weight_decay": 5e-4}),
])
def test_engine_run_writes_sound_and_published_cra(tmp_path, tiny_plugins, method, arch, extra):
    cfg = resolve({"method": method, "arch": arch, "dataset": "_tiny-images", "epochs": 2, "batch_size": 64,
                   "lower_bound_pairs": 8, "lower_bound_steps": 5, "device": "cpu", **extra})
    if method == "soc":
        cfg["normalize"] = [list(soc.CIFAR_MEAN), list(soc.SOC_STD)]
    result = train_run({**cfg, "seed": 1}, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == saved["status"] == "complete"
    test = saved["eval"]["test"]
    assert set(test["cra"]) == {"36/255", "0.5"}
    assert all(b >= 1.0 for b in saved["layer_bounds"])
    published = test.get("cra_published")
    if method == "cll":
        assert published is None                     # CLL's rule is the engine's
    elif published is not None:                      # recorded only where the two rules differ
        assert all(published[k] >= test["cra"][k] for k in test["cra"])
    if method == "soc":
        assert saved["K_up"] >= 1 / 0.2507 * (1 - 1e-7)
