"""Figures drawn from finished runs only (matplotlib, each written as PNG and PDF).

* `cra_vs_eps_figure`: certified robust accuracy against ε over a fine grid, from each run's certified radii
  (a point counts at ε iff it is classified correctly and its radius exceeds ε, the strict certificate).
* `slack_figure`: slack p against clean accuracy and CRA (the reference paper's Fig. 5, left).
* `eps_sweep_figure`: CRA at ε_train, K(f), K(h∘f) and tightness against the training ε (Fig. 5, right).
* `cra_vs_epoch_figure`: CRA against epoch from metrics.csv (supplement Fig. D1).
* `decision_boundary_figure`: the two-moons decision boundary with its ±ε margins (Fig. 4) for any runs.

Every `plot_*`/`*_figure` builder returns the matplotlib Figure; `save` writes it (PNG and PDF) and closes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.certify import certified, certified_radius, predict  # noqa: E402

#: the radii the image tables report (reference paper Tables 1, 2)
PAPER_EPS = (36 / 255, 72 / 255, 108 / 255)


def save(fig, path_stem: Path) -> List[Path]:
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _finish(fig, axes, title: str = "", legend_size: float = 6):
    """Grid and legend on every axis, the title (on the axis, or above several), a tight layout."""
    axes = list(axes)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    if title and len(axes) == 1:
        axes[0].set_title(title, fontsize=9)
    elif title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _colours(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# CRA against ε, from certified radii
# ---------------------------------------------------------------------------------------------------------
def correct_radii(run, split: str = "test") -> Tuple[np.ndarray, int]:
    """Sorted certified radii of the correctly classified points of a split (misclassified points are never
    certified), and the split size."""
    x, y = run.data(split)
    logits = run.logits(x)
    radius = certified_radius(logits, run.bound, run.model.num_classes)
    ok = (logits.argmax(1) == y.to(logits.device)).cpu()
    return np.sort(radius.cpu().numpy()[ok.numpy()]), len(y)


def cra_curve(radii: np.ndarray, total: int, grid: np.ndarray) -> np.ndarray:
    """CRA(ε) = #{correct points with radius > ε} / total, for every ε of the grid (strict, as certificates)."""
    if total == 0:
        return np.full(len(grid), np.nan)
    return (len(radii) - np.searchsorted(radii, grid, side="right")) / total


def eps_grid(radii_sets: Sequence[np.ndarray], marks: Sequence[float] = (), points: int = 400) -> np.ndarray:
    """0 … a little beyond where the curves reach 0 (the 99th percentile of finite radii) or the marks."""
    finite = [r[np.isfinite(r)] for r in radii_sets]
    top = max([np.quantile(r, 0.99) for r in finite if len(r)] + [1.25 * m for m in marks] + [1e-3])
    return np.linspace(0.0, float(top), points)


