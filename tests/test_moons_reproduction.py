"""Issue 14's tools for explaining gaps to the official code: the data's CRA ceiling, the spread of a run's last
evaluations, and method profiles (`--profile official`)."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from bench import store
from bench.cli import main
from bench.config import ConfigError, config_hash, resolve
from bench.data.ceiling import cra_ceiling
from bench.report import tables
from bench.train import last_evals


def brute_force_ceiling(x, y, eps):
    """The largest subset with no opposite-class pair at distance ≤ 2ε, by enumeration."""
    n = len(y)
    for size in range(n, -1, -1):
        for keep in itertools.combinations(range(n), size):
            if all(y[a] == y[b] or np.linalg.norm(x[a] - x[b]) > 2 * eps for a, b in itertools.combinations(keep, 2)):
                return size / n
    return 0.0


def test_ceiling_matches_enumeration_on_random_clusters():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 11))
        x, y = rng.uniform(size=(n, 2)), rng.integers(0, 2, size=n)
        eps = float(rng.uniform(0.02, 0.3))
        assert cra_ceiling(x, y, eps) == pytest.approx(brute_force_ceiling(x, y, eps)), trial


def test_ceiling_edge_cases():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    y = np.array([0, 1, 0, 1])
    # coincident opposite pair (distance 0): one of them at any ε; the pair at exactly 2ε = 2 conflicts too
    assert cra_ceiling(x, y, 1e-9) == 0.75
    assert cra_ceiling(x, y, 1.0) == 0.5           # (0,1) and (2,3) at exactly 2ε: a tie is never certified
    assert cra_ceiling(x, y, 1.0 - 1e-9) == 0.75
    assert cra_ceiling(x[[0, 2]], y[[0, 2]], 5.0) == 1.0   # one class: nothing conflicts
    with pytest.raises(ValueError, match="two classes"):
        cra_ceiling(x, np.array([0, 1, 2, 1]), 0.1)


def test_last_evals_spread():
    rows = [{"epoch": str(e), "test_clean": "" if e % 2 else str(0.5 + e / 100), "test_cra@0.25": "" if e % 2
             else str(e / 100), "K_f": "" if e % 2 else "3.0"} for e in range(1, 31)]
    out = last_evals(rows, n=10)
    assert out["n"] == 10 and out["epochs"] == list(range(12, 31, 2))
    vals = np.arange(12, 31, 2) / 100
    assert out["test_cra@0.25"]["min"] == pytest.approx(0.12) and out["test_cra@0.25"]["max"] == pytest.approx(0.30)
    assert out["test_cra@0.25"]["std"] == pytest.approx(vals.std(ddof=1))
    assert out["K_f"]["std"] == 0.0
    assert last_evals([{"epoch": "1", "loss": "2"}]) == {}


def test_profiles_are_config_values_under_the_runs_own_keys():
    base = resolve({"method": "cll", "arch": "moons-mlp"})
    off = resolve({"method": "cll", "arch": "moons-mlp", "profile": "official"})
    assert base["normalization"] == "pairwise" and off["normalization"] == "per_logit"
    assert off["p"]["end"] == 1e-15 and off["epochs"] == 1001 and off["optimizer"] == "adamw"
    assert config_hash(off) != config_hash(base)
    # the run's own keys win over the profile
    mixed = resolve({"method": "cll", "arch": "moons-mlp", "profile": "official", "normalization": "pairwise"})
    assert mixed["normalization"] == "pairwise" and mixed["epochs"] == 1001
    g = resolve({"method": "gloro", "arch": "moons-mlp", "profile": "official"})
    assert g["extremal_pair_grad"] is True and g["epochs"] == 1001
    with pytest.raises(ConfigError, match="no profile 'nosuch'"):
        resolve({"method": "cll", "arch": "moons-mlp", "profile": "nosuch"})


def test_unknown_profile_is_one_line_and_nonzero(capsys, tmp_path):
    code = main(["run", "--method", "soc", "--arch", "lipconv-10", "--profile", "official",
                 "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "has no profile 'official'" in err
    assert not any(tmp_path.iterdir())


def test_short_moons_run_records_ceiling_and_tail(tmp_path):
    """eval_tail evaluates each of the last N epochs; result.json gets `last_evals` and each split's ceiling."""
    code = main(["run", "--method", "gloro", "--arch", "moons-mlp", "--results", str(tmp_path), "--epochs", "6",
                 "--quiet", "--set", "eval_every=100", "--set", "eval_tail=3", "--set", "n_train=200",
                 "--set", "n_test=300", "--set", "eps=0.25", "--set", "lower_bound_pairs=10",
                 "--set", "lower_bound_steps=2"])
    assert code == 0
    folder = next(p.parent for p in tmp_path.rglob("result.json"))
    rows = store.read_metrics(folder)
    assert [r["epoch"] for r in rows if r.get("test_clean")] == ["4", "5", "6"]
    result = json.loads((folder / "result.json").read_text())
    assert result["last_evals"]["n"] == 3 and result["last_evals"]["epochs"] == [4, 5, 6]
    from bench.registry import DATASETS
    cfg = resolve({"method": "gloro", "arch": "moons-mlp", "eps": 0.25, "n_train": 200, "n_test": 300})
    data = DATASETS.get("moons")(cfg, 1)
    for split, (x, y) in {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}.items():
        assert result["eval"][split]["cra_ceiling"]["0.25"] == cra_ceiling(x.double().numpy(), y.numpy(), 0.25)
        assert result["eval"][split]["cra"]["0.25"] <= result["eval"][split]["cra_ceiling"]["0.25"]
    runs, _ = tables.collect(tmp_path)
    _, display = tables.build_table(runs, "test")
    assert "Ceiling@ε (%)" in display.columns
    assert "Ceiling" in tables.caption_for(display)


