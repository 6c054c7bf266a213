"""End to end on two-moons: a real training run, its folder, load_run, certificates against PGD."""
import json

import numpy as np
import pytest
import torch

from bench import load_run, store
from bench.certify import l2_pgd
from bench.config import resolve
from bench.data.moons import NOISE_RADIUS
from bench.registry import DATASETS
from bench.optim import lr_milestones
from bench.train import train_run


@pytest.fixture(scope="session")
def moons_run(tmp_path_factory):
    """A CLL model trained for 150 epochs at ε = 0.15 (a few seconds on one core)."""
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "dataset": "moons", "eps": 0.15, "epochs": 150,
                   "lower_bound_pairs": 500, "lower_bound_steps": 100})
    cfg["seed"] = 1
    folder = store.run_dir(tmp_path_factory.mktemp("results"), cfg)
    torch.set_num_threads(1)
    train_run(cfg, folder)
    return folder


def test_run_folder_layout_and_result_keys(moons_run):
    assert moons_run.name == "seed-1"
    assert moons_run.parts[-5:-1][:3] == ("moons", "cll", "moons-mlp")
    for name in ("config.yaml", "metrics.csv", "checkpoint.pt", "result.json"):
        assert (moons_run / name).exists(), name
    result = json.loads((moons_run / "result.json").read_text())
    for key in ("method", "arch", "dataset", "seed", "config_hash", "status", "epochs", "K_f", "K_hf",
                "lower_bound", "tightness", "train_seconds", "device", "torch", "commit"):
        assert key in result
    assert result["status"] == "complete"
    assert set(result["eval"]) >= {"train", "test"}
    assert set(result["eval"]["test"]["cra"]) == {"0.15"}
    assert 0.0 <= result["eval"]["test"]["cra"]["0.15"] <= result["eval"]["test"]["clean"] <= 1.0
    assert 0.0 < result["lower_bound"] <= result["K_f"]  # an empirical lower bound never exceeds the bound
    assert result["tightness"] == pytest.approx(result["lower_bound"] / result["K_f"])
    rows = store.read_metrics(moons_run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 151))


def test_load_run_certificates_survive_pgd(moons_run):
    """No certified point is broken by an L2 PGD attack at its ε (5 restarts, 100 steps)."""
    run = load_run(moons_run)
    assert not run.model.training
    x, y = run.data("train")
    xt, yt = run.data("test")
    x, y = torch.cat([x, xt[:3000]]), torch.cat([y, yt[:3000]])
    eps = 0.15
    cert = run.certified(x, eps) & (run.logits(x).argmax(1) == y)
    assert cert.float().mean() > 0.5  # a meaningful number of certified points to attack
    broken = l2_pgd(run.model, x, y, eps, steps=100, restarts=5, generator=torch.Generator().manual_seed(0))
    assert not (broken & cert).any()
    # and the attack is real: at a radius far beyond the margin it breaks points
    assert l2_pgd(run.model, x[:500], y[:500], 1.0, steps=50, restarts=1).any()


def test_load_run_reproduces_reported_accuracy(moons_run):
    run = load_run(moons_run)
    x, y = run.data("test")
    clean = (run.logits(x).argmax(1) == y).double().mean().item()
    cra = (run.certified(x, 0.15) & (run.logits(x).argmax(1) == y)).double().mean().item()
    assert clean == pytest.approx(run.result["eval"]["test"]["clean"])
    assert cra == pytest.approx(run.result["eval"]["test"]["cra"]["0.15"])


def test_moons_data_is_seeded_and_has_the_true_margin():
    load = DATASETS.get("moons")
    a, b, c = load({}, seed=3), load({}, seed=3), load({}, seed=4)
    assert len(a.y_train) == 2000 and len(a.y_test) == 20000
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    x, y = a.x_train.double(), a.y_train
    d = torch.cdist(x[y == 0], x[y == 1])
    assert d.min() >= 0.3 - 1e-6  # arcs 0.5 apart, noise radius 0.1 on each side
    # noise stays in the disk: distance to the noiseless arc ≤ 0.1
    r0 = torch.linalg.vector_norm(x[y == 0], dim=1)
    assert ((r0 - 1).abs() <= NOISE_RADIUS + 1e-6).all()
    assert np.isclose(NOISE_RADIUS, 0.1)


def test_lr_milestones_scale_with_shorter_runs():
    cfg = {"epochs": 50, "protocol_epochs": 800, "lr_milestones": [400, 600, 780]}
    assert lr_milestones(cfg, steps_per_epoch=10) == [250, 380, 490]
    cfg = {"epochs": 1000, "protocol_epochs": 1000, "lr_milestones": [400]}
    assert lr_milestones(cfg, steps_per_epoch=20) == [8000]


def test_training_is_deterministic_on_cpu(tmp_path):
    cfg = resolve({"method": "gloro", "arch": "moons-mlp", "dataset": "moons", "epochs": 3,
                   "lower_bound_pairs": 50, "lower_bound_steps": 5, "n_train": 400, "n_test": 400})
    cfg["seed"] = 2
    a = train_run(cfg, tmp_path / "a")
    b = train_run(cfg, tmp_path / "b")
    for key in ("K_f", "K_hf", "lower_bound", "eval"):
        assert a[key] == b[key]


def test_last_epoch_is_evaluated_once(tmp_path, monkeypatch):
    """The final evaluation fills the last metrics row and result.json: one certified pass per split, not two."""
    import bench.train as train_module
    calls = []
    real = train_module.evaluate

    def counting(model, method, data, cfg, splits=("test", "train")):
        calls.append(tuple(splits))
        return real(model, method, data, cfg, splits)
    monkeypatch.setattr(train_module, "evaluate", counting)
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "dataset": "moons", "epochs": 4, "eval_every": 2,
                   "eval_tail": None,
                   "n_train": 200, "n_test": 400, "lower_bound_pairs": 4, "lower_bound_steps": 2, "device": "cpu"})
    result = train_run({**cfg, "seed": 1}, tmp_path)
    assert calls == [("test",), ("test", "train")]
    rows = store.read_metrics(tmp_path)
    assert float(rows[-1]["test_clean"]) == result["eval"]["test"]["clean"]


def test_schedules_and_reach_then_hold():
    from bench.schedules import make_schedule
    poly = make_schedule({"schedule": "poly", "start": 0.01, "end": 1.0, "power": 10})
    assert poly(0.0) == pytest.approx(0.01) and poly(1.0) == 1.0 and poly(0.5) == pytest.approx(1 - 0.99 / 1024)
    log = make_schedule({"schedule": "log", "start": 0.0, "end": 0.15})
    assert log(0.0) == 0.0 and log(1.0) == pytest.approx(0.15) and log(0.5) > 0.075   # concave
    half = make_schedule({"schedule": "log_half", "start": 0.0, "end": 0.15})
    assert half(0.5) == pytest.approx(0.15) and half(0.25) == pytest.approx(log(0.5))
    # Table B4's TRADES factor: linear 0.5 → 20, reached at epoch 400 of 800, then held
    trades = make_schedule({"schedule": "linear", "start": 0.5, "end": 20.0, "until": 0.5})
    assert [trades(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.5, 10.25, 20.0, 20.0, 20.0]
    assert make_schedule(3)(0.7) == 3.0
    for bad in ({"schedule": "cosine"}, {"schedule": "linear", "start": 0, "end": 1, "until": 0},
                {"schedule": "linear", "start": 0, "end": 1, "until": "half"}, {"schedule": "linear", "start": 0}):
        with pytest.raises(ValueError):
            make_schedule(bad)
