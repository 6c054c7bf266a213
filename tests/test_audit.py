"""`bench audit`: a clean run passes; a tampered checkpoint and an under-stated bound are caught."""
import json
import shutil

import pytest
import torch
import torch.nn as nn

from bench import audit, load_run, store
from bench.cli import main
from bench.config import resolve
from bench.train import train_run

ATTACK = ["--points", "200", "--restarts", "2", "--steps", "30"]


@pytest.fixture(scope="module")
def moons_results(tmp_path_factory):
    """A CLL moons run trained for 30 epochs (a few seconds on one core), 4,000 held-out points."""
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "dataset": "moons", "eps": 0.15, "epochs": 30,
                   "n_test": 4000, "lower_bound_pairs": 100, "lower_bound_steps": 20})
    cfg["seed"] = 1
    root = tmp_path_factory.mktemp("audit-results")
    folder = store.run_dir(root, cfg)
    torch.set_num_threads(1)
    train_run(cfg, folder)
    return root, folder


@pytest.fixture
def run_copy(moons_results, tmp_path):
    """A private copy of the results folder (tests write audit.json and edit checkpoints)."""
    root, folder = moons_results
    dst = tmp_path / "results"
    shutil.copytree(root, dst)
    return dst, dst / folder.relative_to(root)


def test_clean_run_passes(run_copy, capsys):
    root, folder = run_copy
    code = main(["audit", str(root), *ATTACK])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    report = json.loads((folder / audit.AUDIT).read_text())
    assert report["status"] == "pass" and report["findings"] == []
    assert report["checkpoint"]["match"] is True
    assert report["disagreements"] == 0
    test = report["recertify"]["splits"]["test"]
    assert test["n"] == 4000 and test["clean"]["agree"] and test["cra"]["0.15"]["agree"]
    assert test["cra_power"]["0.15"]["agree"]
    assert "train" in report["recertify"]["splits"]               # moons: the train split is cheap
    attack = report["attack"]
    assert attack["attacked"] == 200 and attack["n_broken"] == 0
    assert attack["certified_correct"] > 200
    assert attack["margin_ratio_min"] < 1.0                       # the attack moved the margins
    layers = report["layers_summary"]
    assert layers["bounded"] == layers["checked_exactly"] == 6
    assert layers["max_exact_over_bound"] <= 1.0 + 1e-12
    for row in report["layers"]:
        assert row["exact"] <= row["norm_upper"] * (1 + 1e-12)
        assert row["bound_recorded"] == pytest.approx(row["bound"], rel=1e-12)
    assert "pass" in out
    assert not list(folder.glob(".audit.json.*"))                 # written atomically, no temporary left


def test_tampered_checkpoint_is_reported(run_copy, capsys):
    root, folder = run_copy
    ckpt = folder / store.CHECKPOINT
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    w = state["model"]["features.0.weight"]
    w.view(-1)[w.abs().argmax()] *= 10.0                          # one weight, behind result.json's back
    torch.save(state, ckpt)
    code = main(["audit", str(folder), *ATTACK])
    err = capsys.readouterr().err
    assert code == 1
    report = json.loads((folder / audit.AUDIT).read_text())
    kinds = {f["kind"] for f in report["findings"]}
    assert {"checkpoint", "disagreement", "stored_bound_below"} <= kinds
    assert report["checkpoint"]["match"] is False and report["disagreements"] > 0
    assert report["status"] == "fail"
    assert "sha256" in err and "cra@0.15" in err and str(folder) in err


def _halve_first_layer(monkeypatch):
    """Patch the audit's loader: the first layer's guaranteed bound is reported at half its value."""
    load = audit.load_model

    def load_understated(*args, **kwargs):
        model = load(*args, **kwargs)
        layer = model._layers[0]
        honest = layer.certified_bound
        layer.certified_bound = lambda: honest() * 0.5
        return model

    monkeypatch.setattr(audit, "load_model", load_understated)


def test_understated_bound_is_broken_by_the_attack(run_copy, monkeypatch, capsys):
    root, folder = run_copy
    _halve_first_layer(monkeypatch)
    code = main(["audit", str(folder), *ATTACK])
    err = capsys.readouterr().err
    assert code == 1
    report = json.loads((folder / audit.AUDIT).read_text())
    broken = report["attack"]["broken"]
    assert report["attack"]["n_broken"] == len(broken) > 0
    for b in broken:  # each one re-checked in float64: inside the certified ball, and misclassified
        assert b["distance"] <= b["radius"] and b["margin"] < 0 < b["margin_at_x"]
        assert b["predicted_at_x_prime"] != b["label"]
    first = broken[0]
    assert f"test point {first['index']}" in err and f"{first['radius']:.6g}" in err
    # deterministic: the same points break again
    again = audit.audit_run(folder, audit.AuditOptions(points=200, restarts=2, steps=30), write=False)
    assert [b["index"] for b in again["attack"]["broken"]] == [b["index"] for b in broken]
    # the checkpoint itself is untouched: only the certificate claims moved
    assert report["checkpoint"]["match"] is True


