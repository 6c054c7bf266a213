"""Tables from hand-made result folders: the aggregation arithmetic (mean, sample std with ddof = 1, missing
seeds, diverged runs), baseline deltas and bold, the LaTeX/CSV renderings, the per-seed appendix and
paper-vs-measured (short runs marked, never presented as reproductions)."""
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from bench import store
from bench.cli import main
from bench.config import ConfigError, config_hash, load_suite, resolve
from bench.report import paper, tables

CLL = {"method": "cll", "arch": "moons-mlp", "dataset": "moons"}
GLORO = {"method": "gloro", "arch": "moons-mlp", "dataset": "moons"}


def write_run(results, spec, seed, *, status="complete", clean=0.9, cra=0.8, K_f=10.0, K_hf=20.0,
              tightness=0.5, train_seconds=12.0, train_clean=None):
    """A run folder as the engine writes it: config.yaml, then result.json (sealed when the store seals)."""
    cfg = {**resolve(spec), "seed": seed}
    folder = store.run_dir(results, cfg)
    store.write_config(folder, cfg)
    name = f"{float(cfg['eps']):g}"
    result = {"method": cfg["method"], "arch": cfg["arch"], "dataset": cfg["dataset"], "seed": seed,
              "config_hash": config_hash(cfg), "status": status, "epochs": int(cfg["epochs"]),
              "train_subset": cfg.get("train_subset"),
              "eval": {"test": {"clean": clean, "cra": {name: cra}},
                       "train": {"clean": clean if train_clean is None else train_clean, "cra": {name: cra}}},
              "K_f": K_f, "K_up": K_f / 2, "K_hf": K_hf, "lower_bound": tightness * K_f, "tightness": tightness,
              "params": 3782, "train_seconds": train_seconds, "device": "cpu (test, 1 threads)",
              "torch": "x", "commit": "abc"}
    if status == "diverged":
        result["reason"] = "loss is NaN"
    if hasattr(store, "write_result"):
        store.write_result(folder, result)
    else:
        store.write_json(folder / store.RESULT, result)
    return folder


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    # CLL ε = 0.15: three complete seeds
    for seed, (c, a, k) in enumerate([(0.90, 0.80, 10.0), (0.92, 0.70, 14.0), (0.97, 0.75, 12.0)], start=1):
        write_run(r, {**CLL, "eps": 0.15}, seed, clean=c, cra=a, K_f=k)
    # GloRo ε = 0.15: seeds 1 and 2 complete, seed 3 diverged (with numbers that must not be averaged)
    write_run(r, {**GLORO, "eps": 0.15}, 1, clean=0.88, cra=0.60, K_f=5.0, K_hf=5.0)
    write_run(r, {**GLORO, "eps": 0.15}, 2, clean=0.86, cra=0.64, K_f=7.0, K_hf=7.0)
    write_run(r, {**GLORO, "eps": 0.15}, 3, status="diverged", clean=0.0, cra=0.0, K_f=1e9, K_hf=1e9)
    # CLL ε = 0.25: only seed 1 (two missing)
    write_run(r, {**CLL, "eps": 0.25}, 1, clean=0.95, cra=0.50)
    return r


def _table(results, split="test", seeds=3, baseline=None):
    runs, problems = tables.collect(results)
    assert not problems
    return tables.build_table(runs, split, seeds, baseline)


def test_mean_and_sample_std(results):
    agg, display = _table(results)
    row = agg[(agg.method == "cll") & (agg.eps_train == 0.15)].iloc[0]
    assert row["n"] == 3
    assert row["clean_mean"] == pytest.approx(np.mean([0.90, 0.92, 0.97]))
    assert row["clean_std"] == pytest.approx(np.std([0.90, 0.92, 0.97], ddof=1))   # sample std, not ddof=0
    assert row["clean_std"] != pytest.approx(np.std([0.90, 0.92, 0.97], ddof=0))
    assert row["K_f_mean"] == pytest.approx(12.0) and row["K_f_std"] == pytest.approx(2.0)
    cell = display[(display.Method == "cll") & (display.Setting == "eps=0.15")].iloc[0]
    assert cell["Clean (%)"] == "93.0 ± 3.6"                     # (0.90 + 0.92 + 0.97)/3, s = 0.0361
    assert cell["CRA@ε (%)"] == "75.0 ± 5.0"
    assert cell["K(f)"] == "12.00 ± 2.00"
    assert cell["n"] == "3"
    assert "ddof = 1" in tables.render(display, "md") and "ddof = 1" in tables.render(display, "tex")


