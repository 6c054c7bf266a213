"""Issue 15, part 1: packed runs. A member of a pack trains as the same run alone (up to floating-point
reassociation), stops alone when it diverges, and a pack killed with SIGKILL resumes every member from its own
checkpoint. Real runs on two-moons, real subprocesses and signals."""
import json
import os
import random
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from bench import store
from bench.config import resolve
from bench.launch.local import execute_pack
from bench.loaded_run import load_run
from bench.method import Method
from bench.pack import _loss_group_key, make_packs, pack_key, train_pack
from bench.registry import register_method
from bench.train import train_run
from tests.test_resilience import METRIC_KEYS, RUN_ARGS, bench_proc


def _moons(method="cll", seed=1, **over):
    cfg = resolve({"method": method, "arch": "moons-mlp", "dataset": "moons", "epochs": 20,
                   "lower_bound_pairs": 200, "lower_bound_steps": 30, "eval_tail": None, "threads": 1, **over})
    return {**cfg, "seed": seed}


def _params(folder):
    state = store.load_checkpoint(folder / store.CHECKPOINT)["model"]
    return {k: v for k, v in state.items() if k.endswith(("weight", "bias"))}


def _assert_same_run(packed_folder, alone_folder, packed, alone, rtol=1e-5):
    a, b = _params(packed_folder), _params(alone_folder)
    for k in a:
        rel = float((a[k] - b[k]).abs().max() / b[k].abs().max())
        assert rel <= rtol, (k, rel)
    assert packed["config_hash"] == alone["config_hash"]
    ra, rb = load_run(packed_folder), load_run(alone_folder)
    x, _ = ra.data("test")
    for name, eps in ((k, float(k)) for k in packed["eval"]["test"]["cra"]):
        assert torch.equal(ra.certified(x, eps), rb.certified(x, eps)), name
    assert packed["eval"] == alone["eval"]
    assert packed["K_f"] == pytest.approx(alone["K_f"], rel=rtol)
    assert packed["lower_bound"] == pytest.approx(alone["lower_bound"], rel=max(rtol, 1e-9) * 10)


@pytest.fixture
def train_in(monkeypatch):
    """`train_in(torch.float64)`: networks, iterates and training inputs in that dtype for the rest of the test
    (lipbench trains in float32; float64 shrinks the rounding that packing reassociates to ~1e-16)."""
    from bench.data.base import DataBundle

    default = torch.get_default_dtype()

    def use(dtype):
        inputs = DataBundle.inputs
        monkeypatch.setattr(DataBundle, "inputs", lambda self, x, dt=dtype: inputs(self, x, dt))
        torch.set_default_dtype(dtype)
    yield use
    torch.set_default_dtype(default)


# Two ε and two seeds in one pack, against each run trained alone. A packed member computes what it would alone,
# up to reassociation in the batched products. In float64 that leaves parameters within ~3e-14 of the unpacked
# run's after 20 moons epochs (measured; asserted to 1e-9): the packing itself (seeds, data order, per-member ε,
# iterates, loss groups) is exact. In float32 the same 1-ulp seed (1e-7 to 2e-6 after one epoch, by CPU) can be
# amplified by training itself: where a layer's top two singular values cluster, the warm-started power iterate in
# their plane is ill-conditioned (a 1e-7 weight difference moved it 7e-3), and the loss's gradient through σ
# carries that into the weights. Measured over 20 float32 epochs: GloRo (ε = 0.1, seed 2) from 5.7e-7 to 2.6e-5 at
# epoch 16 with AVX-512 kernels; CLL (ε = 0.1, seed 1) from 3e-7 to 8.9e-5 at epoch 14 with ATen's scalar kernels
# (both within 2.3e-6 elsewhere). So float32 is checked over 2 epochs, before any such event, and the 20 epochs in
# float64.
@pytest.mark.parametrize("method, dtype, epochs, rtol", [
    ("cll", torch.float32, 2, 1e-5), ("gloro", torch.float32, 2, 1e-5),
    ("cll", torch.float64, 20, 1e-9), ("gloro", torch.float64, 20, 1e-9)],
    ids=["cll-float32", "gloro-float32", "cll-float64", "gloro-float64"])
