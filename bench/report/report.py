"""`bench report SUITE`: one Markdown page for a suite, written from its result.json files only.

<results>/<suite>/report.md holds the suite's description, a status line (runs complete, diverged, missing,
total train time, devices), its tables per evaluation split, the paper-vs-measured table, the figures
(embedded PNG, PDF beside them), the run count, train time and device of every cell, and the per-seed appendix.
Short runs (fewer epochs than the protocol, or a training subset) are flagged at the top and in every table.

Which figures a suite gets follows from its results, never from method names:
* CRA against ε from the certified radii of every complete run (always);
* CRA against epoch from metrics.csv (when runs evaluated more than one epoch);
* the slack figure when `p` takes several values within a method/arch/dataset group (Fig. 5, left);
* CRA, K and tightness against the training ε when `eps` takes several values (Fig. 5, right);
* the decision-boundary grid for 2-d data (Fig. 4).
A suite may restrict them with `table: {figures: [cra_vs_eps, cra_vs_epoch, slack, eps_sweep, decision_boundary]}`;
`figures_for_folders` draws the same figures for any hand-picked set of run folders.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from bench import store
from bench.loaded_run import load_run
from bench.certify import parse_eps
from bench.config import config_hash
from bench.report import paper, tables

FIGURES = ("cra_vs_eps", "cra_vs_epoch", "slack", "eps_sweep", "decision_boundary")


# ---------------------------------------------------------------------------------------------------------
# What is on disk
# ---------------------------------------------------------------------------------------------------------
def cells_of(cfgs: Sequence[dict]) -> List[Tuple[str, dict, List[dict]]]:
    """(hash, representative config, configs of all its seeds) per cell, in suite order."""
    out: Dict[str, Tuple[dict, List[dict]]] = {}
    for cfg in cfgs:
        out.setdefault(config_hash(cfg), (cfg, []))[1].append(cfg)
    return [(h, c, seeds) for h, (c, seeds) in out.items()]


def runs_on_disk(cfgs: Sequence[dict], results: Path) -> Tuple[List[Tuple[dict, dict]], List[str]]:
    """(result, config) of every finished run of `cfgs`, and a line per corrupt run."""
    runs, problems = [], []
    for cfg in cfgs:
        folder = store.run_dir(results, cfg)
        try:
            res = store.result_or_none(folder)
        except store.CorruptRunError as e:
            problems.append(str(e))
            continue
        if res is not None:
            runs.append((res, store.read_config(folder)))
    return runs, problems


def _minutes(seconds: float) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.1f} min" if seconds < 7200
                                                    else f"{seconds / 3600:.1f} h")


def cell_summary(cfgs: Sequence[dict], runs: Sequence[Tuple[dict, dict]]) -> pd.DataFrame:
    """Per cell: expected seeds, complete, diverged, missing, total train time, device(s), commit(s)."""
    by_hash: Dict[str, List[dict]] = {}
    for res, _ in runs:
        by_hash.setdefault(res["config_hash"], []).append(res)
    labels = tables.settings_by_hash([({"config_hash": config_hash(c)}, c) for c in cfgs])
    rows = []
    for h, cfg, seeds in cells_of(cfgs):
        got = by_hash.get(h, [])
        complete = [r for r in got if r["status"] == "complete"]
        secs = sum(float(r.get("train_seconds") or 0.0) for r in got)
        rows.append({"Method": cfg["method"], "Arch": cfg["arch"], "Dataset": cfg["dataset"],
                     "Setting": labels.get(h, ""), "Seeds": len(seeds), "Complete": len(complete),
                     "Diverged": sum(r["status"] == "diverged" for r in got), "Missing": len(seeds) - len(got),
                     "Train time": _minutes(secs) if complete else "–", "train_seconds": secs,
                     "Device": "; ".join(sorted({str(r.get("device")) for r in complete if r.get("device")})) or "–",
                     "Commit": "; ".join(sorted({str(r.get("commit")) for r in got if r.get("commit")})) or "–",
                     "Short": tables.short_note(cfg), "hash": h})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------
def _series_labels(runs, swept: Sequence[str] = ()) -> Dict[str, str]:
    settings = tables.settings_by_hash(runs, exclude=swept)
    return {r["config_hash"]: f"{r['method']}@{r['arch']}" + (f" ({settings[r['config_hash']]})"
                                                             if settings.get(r["config_hash"]) else "")
            for r, _ in runs}


def _complete_by_hash(runs) -> Dict[str, List[Tuple[dict, dict]]]:
    """Complete runs per cell, cells ordered by dataset, method, arch and training ε."""
    out: Dict[str, List[Tuple[dict, dict]]] = {}

    def order(rc):
        cfg = rc[1]
        eps = cfg.get("eps")
        return (cfg["dataset"], cfg["method"], cfg["arch"], float(eps) if isinstance(eps, (int, float)) else 0.0,
                rc[0]["config_hash"], rc[0]["seed"])

    for res, cfg in sorted(runs, key=order):
        if res["status"] == "complete":
            out.setdefault(res["config_hash"], []).append((res, cfg))
    return out


def _named_eps(runs) -> List[float]:
    out = set()
    for res, _ in runs:
        for name in ((res.get("eval") or {}).get("test") or {}).get("cra", {}):
            try:
                out.add(round(parse_eps(name), 12))
            except ValueError:
                pass
    return sorted(out)


def _ceiling_points(runs, split: str) -> List[Tuple[float, float, float, float]]:
    """(ε, mean, min, max) of the CRA ceilings recorded in result.json (`eval[split].cra_ceiling`), one per data
    realisation (dataset, data seed) and ε."""
    from bench.train import resolve_eps_names

    seen: Dict[Tuple[float, str], float] = {}
    for res, cfg in runs:
        ceil = ((res.get("eval") or {}).get(split) or {}).get("cra_ceiling") or {}
        eps = resolve_eps_names(cfg)
        data_key = f"{cfg.get('dataset')}/{cfg.get('data_seed') or cfg.get('seed')}/{cfg.get('n_train')}"
        for name, value in ceil.items():
            if name in eps:
                seen[(round(float(eps[name]), 12), data_key)] = float(value)
    by_eps: Dict[float, List[float]] = {}
    for (e, _), v in seen.items():
        by_eps.setdefault(e, []).append(v)
    return [(e, sum(v) / len(v), min(v), max(v)) for e, v in sorted(by_eps.items())]


class RunCache:
    """Each run loaded (model, converged bound, data) once per report, shared by the figures. Run folders are
    found below `results`, or looked up in `folders` ((config hash, seed) → folder) for arbitrary runs."""

    def __init__(self, results: Optional[Path] = None, folders: Optional[Dict[Tuple[str, int], Path]] = None):
        self.results = Path(results) if results is not None else None
        self.folders = dict(folders or {})
        self._runs: Dict[str, object] = {}

    def folder(self, cfg: dict) -> Path:
        found = self.folders.get((config_hash(cfg), int(cfg["seed"])))
        return found if found is not None else store.run_dir(self.results, cfg)

    def __call__(self, cfg: dict):
        folder = self.folder(cfg)
        if str(folder) not in self._runs:
            self._runs[str(folder)] = load_run(folder)
        return self._runs[str(folder)]


def fig_cra_vs_eps(runs, load: RunCache, outdir: Path, split: str = "test"):
    from bench.report import figures

    labels = _series_labels(runs)
    curves = []
    for h, members in _complete_by_hash(runs).items():
        if any(r.get("K_f_local") for r, _ in members):
            continue  # an input-aware certificate holds per ε, not up to a radius: it has no curve (tables only)
        seeds = [figures.correct_radii(load(cfg), split)
                 for _, cfg in sorted(members, key=lambda rc: rc[0]["seed"])]
        curves.append((labels[h], seeds))
    if not curves:
        return None
    marks = _named_eps(runs)
    ceiling = _ceiling_points(runs, split)
    fig = figures.cra_vs_eps_figure(curves, split, marks=marks, ceiling=ceiling)
    paths = figures.save(fig, outdir / "cra_vs_eps")
    caption = (f"Certified robust accuracy on the {split} split against ε over a fine grid, from each run's "
               "certified radii (a point counts at ε iff it is classified correctly and its radius exceeds ε); "
               "line: mean over seeds, band: range over seeds; dotted: the radii the tables report.")
    if ceiling:
        caption += (" Black: the data's CRA ceiling at those radii, the best any classifier can certify on the same "
                    "points (mean and range over the seeds' data; bench/data/ceiling.py).")
    return "Certified robust accuracy against ε", paths, caption


def _epoch_column(cfg: dict, rows: Sequence[dict]) -> Optional[str]:
    cols = [c for c in (rows[0] if rows else {}) if c.startswith("test_cra@")]
    for want in ("test_cra@36/255", f"test_cra@{float(cfg['eps']):g}" if cfg.get("eps") is not None else None):
        if want in cols:
            return want
    return cols[0] if cols else None


def fig_cra_vs_epoch(runs, load: RunCache, outdir: Path):
    from bench.report import figures

    labels = _series_labels(runs)
    curves, names = [], set()
    for h, members in _complete_by_hash(runs).items():
        seeds = []
        for res, cfg in members:
            rows = store.read_metrics(load.folder(cfg))
            col = _epoch_column(cfg, rows)
            if col is None:
                continue
            ep, val = figures.epoch_series(rows, col)
            if len(ep) > 1:
                seeds.append((ep, val))
                names.add(col[len("test_cra@"):])
        if seeds:
            curves.append((labels[h], seeds))
    if not curves:
        return None
    at = f"ε = {names.pop()}" if len(names) == 1 else "each cell's ε_train"
    fig = figures.cra_vs_epoch_figure(curves, f"test CRA (%) at {at}")
    paths = figures.save(fig, outdir / "cra_vs_epoch")
    caption = (f"Test CRA at {at} against epoch, from metrics.csv (evaluated every `eval_every` epochs; as the "
               "paper's Fig. D1); line: mean over seeds, band: range over seeds.")
    return "CRA against epoch", paths, caption


def _sweep_points(runs, key: str, split: str = "test") -> pd.DataFrame:
    """Aggregated cells of the groups (method/arch/dataset and every other setting) in which `key` takes more
    than one value, with x = the key's (final) value."""
    from bench.schedules import final_value

    agg, _ = tables.build_table(runs, split)
    if agg.empty:
        return agg
    cfg_by_hash = {r["config_hash"]: c for r, c in runs}
    labels = _series_labels(runs, swept=(key,))
    agg = agg[agg["n"] > 0].copy()
    agg["x"] = [final_value(cfg_by_hash[h][key]) if cfg_by_hash[h].get(key) is not None else float("nan")
                for h in agg["config_hash"]]
    agg["series"] = agg["config_hash"].map(labels)
    counts = agg.groupby("series")["x"].nunique()
    return agg[agg["series"].isin(counts[counts > 1].index)]