def test_missing_seeds_show_n_below_the_suite_count(results):
    _, display = _table(results)
    cell = display[(display.Method == "cll") & (display.Setting == "eps=0.25")].iloc[0]
    assert cell["n"] == "1/3"
    assert cell["Clean (%)"] == "95.0"            # one seed: no std
    _, no_suite = _table(results, seeds=None)
    assert no_suite[(no_suite.Method == "cll") & (no_suite.Setting == "eps=0.25")].iloc[0]["n"] == "1"


def test_diverged_runs_are_counted_never_averaged(results):
    agg, display = _table(results)
    row = agg[agg.method == "gloro"].iloc[0]
    assert row["n"] == 2 and row["diverged"] == 1
    assert row["clean_mean"] == pytest.approx(0.87)
    assert row["K_f_mean"] == pytest.approx(6.0)               # the diverged 1e9 is not in it
    assert row["clean_std"] == pytest.approx(np.std([0.88, 0.86], ddof=1))
    assert display[display.Method == "gloro"].iloc[0]["n"] == "2/3 (+1 diverged)"


def test_baseline_deltas_and_best_in_bold(results):
    _, display = _table(results, baseline="gloro")
    cll = display[(display.Method == "cll") & (display.Setting == "eps=0.15")].iloc[0]
    assert cll["Clean (%)"] == "93.0 ± 3.6 (+6.0)"            # 93.0 − 87.0, against GloRo at the same ε
    assert cll["CRA@ε (%)"] == "75.0 ± 5.0 (+13.0)"
    assert "(" not in cll["K(f)"]                              # no deltas on K
    other = display[(display.Method == "cll") & (display.Setting == "eps=0.25")].iloc[0]
    assert "(" not in other["CRA@ε (%)"]                       # no GloRo row at ε = 0.25 to compare with...
    assert other["Clean (%)"] == "95.0 (+8.0)"                 # ...but clean accuracy compares across ε
    bold = set(display.attrs["bold"])
    pos = {s: i for i, s in enumerate(display.Method + "/" + display.Setting)}
    assert (pos["cll/eps=0.25"], "Clean (%)") in bold          # 95.0 is the best clean accuracy
    assert (pos["cll/eps=0.15"], "CRA@ε (%)") in bold          # CRA@ε_train compared at the same ε only...
    assert (pos["cll/eps=0.25"], "CRA@ε (%)") not in bold      # ...this one has no peer at ε = 0.25
    md = tables.to_markdown(display)
    assert "**95.0 (+8.0)**" in md and "**75.0 ± 5.0 (+13.0)**" in md
    with pytest.raises(ConfigError):
        _table(results, baseline="nosuch")


def test_csv_is_numeric_and_matches_the_table(results):
    _, display = _table(results)
    csv = pd.read_csv(pd.io.common.StringIO(tables.render(display, "csv")))
    row = csv[(csv.method == "cll") & (csv.setting == "eps=0.15")].iloc[0]
    assert row["Clean (%) mean"] == pytest.approx(93.0)
    assert row["Clean (%) std"] == pytest.approx(100 * np.std([0.90, 0.92, 0.97], ddof=1), abs=1e-4)
    assert row["n"] == 3 and row["seeds_expected"] == 3
    assert csv[csv.method == "gloro"].iloc[0]["diverged"] == 1