def cra_vs_eps_figure(curves: Sequence[Tuple[str, Sequence[Tuple[np.ndarray, int]]]], split: str = "test",
                      marks: Sequence[float] = (), title: str = "",
                      ceiling: Sequence[Tuple[float, float, float, float]] = ()):
    """curves: (label, [(sorted correct radii, split size) per seed]). Mean over seeds as a line, the range
    over seeds shaded; dotted verticals at the reported radii `marks`; the data's CRA ceiling (ε, mean, min, max
    over the seeds' data, fractions) as black markers with their range."""
    grid = eps_grid([r for _, seeds in curves for r, _ in seeds], marks)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for colour, (label, seeds) in zip(_colours(len(curves)), curves):
        ys = np.stack([cra_curve(r, n, grid) for r, n in seeds]) * 100.0
        ax.plot(grid, ys.mean(0), color=colour, lw=1.4, label=f"{label} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(grid, ys.min(0), ys.max(0), color=colour, alpha=0.2, lw=0)
    for m in marks:
        ax.axvline(m, color="0.6", ls=":", lw=0.8)
    if len(ceiling):
        e, mean, lo, hi = (np.array(c, dtype=float) * (1.0 if i == 0 else 100.0)
                           for i, c in enumerate(zip(*sorted(ceiling))))
        ax.errorbar(e, mean, yerr=[mean - lo, hi - mean], color="black", marker="_", ms=10, lw=0, elinewidth=1,
                    capsize=2, label="data ceiling (any classifier)")
    ax.set_xlabel("ε (L2 radius)")
    ax.set_ylabel(f"certified robust accuracy (%), {split}")
    ax.set_xlim(grid[0], grid[-1])
    ax.set_ylim(0, 100)
    return _finish(fig, [ax], title)


# ---------------------------------------------------------------------------------------------------------
# Sweeps over a hyperparameter (aggregated cells: one point per config, mean ± std over seeds)
# ---------------------------------------------------------------------------------------------------------
def _errorbar(ax, pts: pd.DataFrame, m: str, scale: float, **kw):
    pts = pts.sort_values("x")
    mean = pts[f"{m}_mean"].to_numpy(dtype=float) * scale
    std = np.nan_to_num(pts[f"{m}_std"].to_numpy(dtype=float) * scale)
    ax.errorbar(pts["x"].to_numpy(dtype=float), mean, yerr=std, capsize=2, marker="o", ms=3, lw=1.2, **kw)


def _log_if_wide(ax, x: np.ndarray):
    x = x[np.isfinite(x) & (x > 0)]
    if len(x) and x.max() / x.min() > 30:
        ax.set_xscale("log")


def slack_figure(points: pd.DataFrame, cra_metric: str, title: str = ""):
    """points: columns series, x (= p) and <metric>_mean/_std for 'clean' and `cra_metric` (fractions).
    Clean accuracy solid, CRA dashed, one colour per series (Fig. 5, left)."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    series = list(dict.fromkeys(points["series"]))
    for colour, s in zip(_colours(len(series)), series):
        pts = points[points["series"] == s]
        _errorbar(ax, pts, "clean", 100.0, color=colour, label=f"{s}: clean")
        _errorbar(ax, pts, cra_metric, 100.0, color=colour, ls="--", mfc="white",
                  label=f"{s}: {cra_metric.replace('CRA@', 'CRA ').replace('ε_train', 'ε_train')}")
    _log_if_wide(ax, points["x"].to_numpy(dtype=float))
    ax.set_xlabel("slack p")
    ax.set_ylabel("accuracy (%)")
    return _finish(fig, [ax], title)


def eps_sweep_figure(points: pd.DataFrame, title: str = ""):
    """points: columns series, x (= ε_train) and <metric>_mean/_std for 'CRA@ε_train' (if evaluated), 'K_f',
    'K_hf' and 'tightness'. Panels: CRA at ε_test = ε_train; K(h∘f) (solid) and K(f) (dashed), log scale;
    tightness (Fig. 5, right)."""
    has_cra = "CRA@ε_train_mean" in points and points["CRA@ε_train_mean"].notna().any()
    panels = (["cra"] if has_cra else []) + ["K", "tightness"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.1), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    series = list(dict.fromkeys(points["series"]))
    for colour, s in zip(_colours(len(series)), series):
        pts = points[points["series"] == s]
        if has_cra:
            _errorbar(axes["cra"], pts, "CRA@ε_train", 100.0, color=colour, label=s)
        _errorbar(axes["K"], pts, "K_hf", 1.0, color=colour, label=f"{s}: K(h∘f)")
        _errorbar(axes["K"], pts, "K_f", 1.0, color=colour, ls="--", mfc="white", label=f"{s}: K(f)")
        _errorbar(axes["tightness"], pts, "tightness", 100.0, color=colour, label=s)
    if has_cra:
        axes["cra"].set_ylabel("CRA at ε_test = ε_train (%)")
    axes["K"].set_ylabel("Lipschitz bound")
    axes["K"].set_yscale("log")
    axes["tightness"].set_ylabel("tightness (%)")
    for ax in axes.values():
        ax.set_xlabel("training ε")
    return _finish(fig, axes.values(), title, legend_size=5.5)


# ---------------------------------------------------------------------------------------------------------
# CRA against epoch (metrics.csv)
# ---------------------------------------------------------------------------------------------------------
def epoch_series(rows: Sequence[Dict[str, str]], column: str) -> Tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the metrics.csv rows where `column` was evaluated."""
    ep, val = [], []
    for r in rows:
        v = r.get(column)
        if v not in (None, ""):
            ep.append(int(float(r["epoch"])))
            val.append(float(v))
    return np.asarray(ep), np.asarray(val)


def cra_vs_epoch_figure(curves: Sequence[Tuple[str, Sequence[Tuple[np.ndarray, np.ndarray]]]], ylabel: str,
                        title: str = ""):
    """curves: (label, [(epochs, CRA fractions) per seed]). Mean over the seeds at the epochs all of them
    evaluated, range shaded (supplement Fig. D1)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for colour, (label, seeds) in zip(_colours(len(curves)), curves):
        common = sorted(set.intersection(*(set(e.tolist()) for e, _ in seeds)))
        if not common:
            continue
        ys = np.stack([np.interp(common, e, v) for e, v in seeds]) * 100.0
        ax.plot(common, ys.mean(0), color=colour, lw=1.3, marker="o" if len(common) < 30 else None, ms=2.5,
                label=f"{label} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(common, ys.min(0), ys.max(0), color=colour, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    return _finish(fig, [ax], title)


# ---------------------------------------------------------------------------------------------------------
# Two-moons decision boundaries (Fig. 4)
# ---------------------------------------------------------------------------------------------------------
def decision_boundary_panel(ax, run, eps: float, title: str, grid: int = 220) -> None:
    """Fig. 4 style: the boundary f₀ = f₁ in black, the ±ε margins (f₀ − f₁)/K₀₁ = ±ε in grey, training
    points by class, misclassified or non-certified training points in red, CRA and K(h∘f) in a corner."""
    x, y = run.data("train")
    lo = x.min(0).values.numpy() - 0.5
    hi = x.max(0).values.numpy() + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid))
    pts = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    logits = predict(run.model, pts, torch.float64)
    K01 = float(run.bound.pairwise(2)[0, 1])
    z = ((logits[:, 0] - logits[:, 1]) / K01).numpy().reshape(gx.shape)
    ax.contourf(gx, gy, z > 0, levels=[-0.5, 0.5, 1.5], colors=["#dbe8f6", "#f6e6d5"], alpha=0.6)
    ax.contour(gx, gy, z, levels=[-eps, eps], colors="0.55", linewidths=0.9)
    ax.contour(gx, gy, z, levels=[0.0], colors="k", linewidths=1.3)
    train_logits = run.logits(x)
    ok = certified(train_logits, run.bound, eps, 2) & (train_logits.argmax(1) == y)
    xs, ys, oks = x.numpy(), y.numpy(), ok.numpy()
    for cls, colour in ((0, "#1f77b4"), (1, "#ff7f0e")):
        m = (ys == cls) & oks
        ax.scatter(xs[m, 0], xs[m, 1], s=2, c=colour, linewidths=0)
    ax.scatter(xs[~oks, 0], xs[~oks, 1], s=4, c="red", linewidths=0)
    result = run.result
    cra = result["eval"]["train"]["cra"].get(f"{eps:g}")
    text = f"CRA {100 * cra:.1f}%\n$K^{{(h\\circ f)}}$ = {result['K_hf']:.3g}" if cra is not None else ""
    ax.text(0.02, 0.03, text, transform=ax.transAxes, fontsize=7, va="bottom",
            bbox=dict(facecolor="white", alpha=0.8, linewidth=0))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("$x_1$", fontsize=7)
    ax.set_ylabel("$x_2$", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_aspect("equal")


def decision_boundary_figure(panels: Sequence[Sequence[tuple]], path_stem: Optional[Path] = None,
                             max_cols: int = 4):
    """panels: rows of (run, ε, title), e.g. one row per method and one column per ε; a row longer than
    `max_cols` wraps. Saved (paths returned) when a path is given, else the Figure is returned."""
    panels = [row[i:i + max_cols] for row in panels for i in range(0, len(row), max_cols)]
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.0 * n_rows), squeeze=False)
    for i, row in enumerate(panels):
        for j in range(n_cols):
            if j < len(row):
                decision_boundary_panel(axes[i][j], *row[j])
            else:
                axes[i][j].axis("off")
    fig.tight_layout()
    return save(fig, path_stem) if path_stem is not None else fig