def test_packed_members_train_as_they_would_alone(tmp_path, train_in, method, dtype, epochs, rtol):
    # The two ε share one loss group: ε is a per-member tensor (`Method.member_scalars`), logged as its own value.
    train_in(dtype)
    cfgs = [_moons(method, seed, eps=eps, epochs=epochs) for eps in (0.1, 0.15) for seed in (1, 2)]
    assert len({pack_key(c) for c in cfgs}) == 1
    packed = train_pack(cfgs, [store.run_dir(tmp_path / "pack", c) for c in cfgs])
    for cfg, result in zip(cfgs, packed):
        alone = train_run(cfg, store.run_dir(tmp_path / "alone", cfg))
        assert result["pack"]["members"] == 4
        folder = store.run_dir(tmp_path / "pack", cfg)
        assert all(p.dtype == dtype for p in _params(folder).values())
        _assert_same_run(folder, store.run_dir(tmp_path / "alone", cfg), result, alone, rtol)
        # the trained members' guaranteed layer bounds (batched Gram iteration at their last evaluation) hold
        weights = [w for k, w in _params(folder).items() if k.startswith("features.") and k.endswith("weight")]
        exact = [float(torch.linalg.matrix_norm(w.double(), 2)) for w in weights]
        assert len(exact) == len(result["layer_bounds"]) == 6
        assert all(e <= b <= e * (1 + 1e-9) for e, b in zip(exact, result["layer_bounds"]))
        rows, alone_rows = (store.read_metrics(store.run_dir(tmp_path / d, cfg)) for d in ("pack", "alone"))
        logged = {"cll": "p", "gloro": "eps"}[method]
        assert [r[logged] for r in rows] == [r[logged] for r in alone_rows]


@register_method("test-nan-member")
class _NaNMember(Method):
    """Cross-entropy, made non-finite from step `nan_at` on (None: never): one member of a pack diverges."""
    hparams = {"eps": 0.15, "nan_at": None}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.nan_at = cfg["nan_at"]
        self.calls = 0

    def loss(self, logits, y, bound, progress):
        self.calls += 1
        ce = F.cross_entropy(logits, y)
        return (ce * float("nan") if self.nan_at is not None and self.calls >= self.nan_at else ce), {}


@pytest.mark.parametrize("sync_every", [1, 50])
def test_a_diverging_member_stops_alone(tmp_path, sync_every):
    # sync_every 50 > the 20 steps of a moons epoch: the NaN is found at the epoch's end, before the batched
    # convergence (whose eigh would fail on the member's NaN weights)
    cfgs = [_moons("test-nan-member", 1, nan_at=7, epochs=6, sync_every=sync_every),
            _moons("test-nan-member", 2, epochs=6, sync_every=sync_every),
            _moons("test-nan-member", 3, epochs=6, sync_every=sync_every)]
    outcomes = execute_pack(cfgs, str(tmp_path / "pack"))
    assert [o[0] for o in outcomes] == ["trained"] * 3
    diverged, *healthy = [o[1] for o in outcomes]
    where = "epoch 1, step 7" if sync_every == 1 else "epoch 1"
    assert diverged["status"] == "diverged" and f"non-finite loss at {where}" in diverged["reason"]
    assert [r["status"] for r in healthy] == ["complete", "complete"]
    # the healthy members are the runs they would be alone: the NaN never reached them
    for cfg, result in zip(cfgs[1:], healthy):
        alone = train_run(cfg, store.run_dir(tmp_path / "alone", cfg))
        _assert_same_run(store.run_dir(tmp_path / "pack", cfg), store.run_dir(tmp_path / "alone", cfg), result, alone)


def test_a_pack_whose_members_all_diverge_records_them(tmp_path):
    cfgs = [_moons("test-nan-member", s, nan_at=3, epochs=4) for s in (1, 2)]
    outcomes = execute_pack(cfgs, str(tmp_path))
    assert [(o[0], o[1]["status"]) for o in outcomes] == [("trained", "diverged")] * 2