def test_tail_footnote_only_where_it_exceeds_the_seed_spread():
    agg_row = {"m_mean": 0.8, "m_std": 0.01, f"m{tables.TAIL}": 0.05}
    assert "†5.0" in tables._cell(_series(agg_row, "CRA@m"), "CRA@m")
    agg_row[f"m{tables.TAIL}"] = 0.005
    assert "†" not in tables._cell(_series(agg_row, "CRA@m"), "CRA@m")


def _series(row, m):
    import pandas as pd
    return pd.Series({f"{m}_mean": row["m_mean"], f"{m}_std": row["m_std"], f"{m}{tables.TAIL}": row[f"m{tables.TAIL}"]})


def test_defaults_baseline_compares_each_ablation_with_its_own_defaults(tmp_path):
    """`baseline: defaults`: every row gets (+x) against the same method's row at lipbench's defaults (the config
    closest to `resolve(method, arch, dataset, ε)`), even when the defaults row's label names other keys."""
    from tests.test_report import write_run
    cll, gloro = {"method": "cll", "arch": "moons-mlp", "dataset": "moons"}, \
        {"method": "gloro", "arch": "moons-mlp", "dataset": "moons"}
    for seed in (1, 2):
        write_run(tmp_path, {**cll, "eps": 0.25}, seed, cra=0.90)
        write_run(tmp_path, {**cll, "eps": 0.25, "normalization": "per_logit"}, seed, cra=0.60)
        write_run(tmp_path, {**cll, "eps": 0.25, "profile": "official"}, seed, cra=0.55)
        write_run(tmp_path, {**gloro, "eps": 0.25}, seed, cra=0.80)
        write_run(tmp_path, {**gloro, "eps": 0.25, "profile": "official"}, seed, cra=0.70)
    runs, _ = tables.collect(tmp_path)
    agg, display = tables.build_table(runs, "test", 2, baseline="defaults")
    col = [c for c in display.columns if c.startswith("CRA@")][0]
    cells = {(m, k): v for m, k, v in zip(display["Method"], display["Setting"], display[col])}
    assert "(−30.0)" in cells[("cll", "normalization=per_logit, profile=None")]
    assert "(−35.0)" in cells[("cll", "profile=official")]     # a profile's keys are named by it
    assert "(−10.0)" in cells[("gloro", "profile=official")]
    assert "(" not in cells[("cll", "normalization=pairwise, profile=None")]
    assert "(" not in cells[("gloro", "profile=None")]


def test_tail_spread_needs_consecutive_epochs(tmp_path):
    """The † spread is read only from consecutive-epoch evaluations (eval_tail); evaluations every 10 epochs
    span a schedule, so their spread is not shown as end-of-run noise."""
    from tests.test_report import write_run
    import json as _json
    spec = {"method": "cll", "arch": "moons-mlp", "dataset": "moons", "eps": 0.25}
    for seed, epochs in ((1, list(range(991, 1001))), (2, list(range(910, 1001, 10)))):
        folder = write_run(tmp_path / str(seed), spec, seed, cra=0.9)
        result = _json.loads((folder / "result.json").read_text())
        result["last_evals"] = {"n": 10, "epochs": epochs, "test_cra@0.25": {"min": 0.5, "max": 0.9, "std": 0.2}}
        store.write_result(folder, result)
    for seed, shown in ((1, True), (2, False)):
        runs, problems = tables.collect(tmp_path / str(seed))
        assert not problems
        df = tables.run_frame(runs, "test")
        assert (not pd.isna(df[f"CRA@ε_train{tables.TAIL}"].iloc[0])) == shown
