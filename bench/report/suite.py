"""What `bench suite` writes after its runs: the table (Markdown, LaTeX, CSV) and, for 2-d data, the
decision-boundary figure, under <results>/<suite>/."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from bench import store
from bench.config import config_hash
from bench.report import tables


def suite_runs_on_disk(cfgs: List[Dict], results: Path):
    """(result, config) of this suite's finished runs, in suite order."""
    out = []
    for cfg in cfgs:
        folder = store.run_dir(results, cfg)
        res = store.result_or_none(folder)
        if res is not None:
            out.append((res, store.read_config(folder)))
    return out


def write_suite_outputs(suite: Dict, cfgs: List[Dict], results: Path) -> Dict[str, Path]:
    runs = suite_runs_on_disk(cfgs, results)
    outdir = Path(results) / str(suite["name"])
    outdir.mkdir(parents=True, exist_ok=True)
    seeds = suite.get("seeds") if isinstance(suite.get("seeds"), int) else None
    splits = tables._default_splits(runs)
    written: Dict[str, Path] = {}
    md_parts, tex_parts, csv_parts = [], [], []
    for split in splits:
        _, display = tables.build_table(runs, split, seeds)
        title = f"{suite['name']}: {split} split"
        md_parts.append(f"### {title}\n\n" + tables.render(display, "md"))
        tex_parts.append(tables.to_latex(display, f"{title}. " + tables.CAPTION, f"tab:{suite['name']}-{split}"))
        csv_parts.append(display.assign(split=split))
    md = "\n\n".join(md_parts) + "\n"
    print(md)
    for name, text in (("table.md", md), ("table.tex", "\n\n".join(tex_parts) + "\n")):
        store.atomic_write_text(outdir / name, text)
        written[name] = outdir / name
    import pandas as pd

    store.atomic_write_text(outdir / "table.csv", pd.concat(csv_parts).to_csv(index=False))
    written["table.csv"] = outdir / "table.csv"
    from bench.registry import DATASETS

    if runs and all(tuple(getattr(DATASETS.get(r["dataset"]), "input_shape", ())) == (2,) for r, _ in runs):
        written.update(_boundary_figure(runs, results, outdir))
    return written


def _boundary_figure(runs, results: Path, outdir: Path) -> Dict[str, Path]:
    """One panel per method × ε, from each cell's lowest complete seed."""
    from bench.report.figures import decision_boundary_figure

    first: Dict[str, tuple] = {}
    for res, cfg in runs:
        if res["status"] != "complete":
            continue
        h = config_hash(cfg)
        if h not in first or res["seed"] < first[h][0]["seed"]:
            first[h] = (res, cfg)
    by_method: Dict[str, list] = {}
    for res, cfg in sorted(first.values(), key=lambda rc: (rc[1]["method"], float(rc[1].get("eps") or 0))):
        run = store.load_run(store.run_dir(results, cfg))
        eps = float(cfg["eps"])
        by_method.setdefault(cfg["method"], []).append((run, eps, f"{cfg['method']}  ε = {eps:g}  (seed {res['seed']})"))
    if not by_method:
        return {}
    paths = decision_boundary_figure(list(by_method.values()), outdir / "decision_boundary")
    return {p.name: p for p in paths}