def fig_slack(runs, outdir: Path):
    from bench.report import figures

    pts = _sweep_points(runs, "p")
    if pts.empty:
        return None
    cra = next((m for m in ("CRA@36/255", "CRA@ε_train") if f"{m}_mean" in pts and pts[f"{m}_mean"].notna().any()),
               None)
    if cra is None:
        return None
    fig = figures.slack_figure(pts, cra)
    paths = figures.save(fig, outdir / "slack")
    what = "36/255" if cra == "CRA@36/255" else "the training ε"
    caption = (f"Slack p against test clean accuracy (solid) and CRA at {what} (dashed), mean ± std over seeds "
               "(the reference paper's Fig. 5, left; p is the official err_quantile q, the value its tables print).")
    return "Slack: p against clean accuracy and CRA", paths, caption


def fig_eps_sweep(runs, outdir: Path):
    from bench.report import figures

    pts = _sweep_points(runs, "eps")
    if pts.empty:
        return None
    fig = figures.eps_sweep_figure(pts)
    paths = figures.save(fig, outdir / "eps_sweep")
    caption = ("Against the training ε (mean ± std over seeds): CRA at ε_test = ε_train, the Lipschitz bounds "
               "K(h∘f) (solid) and K(f) (dashed), and tightness (the reference paper's Fig. 5, right).")
    return "K(h∘f), K(f) and tightness against ε_train", paths, caption


