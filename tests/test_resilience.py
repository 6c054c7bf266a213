"""Runs that survive: kill and resume, idempotence, the divergence watchdog, locks between launches, status,
Slurm through submitit's local executor, and refusal of corrupt or unsafe files. Real subprocesses, real
signals, real files."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
import torch.nn.functional as F

from bench import store
from bench.config import load_suite, resolve, suite_runs
from bench.launch.local import execute
from bench.launch.slurm import RunTask, submit
from bench.method import Method
from bench.registry import METHODS, register_method

REPO = Path(__file__).resolve().parent.parent
METRIC_KEYS = ("eval", "K_f", "K_up", "K_hf", "layer_bounds", "lower_bound", "tightness", "params")
RUN_ARGS = ["run", "--method", "cll", "--arch", "moons-mlp", "--dataset", "moons", "--epochs", "60", "--quiet",
            "--set", "n_train=500", "--set", "n_test=1000", "--set", "lower_bound_pairs=200",
            "--set", "lower_bound_steps=50", "--set", "threads=1", "--set", "eval_every=7",
            "--set", "checkpoint_every=3"]


def bench_proc(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def only_run(results: Path) -> Path:
    (folder,) = [p.parent for p in results.rglob("config.yaml") if not p.parent.name.startswith("_")]
    return folder


def test_sigkill_then_resume_gives_identical_results(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = bench_proc(RUN_ARGS + ["--results", str(ref)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    rng = random.Random()
    kill_after = rng.randint(2, 55)
    proc = bench_proc(RUN_ARGS + ["--results", str(killed)])
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = list(killed.rglob("metrics.csv"))
        if metrics and len(store.read_metrics(metrics[0].parent)) >= kill_after:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))  # land anywhere between two checkpoints
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    folder = only_run(killed)
    epochs_done = len(store.read_metrics(folder))
    assert not (folder / store.RESULT).exists(), "killed before the end"
    assert store.run_state(folder)[0] == "partial"
    proc = bench_proc(RUN_ARGS + ["--results", str(killed)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    a = json.loads((only_run(ref) / store.RESULT).read_text())
    b = json.loads((folder / store.RESULT).read_text())
    print(f"\nkilled with SIGKILL after ≥{kill_after} epochs (metrics.csv had {epochs_done} rows), "
          f"resumed at epoch(s) {b['resumed_at_epochs']}")
    for key in METRIC_KEYS:
        assert a[key] == b[key], key
        print(f"  {key}: uninterrupted {a[key]!r} == resumed {b[key]!r}")
    assert a["resumed_at_epochs"] == [] and len(b["resumed_at_epochs"]) == 1
    assert b["resumed_at_epochs"][0] % 3 == 0  # from the last checkpoint
    drop = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert drop(store.read_metrics(only_run(ref))) == drop(store.read_metrics(folder))


@register_method("test-nan-at-step-7")
class _NaNAtStep7(Method):
    hparams = {"eps": 0.15}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.calls = 0

    def loss(self, logits, y, bound, progress):
        self.calls += 1
        ce = F.cross_entropy(logits, y)
        return (ce * float("nan") if self.calls >= 7 else ce), {}


@register_method("test-random-labels")
class _RandomLabels(Method):
    """Cross-entropy against labels drawn anew every step: accuracy stays at chance."""
    hparams = {"eps": 0.15}

    def loss(self, logits, y, bound, progress):
        return F.cross_entropy(logits, torch.randint(0, self.num_classes, y.shape)), {}


def _tiny(method, **over):
    cfg = resolve({"method": method, "arch": "moons-mlp", "dataset": "moons", "epochs": 30, "n_train": 400,
                   "n_test": 400, "lower_bound_pairs": 20, "lower_bound_steps": 2, **over})
    return {**cfg, "seed": 1}


def test_metrics_csv_written_in_steps_equals_one_write_of_all_rows(tmp_path):
    # `MetricsText` appends the rows added since the last write; a new column or a resume renders all of them
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    text = store.MetricsText()

    def check(rows):
        store.write_metrics(tmp_path / "steps", rows, text)
        store.write_metrics(tmp_path / "once", rows)
        assert (tmp_path / "steps" / store.METRICS).read_text() == (tmp_path / "once" / store.METRICS).read_text()
        assert [int(r["epoch"]) for r in store.read_metrics(tmp_path / "steps")] == [r["epoch"] for r in rows]

    (tmp_path / "steps").mkdir(), (tmp_path / "once").mkdir()
    check(rows)
    rows.append({"epoch": 3, "loss": 0.125})
    check(rows)
    rows.append({"epoch": 4, "loss": 0.1, "test_clean": 0.9, "test_cra@0.1": 0.8})   # new columns
    check(rows)
    assert store.read_metrics(tmp_path / "steps")[0]["test_clean"] == ""
    rows.append({"epoch": 5, "loss": 1 / 3})
    check(rows)
    del rows[3:]                                                                     # a resume drops rows
    check(rows)


def test_nan_loss_stops_the_run_as_diverged(tmp_path):
    _, result = execute(_tiny("test-nan-at-step-7", sync_every=1), str(tmp_path))
    assert result["status"] == "diverged" and "non-finite loss" in result["reason"]
    folder = only_run(tmp_path)
    assert store.read_result(folder)["status"] == "diverged"
    assert store.run_state(folder)[0] == "diverged"


def test_accuracy_stuck_at_chance_stops_the_run(tmp_path):
    _, result = execute(_tiny("test-random-labels", chance_patience=3, chance_margin=0.2,
                                 chance_min_steps=12, chance_min_fraction=0.0, lr=1e-2), str(tmp_path))
    assert result["status"] == "diverged" and "chance" in result["reason"]
    rows = store.read_metrics(only_run(tmp_path))
    assert len(rows) < 30 and all(float(r["train_acc"]) <= 0.6 for r in rows[-3:])


def test_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    cfg = _tiny("cll", epochs=2)
    folder = store.run_dir(tmp_path, cfg)
    folder.mkdir(parents=True)
    torch.save({"model": {}, "evil": store.RunLock(folder)}, folder / store.CHECKPOINT)  # an arbitrary object
    with pytest.raises(store.CorruptRunError, match="refused or unreadable checkpoint"):
        store.load_checkpoint(folder / store.CHECKPOINT)
    proc = bench_proc(["run", "--method", "cll", "--arch", "moons-mlp", "--epochs", "2", "--results", str(tmp_path),
                       "--set", "n_train=400", "--set", "n_test=400", "--set", "lower_bound_pairs=20",
                       "--set", "lower_bound_steps=2", "--quiet"])
    assert proc.wait(timeout=120) == 2
    err = proc.stderr.read().strip()
    assert len(err.splitlines()) == 1 and "refused or unreadable checkpoint" in err


def test_unsafe_yaml_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: evil\ndefaults: !!python/object/apply:os.system ['touch pwned']\n")
    proc = bench_proc(["suite", str(evil), "--results", str(tmp_path / "r")])
    assert proc.wait(timeout=60) == 2 and "malformed YAML" in proc.stderr.read()
    assert not (REPO / "pwned").exists() and not (tmp_path / "pwned").exists()


def _finished_run(tmp_path, seed=1):
    cfg = {**_tiny("gloro", epochs=2), "seed": seed}
    execute(cfg, str(tmp_path))
    return store.run_dir(tmp_path, cfg)


@pytest.mark.parametrize("damage", ["truncate", "edit_result", "edit_config", "garbage"])
def test_corrupt_run_folders_are_reported_not_aggregated(tmp_path, damage):
    folder = _finished_run(tmp_path)
    path = folder / store.RESULT
    if damage == "truncate":
        path.write_text(path.read_text()[:200])
    elif damage == "edit_result":
        result = json.loads(path.read_text())
        result["eval"]["test"]["clean"] = 0.99
        path.write_text(json.dumps(result))
    elif damage == "edit_config":
        cfg = (folder / store.CONFIG).read_text().replace("lr: 0.001", "lr: 0.002")
        (folder / store.CONFIG).write_text(cfg)
    else:
        (folder / store.CONFIG).write_bytes(b"\x00\xff{{{")
    assert store.run_state(folder)[0] == "corrupt"
    with pytest.raises(store.CorruptRunError):
        store.read_result(folder)
    proc = bench_proc(["table", str(tmp_path)])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "corrupt run skipped" in out and "| gloro |" not in out


SUITE = """name: tiny
seeds: 2
defaults: {{dataset: moons, arch: moons-mlp, epochs: {epochs}, n_train: 400, n_test: 400,
            lower_bound_pairs: 50, lower_bound_steps: 5, threads: 1}}