def test_packs_group_by_everything_but_seeds_and_hyperparameters():
    cfgs = [_moons("cll", s, eps=e) for e in (0.1, 0.2) for s in (1, 2, 3)] + [_moons("gloro", 1)]
    cfgs.append(_moons("cll", 1, lr=1e-2))          # another optimizer setting: its own pack
    cfgs.append(_moons("cll", 2, budget="10s"))     # a budgeted run plans its own epochs: alone
    soc = resolve({"method": "soc", "arch": "lipconv-10", "dataset": "cifar10"})
    cfgs += [{**soc, "seed": 1}, {**soc, "seed": 2}]  # a layer family: never stacked, one task per run
    packs = make_packs(cfgs, limit=16, workers=1)
    assert sorted(len(p) for p in packs) == [1, 1, 1, 1, 1, 6]
    assert sorted(len(p) for p in make_packs(cfgs[:6], limit=4, workers=1)) == [3, 3]
    assert sorted(len(p) for p in make_packs(cfgs[:6], limit=16, workers=3)) == [2, 2, 2]
    assert [len(p) for p in make_packs(cfgs[:6], limit=1, workers=1)] == [1] * 6
    # within a pack, one loss group per configuration of what the loss branches on: ε and δ are per-member
    # tensors (CLL, GloRo's fixed ε); a scheduled ε, λ or the offset's side are each their own group
    key = _loss_group_key
    assert key(_moons("cll", 1, eps=0.1)) == key(_moons("cll", 2, eps=0.2, delta=0.3))
    assert key(_moons("cll", 1, lam=0.0)) != key(_moons("cll", 1)) != key(_moons("cll", 1, one_sided=False))
    assert key(_moons("gloro", 1, eps=0.1)) == key(_moons("gloro", 1, eps=0.2))
    assert key(_moons("gloro", 1, eps=0.1, eps_schedule="poly")) != key(_moons("gloro", 1, eps=0.2, eps_schedule="poly"))