def fig_decision_boundary(runs, load: RunCache, outdir: Path):
    """One panel per cell (its lowest complete seed): one row per method, columns ordered by ε, then p."""
    from bench.registry import DATASETS
    from bench.report.figures import decision_boundary_figure
    from bench.schedules import final_value

    if not runs or not all(tuple(getattr(DATASETS.get(r["dataset"]), "input_shape", ())) == (2,) for r, _ in runs):
        return None
    first: Dict[str, Tuple[dict, dict]] = {}
    for res, cfg in runs:
        if res["status"] == "complete" and cfg.get("eps") is not None:
            h = res["config_hash"]
            if h not in first or res["seed"] < first[h][0]["seed"]:
                first[h] = (res, cfg)
    if not first:
        return None
    labels = tables.settings_by_hash(runs)

    def order(rc):
        cfg = rc[1]
        p = cfg.get("p")
        return (cfg["method"], float(cfg["eps"]), -final_value(p) if p is not None else 0.0)

    by_method: Dict[str, list] = {}
    for res, cfg in sorted(first.values(), key=order):
        run = load(cfg)
        title = f"{cfg['method']}  {labels.get(res['config_hash']) or 'ε = %g' % float(cfg['eps'])}  (seed {res['seed']})"
        by_method.setdefault(cfg["method"], []).append((run, float(cfg["eps"]), title))
    paths = decision_boundary_figure(list(by_method.values()), outdir / "decision_boundary")
    caption = ("Decision boundary f₀ = f₁ (black) and the certified margins (f₀ − f₁)/K₀₁ = ±ε (grey) on the "
               "training set; red: misclassified or not certified at the training ε; CRA (train) and K(h∘f) in "
               "the corner (as the reference paper's Fig. 4).")
    return "Decision boundaries", paths, caption


