"""Issue 15, part 3: `amp: bf16` and `compile: true` change only the training forward, are part of the config
hash, and train to the same place as eager float32 on a short CPU run."""
import pytest

from bench.config import ConfigError, config_hash, resolve
from bench.train import train_run


def _short(**extra):
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "epochs": 6, "n_train": 400, "n_test": 400,
                   "lower_bound_pairs": 4, "lower_bound_steps": 1, "eval_tail": None, **extra})
    cfg["seed"] = 1
    return cfg


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return train_run(_short(), tmp_path_factory.mktemp("eager"))


def test_options_enter_the_hash_and_are_checked():
    assert len({config_hash(_short()), config_hash(_short(amp="bf16")), config_hash(_short(compile=True))}) == 3
    with pytest.raises(ConfigError, match="amp must be bf16"):
        resolve({"method": "cll", "arch": "moons-mlp", "amp": "fp16"})


def test_bf16_autocast_trains_like_float32(eager, tmp_path):
    amp = train_run(_short(amp="bf16"), tmp_path)
    assert amp["eval"]["test"]["clean"] == pytest.approx(eager["eval"]["test"]["clean"], abs=0.03)
    assert amp["K_f"] == pytest.approx(eager["K_f"], rel=0.02)
    # certification stays float64 (moons) with the same guaranteed-bound path
    assert amp["K_f"] >= amp["K_f_power"] and amp["layer_bounds"] != eager["layer_bounds"]


def test_compiled_forward_matches_eager(eager, tmp_path):
    compiled = train_run(_short(compile=True), tmp_path)
    assert compiled["eval"]["test"]["clean"] == pytest.approx(eager["eval"]["test"]["clean"], abs=0.01)
    assert compiled["K_f"] == pytest.approx(eager["K_f"], rel=1e-4)


def test_budget_strings_are_checked():
    from bench.config import budget_seconds
    assert budget_seconds("2h") == 7200 and budget_seconds("90m") == 5400 and budget_seconds(300) == 300
    assert budget_seconds("1.5d") == 1.5 * 86400 and budget_seconds("45s") == 45
    for bad in ("two hours", "-5m", 0, "5 weeks"):
        with pytest.raises(ConfigError, match="budget"):
            resolve({"method": "cll", "arch": "moons-mlp", "budget": bad})


def test_budgeted_run_plans_its_epochs_records_compute_and_resumes_with_the_same_plan(tmp_path):
    """A budget replaces the epoch count: the plan (from timed steps on a copy) fixes the epochs, result.json
    records budgeted and measured seconds per epoch, the folder keeps the config as given, and a resumed run
    keeps the plan from its checkpoint instead of measuring again."""
    from bench import store
    cfg = _short(budget="3s")
    result = train_run(cfg, tmp_path)
    b = result["budget"]
    assert b["seconds"] == 3.0 and b["epochs"] == result["epochs"] >= 1
    assert b["seconds_per_epoch_planned"] > 0 and b["probe_steps"] >= 10
    assert b["seconds_per_epoch_measured"] == pytest.approx(result["train_seconds"] / result["epochs"], rel=1e-3)
    assert result["config_hash"] == config_hash(cfg)
    assert store.read_config(tmp_path)["epochs"] == cfg["epochs"]
    rows = store.read_metrics(tmp_path)
    assert len(rows) == result["epochs"]
    # resume: the last checkpoint holds the plan; a rerun of the finished run's folder trains nothing new
    (tmp_path / "result.json").unlink()
    again = train_run(cfg, tmp_path)
    assert again["epochs"] == result["epochs"] and again["budget"]["seconds_per_epoch_planned"] == \
        b["seconds_per_epoch_planned"]


def test_replanning_fills_the_rest_of_the_budget_at_the_measured_pace():
    from bench.train import REPLAN_WINDOW, replanned_epochs
    rows = [{"train_seconds": str(float(k))} for k in range(1, 4)]           # 1 s per epoch so far, as CSV strings
    assert replanned_epochs(3, 10.0, rows, 3.0) == 10
    slower = [{"train_seconds": 2.0 * k} for k in range(1, 21)]              # the last epochs set the pace
    slower[-1]["train_seconds"] = slower[-2]["train_seconds"] + 4.0
    pace = (slower[-1]["train_seconds"] - slower[-1 - REPLAN_WINDOW]["train_seconds"]) / REPLAN_WINDOW
    assert replanned_epochs(20, 100.0, slower, slower[-1]["train_seconds"]) == 20 + round((100 - 42) / pace)
    # spent: one more epoch, so the schedules still reach their end
    assert replanned_epochs(20, 30.0, slower, 42.0) == 21