grid:
  method: [cll, gloro]
"""


def test_two_launches_of_one_suite_never_train_a_run_twice(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE.format(epochs=15))
    results = tmp_path / "results"
    procs = [bench_proc(["suite", str(suite), "--results", str(results), "--quiet"]) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    trained = [int(o[0].split("trained ")[1].split(" runs")[0]) for o in outs]
    assert sum(trained) == 4, outs  # every run trained exactly once, by one of the two
    for folder in store.find_runs(results):
        result = store.read_result(folder)
        assert result["status"] == "complete" and result["resumed_at_epochs"] == [], result.get("reason")
        assert len(store.read_metrics(folder)) == 15


def test_status_of_a_partly_finished_suite(tmp_path):
    suite_path = tmp_path / "tiny.yaml"
    suite_path.write_text(SUITE.format(epochs=3))
    cfgs = suite_runs(load_suite(str(suite_path)))
    results = tmp_path / "results"
    execute(cfgs[0], str(results))                      # complete
    execute(cfgs[1], str(results))
    (store.run_dir(results, cfgs[1]) / store.CHECKPOINT).rename(store.run_dir(results, cfgs[1]) / "x")
    (store.run_dir(results, cfgs[1]) / store.RESULT).unlink()
    (store.run_dir(results, cfgs[1]) / "x").rename(store.run_dir(results, cfgs[1]) / store.CHECKPOINT)  # partial
    store.write_diverged(store.run_dir(results, cfgs[2]), cfgs[2], "non-finite loss at epoch 2")
    lock = store.RunLock(store.run_dir(results, cfgs[3]))  # another process is training this one
    assert lock.acquire()
    try:
        proc = bench_proc(["status", str(suite_path), "--results", str(results)], env={**os.environ,
                                                                                     "COLUMNS": "160"})
        out = proc.communicate(timeout=120)[0]
    finally:
        lock.release()
    print(out)
    total = [line for line in out.splitlines() if "total" in line][0]
    assert [int(x) for x in total.split("│")[2:8]] == [1, 1, 1, 1, 0, 0]


def test_slurm_dry_run_prints_the_array_and_submits_nothing(tmp_path):
    proc = bench_proc(["suite", "moons", "--launcher", "slurm", "--partition", "gpu", "--time", "6:00:00",
                       "--max-parallel", "16", "--dry-run", "--results", str(tmp_path)])
    out, err = proc.communicate(timeout=120)
    print(out)
    assert proc.returncode == 0, err
    # 24 runs in two packs (CLL's and GloRo's: seeds and ε vary inside a pack), one array task each
    assert "0 running, 24 to submit in 2 packs" in out and "--partition=gpu" in out and "--array=0-1%16" in out
    assert not any(tmp_path.iterdir())


def test_submitit_array_trains_and_a_preempted_task_resumes(tmp_path):
    suite_path = tmp_path / "tiny.yaml"
    suite_path.write_text(SUITE.format(epochs=3))
    cfgs = suite_runs(load_suite(str(suite_path)))[:2]
    results = tmp_path / "results"
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    executor.update_parameters(timeout_min=10)
    jobs = submit(cfgs, str(results), "tiny", None, "10", 2, executor=executor, pack=1)
    assert [r["status"] for j in jobs for r in j.result()] == ["complete", "complete"]
    # a long run (1,500 one-step epochs), pre-empted early: submitit requeues the task, which resumes from
    # its last checkpoint instead of starting over
    long_cfg = {**resolve({"method": "cll", "arch": "moons-mlp", "dataset": "moons", "epochs": 1500,
                           "n_train": 100, "n_test": 200, "lower_bound_pairs": 20, "lower_bound_steps": 2,
                           "eval_every": 500, "threads": 1}), "seed": 3}
    (job,) = executor.map_array(RunTask(str(results)), [[long_cfg]])
    folder = store.run_dir(results, long_cfg)
    deadline = time.time() + 400
    while time.time() < deadline and not (folder / store.CHECKPOINT).exists():
        time.sleep(0.02)
    # Pre-empt the task the way Slurm does: SIGUSR2 to the task process (the local executor's controller, whose
    # pid the job holds, runs it as a child and requeues it when it exits with submitit's requeue code).
    controller = job._process.pid
    (task_pid,) = [int(p) for p in Path(f"/proc/{controller}/task/{controller}/children").read_text().split()]
    os.kill(task_pid, signal.SIGUSR2)
    (result,) = job.result()
    assert result["status"] == "complete" and len(result["resumed_at_epochs"]) == 1
    assert 25 <= result["resumed_at_epochs"][0] < 1500  # moons checkpoints every 25 epochs
    assert len(store.read_metrics(folder)) == 1500


def test_registry_has_test_methods_only_in_tests():
    assert "test-nan-at-step-7" in METHODS.names()  # registered by this module for the tests above
