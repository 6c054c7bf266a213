"""Local-Lip-B through the engine: the method's schedule, a short training run writing both certificates with
per-point K, the short-run budgets, and `bench audit` (float64 re-certification, attacks at the certified ε)."""
import json

import pytest
import torch

from bench.config import resolve
from bench.data.base import DataBundle
from bench.nn.families import local_lip as ll
from bench.registry import ARCHS, DATASETS, METHODS

TINY = (("c", 4, 3, 1, 1), ("c", 8, 4, 2, 1), ("d", 16))


@pytest.fixture
def tiny_plugins():
    shape = (3, 8, 8)

    def images(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 4
        x = (0.15 * torch.rand(n, *shape, generator=g) + 0.2 * y[:, None, None, None].float()).clamp(0, 1)
        return x, y

    def load(cfg, seed):
        return DataBundle("_ll-images", *images(128, 1), *images(48, 9), num_classes=4, input_shape=shape,
                          domain=(0.0, 1.0), scale=255.0)
    load.input_shape, load.defaults = shape, {"cert_eps": ["0.02", "0.05"]}
    DATASETS.register("_ll-images")(load)
    def tiny(s, n, normalize=None):
        return ll.build_local_lip(s, n, normalize, layers=TINY, init=1.0)
    tiny.family = "local_lip"
    ARCHS.register("_ll-tiny")(tiny)
    yield
    DATASETS._entries.pop("_ll-images")
    ARCHS._entries.pop("_ll-tiny")


def test_local_lip_refuses_a_global_architecture():
    from bench.config import ConfigError
    with pytest.raises(ConfigError, match="trains only local_lip"):
        resolve({"method": "local-lip", "arch": "4c3f-k3", "dataset": "cifar10"})


def test_recipe_and_schedule():
    cfg = resolve({"method": "local-lip", "arch": "6c2f", "dataset": "cifar10"})
    assert cfg["arch"] == "6c2f-relux" and ARCHS.get(cfg["arch"]).family == "local_lip"
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["lr_schedule"], cfg["lr_end"], cfg["eps"]) == \
        (800, 256, 1e-3, "exp", 1e-6, 0.1551)
    m = METHODS.get("local-lip")(cfg, 10)
    # 20 warm-up epochs of clean CE, then ε = linspace(0, ε_train, 400)[t − 20] per epoch t
    assert m.bound_eps(19.9 / 800) is None
    assert m.bound_eps(21 / 800) == pytest.approx(0.1551 * 1 / 399)
    assert m.bound_eps(419 / 800) == pytest.approx(0.1551) and m.bound_eps(0.9) == pytest.approx(0.1551)
    from bench.optim import exp_tail_factor
    assert exp_tail_factor(424, 800, 25, 1e-3) == 1.0                    # official lr_exp(…, 424, 800)
    assert exp_tail_factor(425, 800, 25, 1e-3) == pytest.approx(1e-3 ** (1 / 375))
    assert exp_tail_factor(799, 800, 25, 1e-3) == pytest.approx(1e-3 ** (375 / 375))
    tiny = resolve({"method": "local-lip", "arch": "8c2f", "dataset": "tinyimagenet"})
    assert (tiny["arch"], tiny["epochs"], tiny["rampup"], tiny["warmup"], tiny["eps"]) == \
        ("8c2f-relux", 250, 125, 0, 0.16)


def test_short_run_writes_both_certificates_and_passes_the_audit(tmp_path, tiny_plugins):
    from bench import audit, store
    from bench.train import train_run
    cfg = resolve({"method": "local-lip", "arch": "_ll-tiny", "dataset": "_ll-images", "epochs": 3,
                   "protocol_epochs": 6, "batch_size": 32, "lr": 1e-2, "warmup": 1, "rampup": 2,
                   "cert_sniter": 400, "cert_sniter_short": 50, "eval_points_short": 40, "cert_opt_iter": 50,
                   "lower_bound_pairs": 8, "lower_bound_steps": 3, "device": "cpu", "eval_every": 1})
    folder = store.run_dir(tmp_path, {**cfg, "seed": 1})
    result = train_run({**cfg, "seed": 1}, folder)
    saved = json.loads((folder / "result.json").read_text())
    assert result["status"] == saved["status"] == "complete"
    test = saved["eval"]["test"]
    assert test["points"] == 40                                   # the short run's first 40 test points
    assert set(test["cra"]) == set(test["cra_power"]) == {"0.02", "0.05"}
    assert all(test["cra"][k] <= test["cra_power"][k] + 1e-12 for k in test["cra"])   # sound ⊆ published here
    assert saved["K_kind"].startswith("local") and saved["K_f_local"]["max"] >= saved["K_f_local"]["mean"] > 0
    assert saved["K_f_local"]["max"] <= saved["K_f"] * (1 + 1e-9)  # a local bound never exceeds the global one
    assert set(saved["cert_seconds_per_1000"]["test"]) >= {"sound", "power"}
    model = store.load_checkpoint(folder / store.CHECKPOINT)["model"]
    thetas = [v for k, v in model.items() if k.endswith("theta")]
    assert thetas and all(bool((v >= 0).all()) for v in thetas)   # θ projected after every step
    report = audit.audit_run(folder, audit.AuditOptions(points=16, restarts=1, steps=20), write=False)
    assert report["status"] == "pass", report["findings"]
    assert report["attack"]["n_broken"] == 0 and report["attack"]["attacked"] > 0


def test_training_steps_fill_the_per_image_warm_start_store(tiny_plugins):
    """The engine hands each step's training-set rows to the bound: after a step the store holds those images'
    iterates, sized by the run's `warm_start_gb` for its training set (`warm_start_gb: 0`: no store)."""
    from bench.train import EpochTally, build_data, build_model, train_step, training_forward
    from bench.optim import make_optimizer
    for budget in (2.0, 0.0):
        cfg = resolve({"method": "local-lip", "arch": "_ll-tiny", "dataset": "_ll-images", "batch_size": 32,
                       "device": "cpu", "warm_start_gb": budget})
        cfg = {**cfg, "seed": 1}
        data = build_data(cfg)
        model = build_model(cfg, data)
        method = METHODS.get("local-lip")(cfg, data.num_classes)
        opt = make_optimizer(cfg, model)
        idx = torch.tensor([5, 77, 3, 100])
        xb, yb = data.inputs(data.x_train[idx]), data.y_train[idx]
        train_step(model, training_forward(model, cfg, torch.device("cpu")), method, opt, None, xb, yb, 0.9,
                   2, EpochTally(torch.device("cpu")), idx)
        store = model.warm_starts
        if budget == 0.0:
            assert store is None
            continue
        assert store.seen.shape == (128,) and torch.equal(store.seen.nonzero().flatten(), idx.sort().values)
        assert sorted(store.codes) == [0, 1, 2] and bool((store.codes[0][idx] != 0).any(1).all())
