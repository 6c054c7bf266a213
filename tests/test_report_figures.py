"""Figures: each builder draws labelled axes and writes a non-empty PNG and PDF; the CRA-vs-ε curve counts a
point only when its radius strictly exceeds ε and agrees with the engine's CRA; `bench report` writes
report.md with its tables, figures and per-cell run counts from a tiny real suite."""
import numpy as np
import pandas as pd
import pytest

from bench import load_run, store
from bench.cli import main
from bench.config import load_suite, suite_runs
from bench.report import figures, report


def _labelled(fig):
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip()
    return axes


def _written(paths, min_png=5_000):
    by_suffix = {p.suffix: p for p in paths}
    assert set(by_suffix) == {".png", ".pdf"}
    assert by_suffix[".png"].stat().st_size > min_png
    assert by_suffix[".pdf"].stat().st_size > 1_000
    assert by_suffix[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cra_curve_is_strict_and_counts_only_correct_points():
    radii = np.sort(np.array([0.1, 0.2, 0.2, 0.5]))      # radii of the 4 correct points of 5
    grid = np.array([0.0, 0.1, 0.15, 0.2, 0.5, 0.6])
    assert figures.cra_curve(radii, 5, grid).tolist() == pytest.approx([0.8, 0.6, 0.6, 0.2, 0.0, 0.0])


def test_figure_builders_label_axes_and_write_files(tmp_path):
    rng = np.random.default_rng(0)
    seeds = [(np.sort(rng.uniform(0, 0.6, 80)), 100) for _ in range(3)]
    fig = figures.cra_vs_eps_figure([("cll@4c3f", seeds), ("gloro@4c3f", seeds[:1])], marks=figures.PAPER_EPS)
    _labelled(fig)
    _written(figures.save(fig, tmp_path / "cra_vs_eps"))

    pts = pd.DataFrame({"series": ["cll"] * 4, "x": [0.01, 0.1, 0.4, 0.8],
                        "clean_mean": [0.8, 0.78, 0.72, 0.68], "clean_std": [0.01] * 4,
                        "CRA@36/255_mean": [0.55, 0.6, 0.62, 0.6], "CRA@36/255_std": [0.01] * 4})
    fig = figures.slack_figure(pts, "CRA@36/255")
    assert "p" in _labelled(fig)[0].get_xlabel()
    _written(figures.save(fig, tmp_path / "slack"))

    sweep = pd.DataFrame({"series": ["cll"] * 3 + ["gloro"] * 3, "x": [0.15, 0.5, 1.0] * 2,
                          "CRA@ε_train_mean": [0.6, 0.4, 0.2, 0.58, 0.37, 0.15], "CRA@ε_train_std": [0.01] * 6,
                          "K_f_mean": [72, 300, 900, 7, 5, 3], "K_f_std": [1.0] * 6,
                          "K_hf_mean": [11.6, 3.5, 1.7, 7, 5, 3], "K_hf_std": [0.0] * 6,
                          "tightness_mean": [0.8, 0.85, 0.9, 0.7, 0.72, 0.75], "tightness_std": [0.01] * 6})
    fig = figures.eps_sweep_figure(sweep)
    axes = _labelled(fig)
    assert len(axes) == 3 and axes[1].get_yscale() == "log"
    _written(figures.save(fig, tmp_path / "eps_sweep"))

    ep = np.arange(10, 110, 10)
    fig = figures.cra_vs_epoch_figure([("cll", [(ep, ep / 200), (ep, ep / 210)]), ("gloro", [(ep, ep / 300)])],
                                      "test CRA (%) at ε = 36/255")
    assert _labelled(fig)[0].get_xlabel() == "epoch"
    _written(figures.save(fig, tmp_path / "cra_vs_epoch"))


TINY = """
name: tiny-report
description: A tiny two-moons suite for the report test.
seeds: 2
defaults:
  dataset: moons
  arch: moons-mlp
  epochs: 3
  n_train: 200
  n_test: 300
  lower_bound_pairs: 20
  lower_bound_steps: 5
  eval_every: 1
grid:
  method: [cll]
  eps: [0.15, 0.25]
paper:
  - source: "Fig. 4 caption"
    match: {method: cll, eps: 0.15}
    split: train
    clean: 100
    cra: {0.15: 100}
"""


@pytest.mark.slow
def test_report_from_a_tiny_suite(tmp_path, capsys):
    from bench.launch.local import run_all

    suite_file = tmp_path / "tiny-report.yaml"
    suite_file.write_text(TINY)
    suite = load_suite(str(suite_file))
    cfgs = suite_runs(suite)
    results = tmp_path / "results"
    run_all(cfgs[:-1], str(results), quiet=True)                 # leave one seed missing

    # the CRA curve from certified radii agrees with the engine's CRA at the training ε
    cfg = cfgs[0]
    run = load_run(store.run_dir(results, cfg))
    radii, total = figures.correct_radii(run, "test")
    name = f"{float(cfg['eps']):g}"
    assert figures.cra_curve(radii, total, np.array([float(cfg["eps"])]))[0] == \
        pytest.approx(run.result["eval"]["test"]["cra"][name], abs=1.5 / total)

    assert main(["report", str(suite_file), "--results", str(results)]) == 0
    out = tmp_path / "results" / "tiny-report"
    page = (out / "report.md").read_text()
    for needle in ("# Suite `tiny-report`", "A tiny two-moons suite", "## Results: test split",
                   "## Paper vs measured", "## Figures", "## Runs per cell", "## Appendix: every seed",
                   "3 of 4 complete", "1 missing", "⚠ Short runs", "SHORT (3/1000 ep): not a reproduction",
                   "![Certified robust accuracy against ε](cra_vs_eps.png)", "decision_boundary.png",
                   "eps_sweep.png", "cra_vs_epoch.png", "1/2"):
        assert needle in page, needle
    for stem in ("cra_vs_eps", "eps_sweep", "cra_vs_epoch", "decision_boundary"):
        _written([out / f"{stem}.png", out / f"{stem}.pdf"])
    for name in ("table.md", "table.tex", "table.csv", "table_per_seed.md", "paper_vs_measured.md"):
        assert (out / name).stat().st_size > 100
    summary = report.cell_summary(cfgs, report.runs_on_disk(cfgs, results)[0])
    assert summary["Complete"].sum() == 3 and summary["Missing"].sum() == 1
    assert "cpu" in page and "total train time" in page

    # the same figures for any hand-picked set of run folders
    picked = [store.run_dir(results, c) for c in cfgs[:2]]
    made, notes = report.figures_for_folders(picked, tmp_path / "picked", wanted=("cra_vs_eps", "cra_vs_epoch"))
    assert not notes and [t for t, _, _ in made] == ["Certified robust accuracy against ε", "CRA against epoch"]
    _written(made[0][1])