def test_sigkill_of_a_pack_resumes_every_member(tmp_path):
    args = RUN_ARGS + ["--seeds", "3"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = bench_proc(args + ["--results", str(ref)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    rng = random.Random()
    kill_after = rng.randint(2, 55)
    proc = bench_proc(args + ["--results", str(killed)])
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = list(killed.rglob("metrics.csv"))
        if len(metrics) == 3 and min(len(store.read_metrics(m.parent)) for m in metrics) >= kill_after:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    folders = sorted(p.parent for p in killed.rglob("config.yaml"))
    assert len(folders) == 3 and not any((f / store.RESULT).exists() for f in folders), "killed before the end"
    proc = bench_proc(args + ["--results", str(killed)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for folder in folders:
        a = json.loads((ref / folder.relative_to(killed) / store.RESULT).read_text())
        b = json.loads((folder / store.RESULT).read_text())
        assert a["pack"]["members"] == b["pack"]["members"] == 3
        for key in METRIC_KEYS:
            assert a[key] == b[key], key
        assert a["resumed_at_epochs"] == [] and len(b["resumed_at_epochs"]) == 1
        assert b["resumed_at_epochs"][0] % 3 == 0


class _Killed(BaseException):
    """SIGKILL's stand-in: nothing in the pack catches it."""


def test_a_pack_killed_between_two_members_checkpoints_resumes_as_one_pack(tmp_path, monkeypatch):
    # the race a SIGKILL hits at random: member 0 has written its epoch-6 checkpoint, the others still hold
    # epoch 3's. The member ahead rolls back to its previous checkpoint and all three resume as one pack, bit for bit.
    cfgs = [_moons("cll", s, epochs=9, checkpoint_every=3, eval_every=3) for s in (1, 2, 3)]
    ref = train_pack(cfgs, [store.run_dir(tmp_path / "ref", c) for c in cfgs])
    folders = [store.run_dir(tmp_path / "killed", c) for c in cfgs]
    save, writes = store.save_checkpoint, []

    def save_then_die(folder, state, keep_previous=False):
        if state["epoch"] == 6 and writes:
            raise _Killed
        save(folder, state, keep_previous)
        writes.extend([folder] if state["epoch"] == 6 else [])

    monkeypatch.setattr(store, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_pack(cfgs, folders)
    monkeypatch.setattr(store, "save_checkpoint", save)
    assert sorted(store.checkpoint_epoch(f) for f in folders) == [3, 3, 6]
    resumed = train_pack(cfgs, folders)
    for a, b, folder in zip(ref, resumed, folders):
        assert b["pack"]["members"] == 3 and b["resumed_at_epochs"] == [3]
        for key in METRIC_KEYS:
            assert a[key] == b[key], key
        assert [r["loss"] for r in store.read_metrics(folder)] == \
            [r["loss"] for r in store.read_metrics(store.run_dir(tmp_path / "ref", cfgs[folders.index(folder)]))]
        assert not (folder / store.PREVIOUS_CHECKPOINT).exists()


def test_a_compiled_pack_trains_as_its_members_would_alone(tmp_path):
    # `pack_compile: true`: the step after the first is one inductor graph with the progress as a tensor input
    # (CLL's p schedule changes at every step and must not recompile it). Compiled kernels reassociate too:
    # the members stay the runs they would be alone, eager and unpacked, to 1e-5.
    cfgs = [_moons("cll", seed, eps=eps, epochs=5, pack_compile=True) for eps in (0.1, 0.15) for seed in (1, 2)]
    folders = [store.run_dir(tmp_path / "pack", c) for c in cfgs]
    packed = train_pack(cfgs, folders)
    for cfg, folder, result in zip(cfgs, folders, packed):
        alone = train_run(cfg, store.run_dir(tmp_path / "alone", cfg))
        _assert_same_run(folder, store.run_dir(tmp_path / "alone", cfg), result, alone)
        rows = store.read_metrics(folder)
        alone_rows = store.read_metrics(store.run_dir(tmp_path / "alone", cfg))
        assert [float(r["p"]) for r in rows] == pytest.approx([float(r["p"]) for r in alone_rows], rel=1e-12)


def test_pack_compile_is_checked_and_leaves_the_hash_alone():
    assert store.config_hash(_moons(pack_compile=True)) == store.config_hash(_moons())
    with pytest.raises(ValueError, match="pack_compile must be auto, true or false"):
        _moons(pack_compile="yes")


def test_a_pack_whose_step_cannot_compile_trains_eagerly(tmp_path, monkeypatch, capsys):
    # a machine without a C++ compiler (inductor's CPU backend needs one): one line on stderr, the eager step
    def no_compiler(fn, *args, **kwargs):
        def failing(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore")
        return failing

    monkeypatch.setattr(torch, "compile", no_compiler)
    cfgs = [_moons("cll", s, epochs=2, pack_compile=True) for s in (1, 2)]
    results = train_pack(cfgs, [store.run_dir(tmp_path, c) for c in cfgs])
    assert [r["status"] for r in results] == ["complete", "complete"]
    err = capsys.readouterr().err
    assert "did not compile (RuntimeError: InductorError: no working C++ compiler found); it trains eagerly" in err


def test_a_compiled_step_that_fails_at_run_time_leaves_the_pack_as_an_eager_one(tmp_path, monkeypatch, capsys):
    # a kernel that fails after it ran part of the graph (inductor's bounds check, an op that raises on these
    # inputs): the iterates it advanced in place are put back, so the eager step the pack falls back to is the
    # step an eager pack takes, bit for bit
    def fails_after_running(fn, *args, **kwargs):
        def failing(*a, **k):
            fn(*a, **k)
            raise RuntimeError("kernel, main.cpp:2325, index out of bounds: 0 <= tmp6 < 2L")
        return failing

    cfgs = [_moons("cll", s, epochs=2, pack_compile=False) for s in (1, 2)]
    eager = train_pack(cfgs, [store.run_dir(tmp_path / "eager", c) for c in cfgs])
    monkeypatch.setattr(torch, "compile", fails_after_running)
    cfgs = [{**c, "pack_compile": True} for c in cfgs]
    fallen = train_pack(cfgs, [store.run_dir(tmp_path / "fallen", c) for c in cfgs])
    assert "did not compile (RuntimeError: kernel, main.cpp:2325, index out of bounds" in capsys.readouterr().err
    for cfg, a, b in zip(cfgs, eager, fallen):
        pa, pb = (store.load_checkpoint(store.run_dir(tmp_path / d, cfg) / store.CHECKPOINT)["model"]
                  for d in ("eager", "fallen"))
        assert pa.keys() == pb.keys()
        assert not [k for k in pa if not torch.allclose(pa[k], pb[k], rtol=0, atol=0, equal_nan=True)]
        assert a["eval"] == b["eval"] and a["K_f"] == b["K_f"]