def write_figures(runs, results: Optional[Path], outdir: Path, wanted: Sequence[str] = FIGURES,
                  verbose: bool = False, folders: Optional[Dict[Tuple[str, int], Path]] = None):
    """Each wanted figure the results support, as (title, [png, pdf], caption); failures become notes."""
    made, notes = [], []
    load = RunCache(results, folders)
    builders = {"cra_vs_eps": lambda: fig_cra_vs_eps(runs, load, outdir),
                "cra_vs_epoch": lambda: fig_cra_vs_epoch(runs, load, outdir),
                "slack": lambda: fig_slack(runs, outdir),
                "eps_sweep": lambda: fig_eps_sweep(runs, outdir),
                "decision_boundary": lambda: fig_decision_boundary(runs, load, outdir)}
    unknown = [w for w in wanted if w not in builders]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    for name in wanted:
        start = time.time()
        try:
            fig = builders[name]()
        except (store.CorruptRunError, OSError, RuntimeError, ValueError, KeyError) as e:
            notes.append(f"figure {name} not drawn: {type(e).__name__}: {e}")
            print(f"bench: note: {notes[-1]}", file=sys.stderr)
            continue
        if fig is not None:
            made.append(fig)
            if verbose:
                print(f"figure {name}: {time.time() - start:.1f} s", file=sys.stderr)
    return made, notes


def figures_for_folders(folders: Sequence[Path], outdir: Path, wanted: Sequence[str] = FIGURES):
    """The report's figures for any set of finished run folders (e.g. a hand-picked CLL and GloRo run):
    `figures_for_folders(["results/cifar10/cll/4c3f/<hash>/seed-1", ...], "figs")` → ([(title, paths, caption)],
    notes)."""
    runs, where = [], {}
    for f in map(Path, folders):
        res = store.read_result(f)
        runs.append((res, store.read_config(f)))
        where[(res["config_hash"], int(res["seed"]))] = f
    return write_figures(runs, None, Path(outdir), wanted, folders=where)