def test_pgd_stays_in_the_ball_and_the_domain(moons_results):
    """Iterates live in float64, projected onto each row's ball and clamped to the data domain."""
    _, folder = moons_results
    run = load_run(folder)
    x, y = run.data("test")
    x64 = x[:64].double().clamp(-0.5, 0.5)
    radius = torch.full((64,), 0.5, dtype=torch.float64)
    target = 1 - y[:64]
    found, _ = audit.margin_pgd(run.model, x64, y[:64], target, radius, steps=20, restarts=2,
                                domain=(-0.5, 0.5), generator=torch.Generator().manual_seed(0))
    dist = torch.linalg.vector_norm(found - x64, dim=1)
    assert found.dtype == torch.float64 and (dist <= 0.5).all() and (dist > 0).any()
    assert ((found >= -0.5) & (found <= 0.5)).all()


def test_suite_file_and_bad_input(run_copy, tmp_path, capsys):
    root, folder = run_copy
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\nseeds: 1\ndefaults: {method: cll, arch: moons-mlp, dataset: moons, eps: 0.15, "
                     "n_test: 4000, lower_bound_pairs: 100, lower_bound_steps: 20}\n")
    code = main(["audit", str(suite), "--results", str(root), "--points", "20", "--restarts", "1", "--steps",
                 "5", "--no-train"])
    assert code == 0
    report = json.loads((folder / audit.AUDIT).read_text())
    assert "train" not in report["recertify"]["splits"] and report["attack"]["attacked"] == 20
    capsys.readouterr()
    for args in (["audit", "no-such-suite"], ["audit", str(tmp_path / "nowhere") + "/"]):
        code = main(args + ["--results", str(root)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("bench: error:")


def test_layers_of_every_family_are_checked_exactly():
    """SOC, CPL and strided conv layers: exact norms from their operators, below the guaranteed bounds."""
    from bench.nn.families.cpl import ConvexPotentialConv, ConvexPotentialLinear, CPLNet
    from bench.nn.families.soc import MaxMinHalves, SkewOrthogonalConv, SOCHead

    from bench.nn.bound import LipschitzNet
    from bench.nn.families.common import Truncate
    from bench.nn.lipschitz import LipConv2d, LipLinear, MaxMin

    torch.manual_seed(0)
    nets = {
        "soc": LipschitzNet(nn.Sequential(SkewOrthogonalConv(4, 8, 3, stride=2), MaxMinHalves(),
                                          SkewOrthogonalConv(8, 8, 3)), SOCHead(8 * 4 * 4, 3), (4, 8, 8), 3,
                            last_layer_one_lipschitz=True),
        "cpl": CPLNet(nn.Sequential(ConvexPotentialConv(4, 5), nn.Flatten(), ConvexPotentialLinear(4 * 8 * 8, 32)),
                      Truncate(3), (4, 8, 8), 3, last_layer_one_lipschitz=True),
        "plain": LipschitzNet(nn.Sequential(LipConv2d(3, 8, 4, stride=2, padding=1), MaxMin(), nn.Flatten(),
                                            LipLinear(8 * 4 * 4, 16), MaxMin()), LipLinear(16, 3), (3, 8, 8), 3),
    }
    for name, net in nets.items():
        net.eval()
        net.converge()
        rows, findings = audit.check_layers(net, {}, 2e7)
        assert findings == [], name
        exact = [r for r in rows if r["checked_exactly"]]
        assert len(exact) == sum(hasattr(r, "operator") for r in audit.bounded_layers(net)), name
        for r in exact:
            assert r["exact"] <= r["norm_upper"] * (1 + 1e-12), (name, r)
            assert r["norm_power"] <= r["exact"] * (1 + 1e-9), (name, r)
        for layer in audit.bounded_layers(net):  # the chunked impulse matrix is the whole one
            if hasattr(layer, "operator"):
                w64 = layer.weight.detach().double()
                shape = layer.operator_input_shape
                whole = audit.operator_matrix(layer, w64, shape)
                assert torch.equal(audit.operator_matrix(layer, w64, shape, chunk_values=3000), whole)
        # a stored bound below the recomputed one is a finding; a too-small size limit skips the exact check
        stored = [0.5 * float(layer.certified_bound()) for layer in net._layers]
        _, findings = audit.check_layers(net, {"layer_bounds": stored}, 10)
        assert [f.kind for f in findings] == ["stored_bound_below"] * len(stored)


def test_progress_lines_are_throttled():
    """Long re-certifications report progress: nothing within the first 30 s of a step, then at most one line per
    30 s, with the points done, the time so far and an estimate of the time left."""
    import io
    now = [0.0]
    out = io.StringIO()
    report = audit.ProgressReport(out, "bench audit: soc lipconv-10", clock=lambda: now[0])
    for done in range(170, 10_001, 170):          # one batch of 170 images every 10 s
        now[0] += 10.0
        report("float64 re-certification of test", min(done, 10_000), 10_000)
    lines = out.getvalue().splitlines()
    assert 15 <= len(lines) <= 21                  # ~590 s of batches, one line per 30 s
    assert lines[0].startswith("bench audit: soc lipconv-10: float64 re-certification of test: 680/10,000 points")
    assert "30 s so far" in lines[0] and "left" in lines[0]