def _check_booktabs(tex: str):
    """Structural check of a booktabs table: the environments, the three rules in order, and every row with
    as many cells as the column spec."""
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    lines = tex.splitlines()
    top, mid, bottom = (lines.index(r) for r in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert top < mid < bottom
    for line in lines[top + 1:bottom]:
        if line == r"\midrule":
            continue
        assert line.endswith(r"\\")
        assert len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1, line
    body = "\n".join(lines[top:bottom])
    assert "±" not in body and "%" not in body.replace(r"\%", "")   # all escaped
    assert re.search(r"(?<!\\)_", body) is None


def test_latex_booktabs_structure_and_compiles(results, tmp_path):
    _, display = _table(results, baseline="gloro")
    tex = tables.to_latex(display, tables.caption_for(display), "tab:test")
    _check_booktabs(tex)
    assert r"\textbf{" in tex and r"$\pm$" in tex
    per_seed = tables.to_latex(tables.per_seed_frame(tables.collect(results)[0], "test", 3), "seeds")
    _check_booktabs(per_seed)
    runs = tables.collect(results)[0]
    vs = paper.render(paper.vs_paper_frame(runs, [paper.PaperCell("Table X", {"method": "cll", "eps": 0.15},
                                                                  values={"clean": 90.0})]), "tex")
    _check_booktabs(vs.split("\n", 1)[1] if vs.startswith("%") else vs)
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: structural check only (apt-get install texlive-latex-recommended)")
    doc = tmp_path / "t.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage[utf8]{inputenc}\n"
                   "\\begin{document}\n" + tex + "\n" + per_seed + "\n" + vs + "\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000


def test_per_seed_appendix(results):
    df = tables.per_seed_frame(tables.collect(results)[0], "test", 3)
    assert list(df.columns) == ["Model", "Metric", "1", "2", "3", "Avg"]
    gloro = df[df.Model.str.startswith("gloro") & (df.Metric == "Clean (%)")].iloc[0]
    assert (gloro["1"], gloro["2"], gloro["3"], gloro["Avg"]) == ("88.0", "86.0", "div.", "87.0 ± 1.4")
    lone = df[df.Model.str.contains("eps=0.25") & (df.Metric == "Clean (%)")].iloc[0]
    assert (lone["2"], lone["3"]) == ("–", "–")


def test_short_runs_are_marked(tmp_path):
    r = tmp_path / "r"
    write_run(r, {**CLL, "eps": 0.15, "epochs": 30}, 1)
    write_run(r, {**CLL, "eps": 0.15, "train_subset": 500}, 1)
    _, display = _table(r, seeds=1)
    notes = set(display["Note"])
    assert notes == {"short run (30/1000 ep)", "short run (subset 500)"}
    assert "not reproductions" in tables.caption_for(display)


PAPER_SUITE = """
name: papertest
seeds: 3
defaults: {{dataset: moons, arch: moons-mlp}}
grid: {{method: [cll, gloro], eps: [0.15]}}
paper:
  - source: Table 9 (made up)
    match: {{method: cll, eps: 0.15}}
    clean: 90.0
    cra: {{0.15: 70.0}}
    K_f: 11.0
    seeds: {{source: Table D9, clean: [91.0, 92.0, 93.0]}}
  - source: Table 9 (made up)
    match: {{method: cll, eps: 0.30}}
    tightness: 50
{extra}
"""


def test_paper_vs_measured(results, tmp_path):
    suite_file = tmp_path / "papertest.yaml"
    suite_file.write_text(PAPER_SUITE.format(extra=""))
    suite = load_suite(str(suite_file))
    cells = paper.parse_paper(suite)
    assert cells[0].match == {"method": "cll", "eps": 0.15, "dataset": "moons"}   # dataset from the defaults
    runs = tables.collect(results)[0]
    frame = paper.vs_paper_frame(runs, cells, 3)
    clean = frame[(frame.metric_key == "clean")].iloc[0]
    assert clean["paper"] == 90.0 and clean["mean"] == pytest.approx(93.0) and clean["n_runs"] == 3
    assert clean["std"] == pytest.approx(100 * np.std([0.90, 0.92, 0.97], ddof=1))
    assert "Table D9 values average 92.00" in clean["Note"]       # the per-seed check (printed 90 ≠ 92)
    assert frame[frame.metric_key == "CRA@0.15"].iloc[0]["mean"] == pytest.approx(75.0)
    missing = frame[frame.metric_key == "tightness"].iloc[0]
    assert not missing["measured"]
    md = paper.render(frame, "md")
    assert "| cll |" in md and "+3.0" in md and "not run" in md and "full protocol" in md
    assert "SHORT (" not in md and "SHORT RUNS" not in md


def test_vs_paper_marks_short_runs_loudly(tmp_path, capsys):
    r = tmp_path / "r"
    for seed in (1, 2):
        write_run(r, {**CLL, "eps": 0.15, "epochs": 30}, seed, clean=0.5)
    suite_file = tmp_path / "papertest.yaml"
    suite_file.write_text(PAPER_SUITE.format(extra=""))
    code = main(["table", str(r), "--suite", str(suite_file), "--vs-paper"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("SHORT RUNS") == 2                          # the banner, above and below the table
    assert "⚠ SHORT (30/1000 ep): not a reproduction" in out
    assert "full protocol" not in out
    assert "−40.0" in out                                        # 50.0 measured − 90 printed


def test_malformed_paper_block_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PAPER_SUITE.format(extra="  - {source: Table 1, match: {method: cll}, clen: 3}"))
    code = main(["table", str(tmp_path), "--suite", str(bad), "--vs-paper"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "clen" in err


@pytest.mark.parametrize("name", ["moons", "cifar10", "tinyimagenet", "cifar100", "slack-sweep-moons",
                                  "slack-sweep-cifar10"])
def test_suite_paper_blocks_parse_and_match_a_cell(name):
    from bench.config import SUITES_DIR, suite_runs

    if not (SUITES_DIR / f"{name}.yaml").exists():
        pytest.skip(f"suites/{name}.yaml not present")
    suite = load_suite(name)
    cells = paper.parse_paper(suite)
    cfgs = suite_runs(suite)
    for cell in cells:
        assert cell.source and cell.values
        assert any(paper.matches(cell, c) for c in cfgs), f"{cell.source}: {cell.match} matches no cell"
        for metric, v in cell.values.items():
            assert math.isfinite(v)
            if tables.is_percent(metric):
                assert 0 <= v <= 100                              # as printed, in percent
    raw = yaml.safe_load((SUITES_DIR / f"{name}.yaml").read_text())
    assert len(cells) == len(raw.get("paper") or [])


def test_setting_labels_write_the_fields_radii_as_fractions():
    from bench.report.tables import _fmt_setting
    assert [_fmt_setting(v) for v in (36 / 255, 108 / 255, 0.25, 0.15, 1.0, 51 / 255)] == \
        ["36/255", "108/255", "0.25", "0.15", "1", "0.2"]
    assert _fmt_setting({"schedule": "linear", "start": 0.5, "end": 20.0}) == "linear(0.5→20.0)"


def test_power_iteration_columns_and_bound_gaps(tmp_path):
    """Tables show the guaranteed CRA; `power=True` adds the power-iteration CRA and K(f) as PI columns, and the
    report's gap frames give the per-layer and per-CRA differences between the two bounds."""
    from bench.report.report import bound_gap_frames

    r = tmp_path / "results"
    for seed, (g, p, lb, lp) in enumerate([(0.70, 0.72, [2.0, 3.0], [1.99, 3.0]),
                                           (0.60, 0.64, [2.5, 3.5], [2.4, 3.49])], start=1):
        folder = write_run(r, {**CLL, "eps": 0.15}, seed, cra=g, K_f=12.0)
        res = store.read_result(folder)
        for split in ("test", "train"):
            res["eval"][split]["cra_power"] = {"0.15": p}
        res.update(K_f_power=11.5, layer_bounds=lb, layer_bounds_power=lp)
        store.write_result(folder, res)
    runs, _ = tables.collect(r)
    _, plain = tables.build_table(runs, "test")
    assert not any("PI" in c for c in plain.columns)
    agg, display = tables.build_table(runs, "test", power=True)
    assert agg["CRA@ε_train_mean"].iloc[0] == pytest.approx(0.65)
    assert agg["pCRA@ε_train_mean"].iloc[0] == pytest.approx(0.68)
    assert agg["K_f_power_mean"].iloc[0] == pytest.approx(11.5)
    assert "CRA@ε PI (%)" in display.columns and "K(f) PI" in display.columns
    assert "not certificates" in tables.caption_for(display)
    layers, cras = bound_gap_frames(runs, ["test"])
    assert list(layers["Layer"]) == [1, 2]
    assert layers["Gap (max over seeds)"].iloc[0] == f"{2.5 / 2.4 - 1:.2e}"
    assert cras["Δ (points)"].iloc[0] == "−3.00"