# ---------------------------------------------------------------------------------------------------------
# Guaranteed vs power-iteration bounds
# ---------------------------------------------------------------------------------------------------------
def bound_gap_frames(runs, splits: Sequence[str]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(per-layer, per-CRA) gaps between the guaranteed bounds (the certificate) and the converged power
    iteration (the paper's way), over each cell's complete seeds.

    Per layer: the mean of each bound and the largest relative gap guaranteed/power − 1 over the seeds.
    Per CRA: mean guaranteed CRA, mean power-iteration CRA and their difference in points, per split and ε."""
    labels = tables.settings_by_hash(runs)
    layers, cras = [], []
    for h, group in _complete_by_hash(runs).items():
        _, cfg0 = group[0]
        ident = {"Method": cfg0["method"], "Arch": cfg0["arch"], "Setting": labels.get(h, "")}
        guaranteed = [r.get("layer_bounds") or [] for r, _ in group]
        power = [r.get("layer_bounds_power") or [] for r, _ in group]
        for i in range(min(map(len, guaranteed + power), default=0)):
            g = [b[i] for b in guaranteed]
            pw = [b[i] for b in power]
            gaps = [gi / pi - 1.0 for gi, pi in zip(g, pw) if pi > 0]
            layers.append({**ident, "Layer": i + 1, "Guaranteed": f"{sum(g) / len(g):.6g}",
                           "Power it.": f"{sum(pw) / len(pw):.6g}",
                           "Gap (max over seeds)": f"{max(gaps):.2e}" if gaps else "–"})
        for split in splits:
            evs = [(r.get("eval") or {}).get(split) or {} for r, _ in group]
            for name in (evs[0].get("cra") or {}):
                g = [ev["cra"][name] for ev in evs if name in (ev.get("cra") or {})]
                pw = [ev["cra_power"][name] for ev in evs if name in (ev.get("cra_power") or {})]
                if not g or len(pw) != len(g):
                    continue
                mg, mp = 100 * sum(g) / len(g), 100 * sum(pw) / len(pw)
                cras.append({**ident, "Split": split, "ε": name, "CRA guaranteed (%)": f"{mg:.2f}",
                             "CRA power it. (%)": f"{mp:.2f}", "Δ (points)": f"{mg - mp:+.2f}".replace("-", "−")})
    frames = [pd.DataFrame(layers), pd.DataFrame(cras)]
    return tuple(f.drop(columns="Setting") if not f.empty and not f["Setting"].astype(bool).any() else f
                 for f in frames)


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------
def _status_line(summary: pd.DataFrame) -> str:
    total = int(summary["Seeds"].sum())
    complete, diverged, missing = (int(summary[c].sum()) for c in ("Complete", "Diverged", "Missing"))
    devices = sorted({d for ds in summary["Device"] for d in str(ds).split("; ") if d and d != "–"})
    commits = sorted({c for cs in summary["Commit"] for c in str(cs).split("; ") if c and c != "–"})
    return (f"**Runs:** {complete} of {total} complete · {diverged} diverged · {missing} missing · "
            f"{len(summary)} cells · total train time {_minutes(float(summary['train_seconds'].sum()))} · "
            f"device: {'; '.join(devices) or '–'} · commit: {'; '.join(commits) or '–'}")


def write_report(suite: dict, cfgs: Sequence[dict], results: Path, figures: bool = True,
                 quiet: bool = False) -> Dict[str, Path]:
    """Tables (md, tex, csv), per-seed appendix, paper-vs-measured, figures and report.md for a suite."""
    results = Path(results)
    name = str(suite["name"])
    outdir = results / name
    outdir.mkdir(parents=True, exist_ok=True)
    runs, problems = runs_on_disk(cfgs, results)
    seeds_expected = suite.get("seeds") if isinstance(suite.get("seeds"), int) else None
    options = suite.get("table") or {}
    baseline = options.get("baseline")
    if baseline and baseline != tables.DEFAULTS_BASELINE and not any(all(str(c.get(k)) == v for k, v in tables.parse_baseline(baseline).items())
                            for _, c in runs):
        baseline = None  # the baseline's runs are not there (yet): no deltas rather than an error
    splits = list(options.get("splits") or tables.default_splits(runs)) if runs else ["test"]
    written: Dict[str, Path] = {}

    # tables
    md, tex, csv, seed_md, seed_tex = [], [], [], [], []
    for i, split in enumerate(splits):
        _, display = tables.build_table(runs, split, seeds_expected, baseline)
        title = f"{name}: {split} split"
        md.append((split, tables.render(display, "md")))
        tex.append(tables.to_latex(display, f"{title}. " + tables.caption_for(display), f"tab:{name}-{split}"))
        if not display.empty:
            csv.append(tables.numeric_frame(display).assign(split=split))
        seeds = tables.per_seed_frame(runs, split, seeds_expected, split_metrics_only=i > 0)
        seed_md.append((split, tables.to_markdown(seeds)))
        seed_tex.append(tables.to_latex(seeds, f"{title}, every seed. " + tables.PER_SEED_CAPTION,
                                        f"tab:{name}-{split}-seeds"))
    table_md = "\n\n".join(f"### {name}: {sp} split\n\n{t}" for sp, t in md) + "\n"
    files = {"table.md": table_md, "table.tex": "\n\n".join(tex) + "\n",
             "table.csv": pd.concat(csv).to_csv(index=False) if csv else "",
             "table_per_seed.md": "\n\n".join(f"### {sp} split\n\n{t}\n\n{tables.PER_SEED_CAPTION}"
                                              for sp, t in seed_md) + "\n",
             "table_per_seed.tex": "\n\n".join(seed_tex) + "\n"}

    # paper vs measured
    own = bool(suite.get("paper"))
    cells = paper.cells_for(suite)           # a suite without a `paper:` block borrows the other suites' numbers
    vs = paper.vs_paper_frame(runs, cells, seeds_expected, include_missing=own)
    cells = cells if own or not vs.empty else []
    if cells:
        files["paper_vs_measured.md"] = paper.render(vs, "md") + "\n"
        files["paper_vs_measured.tex"] = paper.render(vs, "tex") + "\n"
        files["paper_vs_measured.csv"] = paper.render(vs, "csv")
    for fname, text in files.items():
        store.atomic_write_text(outdir / fname, text)
        written[fname] = outdir / fname
    if not quiet:
        print(table_md)

    # figures
    made, notes = [], []
    if figures and runs:
        made, notes = write_figures(runs, results, outdir, options.get("figures") or FIGURES, verbose=not quiet)
        for _, paths, _ in made:
            written.update({p.name: p for p in paths})

    # the page
    summary = cell_summary(cfgs, runs)
    short = summary[summary["Short"].astype(bool)]
    page = [f"# Suite `{name}`", str(suite.get("description") or "").strip(), _status_line(summary)]
    if not short.empty:
        page.append(f"> **⚠ Short runs.** {len(short)} of {len(summary)} cells trained for fewer epochs than the "
                    f"protocol or on a training subset ({'; '.join(sorted(set(short['Short'])))}). Their numbers "
                    "show that the pipeline runs; they are **not** reproductions of the paper.")
    for sp, t in md:
        page.append(f"## Results: {sp} split\n\n{t}")
    if cells:
        page.append("## Paper vs measured\n\n" + paper.render(vs, "md"))
    layer_gaps, cra_gaps = bound_gap_frames(runs, splits)
    if not cra_gaps.empty or not layer_gaps.empty:
        page.append("## Guaranteed vs power-iteration bounds\n\nCertificates use only guaranteed per-layer bounds; "
                    "the converged power iteration (how papers compute K) approaches each norm from below. "
                    "Gap = guaranteed / power − 1 per layer (0 where a layer's bound is exact by construction).\n\n"
                    + (tables.to_markdown(cra_gaps) + "\n\n" if not cra_gaps.empty else "")
                    + (tables.to_markdown(layer_gaps) if not layer_gaps.empty else ""))
    if made:
        page.append("## Figures")
        for title, paths, caption in made:
            png = next(p for p in paths if p.suffix == ".png")
            pdf = next((p for p in paths if p.suffix == ".pdf"), None)
            page.append(f"### {title}\n\n![{title}]({png.name})\n\n{caption}" +
                        (f" ([PDF]({pdf.name}))" if pdf else ""))
    cols = ["Method", "Arch", "Setting", "Seeds", "Complete", "Diverged", "Missing", "Train time", "Device"]
    shown = summary[cols + (["Dataset"] if summary["Dataset"].nunique() > 1 else [])].copy()
    if not shown["Setting"].astype(bool).any():
        shown = shown.drop(columns="Setting")
    shown["Note"] = summary["Short"].map(lambda s: f"short run ({s})" if s else "")
    if not shown["Note"].astype(bool).any():
        shown = shown.drop(columns="Note")
    page.append("## Runs per cell\n\n" + tables.to_markdown(shown) +
                "\n\nTrain time is the sum over the cell's finished runs (training only, without evaluation).")
    page.append("## Appendix: every seed\n\n" + "\n\n".join(f"### {sp} split\n\n{t}" for sp, t in seed_md) +
                f"\n\n{tables.PER_SEED_CAPTION}")
    if problems or notes:
        page.append("## Problems\n\n" + "\n".join(f"- {p}" for p in problems + notes))
    page.append("---\nGenerated by `bench report " + name + "` from " + f"{len(runs)} result.json files; every "
                "number above is computed from them, none is typed. Files: " +
                ", ".join(f"[{f}]({f})" for f in sorted(files) if f.endswith((".tex", ".csv"))) + ".")
    report = "\n\n".join(p for p in page if p) + "\n"
    store.atomic_write_text(outdir / "report.md", report)
    written["report.md"] = outdir / "report.md"
    return written


def table_for_folder(results: Path, suite_name: Optional[str] = None, fmt: str = "md",
                     split: Optional[str] = None, baseline: Optional[str] = None, per_seed: bool = False,
                     vs_paper: bool = False, power: bool = False) -> str:
    """`bench table`: the tables of every run below `results` (or of one suite), per split, with the per-seed
    appendix and the paper comparison when asked."""
    if not Path(results).exists():
        raise FileNotFoundError(f"no results folder {results}")
    runs, problems = tables.collect(Path(results))
    runs, seeds_expected, suite = tables.suite_filter(runs, suite_name)
    if suite is not None and baseline is None:
        baseline = (suite.get("table") or {}).get("baseline")
    out = []
    splits = [split] if split else tables.default_splits(runs)
    for i, sp in enumerate(splits):
        _, display = tables.build_table(runs, sp, seeds_expected, baseline, power)
        if len(splits) > 1:
            out.append(f"### {sp} split\n" if fmt == "md" else (f"% {sp} split" if fmt == "tex" else ""))
        out.append(tables.render(display, fmt))
        if per_seed:
            seeds = tables.per_seed_frame(runs, sp, seeds_expected, split_metrics_only=i > 0, power=power)
            body = (tables.to_markdown(seeds) + "\n\n" + tables.PER_SEED_CAPTION if fmt == "md" else
                    tables.to_latex(seeds, tables.PER_SEED_CAPTION) if fmt == "tex" else seeds.to_csv(index=False))
            out.append((f"#### Per-seed results ({sp} split)\n" if fmt == "md" else "") + body)
    if vs_paper:
        cells = paper.cells_for(suite)
        own = suite is not None and bool(suite.get("paper"))
        frame = paper.vs_paper_frame(runs, cells, seeds_expected, include_missing=own)
        out.append(paper.render(frame, fmt))
    if problems:
        out.append("\n".join(f"corrupt run skipped: {p}" for p in problems))
    return "\n\n".join(o for o in out if o)
