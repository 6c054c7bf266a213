"""Figures drawn from finished runs only (matplotlib, written as PNG and PDF)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.certify import certified, predict  # noqa: E402


def save(fig, path_stem: Path) -> List[Path]:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def decision_boundary_panel(ax, run, eps: float, title: str, grid: int = 400) -> None:
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
    ok = certified(run.logits(x), run.bound, eps, 2) & (run.logits(x).argmax(1) == y)
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


def decision_boundary_figure(panels: Sequence[Sequence[tuple]], path_stem: Path) -> List[Path]:
    """panels: rows of (run, ε, title). One row per method, one column per ε."""
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.0 * n_rows), squeeze=False)
    for i, row in enumerate(panels):
        for j in range(n_cols):
            if j < len(row):
                decision_boundary_panel(axes[i][j], *row[j])
            else:
                axes[i][j].axis("off")
    fig.tight_layout()
    return save(fig, path_stem)