def test_a_misplanned_budget_is_corrected_as_the_run_trains(tmp_path, monkeypatch):
    """A first plan that buys 5× the epochs the budget allows (a step time measured while the machine was
    faster) is re-planned from the measured epochs: training ends within 10% of the budget, with the schedules
    (progress, and with it the lr milestone and CLL's p) at their end."""
    from bench import store, train

    real = train.plan_budget

    def optimistic(*args, **kwargs):
        plan = real(*args, **kwargs)
        return {**plan, "epochs": 5 * plan["epochs"], "epochs_planned": 5 * plan["epochs"]}

    monkeypatch.setattr(train, "plan_budget", optimistic)
    result = train_run(_short(budget="8s"), tmp_path)
    b = result["budget"]
    assert b["replans"] >= 1 and b["epochs"] == result["epochs"] < b["epochs_planned"]
    assert 0.9 <= b["measured_over_budget"] <= 1.1, b
    state = store.load_checkpoint(tmp_path / store.CHECKPOINT)
    assert state["progress"] == pytest.approx(1.0, abs=1e-9)
    last = store.read_metrics(tmp_path)[-1]
    assert float(last["lr"]) == pytest.approx(1e-4) and float(last["p"]) < 1e-11


def test_tables_mark_budgeted_runs_with_their_measured_compute(tmp_path):
    from bench.report import tables
    from bench.store import run_dir
    cfg = _short(budget="2s")
    train_run(cfg, run_dir(tmp_path, cfg))
    runs, problems = tables.collect(tmp_path)
    assert not problems
    _, display = tables.build_table(runs, "test")
    note = display["Note"].iloc[0]
    assert note.startswith("budget 2 s: ") and "measured" in note


@pytest.mark.parametrize("kind", ["step", "triangular", "exp"])
def test_a_budgets_lr_schedule_read_at_its_progress_is_the_planned_schedule(kind):
    """While the first plan holds (progress = k/T), the budget's LambdaLR reads the same lr as the schedule an
    epoch-count run builds, at every step, for each lr schedule kind."""
    import torch

    from bench.optim import make_lr_scheduler

    cfg = {**_short(), "epochs": 12, "protocol_epochs": 24, "lr_schedule": kind, "lr_milestones": [8, 16],
           "lr_gamma": 0.1, "lr_end": 1e-6, "lr_more": 2}
    spe, steps = 5, 12 * 5
    k = {"step": 0}
    plain = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    virtual = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    a = make_lr_scheduler(cfg, plain, spe)
    b = make_lr_scheduler(cfg, virtual, spe, virtual_step=lambda: (k["step"] / steps) * steps)
    for step in range(steps):
        assert virtual.param_groups[0]["lr"] == pytest.approx(plain.param_groups[0]["lr"], rel=1e-12), step
        plain.step()
        virtual.step()
        k["step"] = step + 1
        a.step()
        b.step()


def test_an_interrupted_budgeted_run_resumes_its_plan_and_progress(tmp_path, monkeypatch):
    """Killed mid-run, a budgeted run resumes from its checkpoint with its current plan and progress: it still ends
    near its budget, with its schedules at their end and its p schedule never jumping back."""
    from bench import store, train

    cfg = _short(budget="6s", checkpoint_every=1)
    real = train.Run.end_epoch

    def stop_after_epoch_4(self, epoch, *args, **kwargs):
        real(self, epoch, *args, **kwargs)
        if epoch == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(train.Run, "end_epoch", stop_after_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path)
    assert store.load_checkpoint(tmp_path / store.CHECKPOINT)["progress"] > 0
    monkeypatch.setattr(train.Run, "end_epoch", real)
    result = train_run(cfg, tmp_path)
    assert result["resumed_at_epochs"] == [4]
    assert 0.85 <= result["budget"]["measured_over_budget"] <= 1.15, result["budget"]
    assert store.load_checkpoint(tmp_path / store.CHECKPOINT)["progress"] == pytest.approx(1.0, abs=1e-9)
    p = [float(r["p"]) for r in store.read_metrics(tmp_path)]
    assert len(p) == result["epochs"] and all(a >= b for a, b in zip(p, p[1:])) and p[-1] < 1e-11
