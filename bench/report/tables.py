"""Paper-style tables from run folders.

One pandas frame holds one row per run; `aggregate` groups runs that share a config (all but the seed) into
mean ± std (sample std, ddof = 1) over complete seeds, with the seed count n and the diverged count beside it.
Markdown, LaTeX (booktabs) and CSV are all rendered from that one frame, so they cannot drift apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from bench import store

IDENTITY = ("method", "arch", "dataset")
#: config keys never shown as a distinguishing setting (they are the row identity or execution details)
_NOT_SETTINGS = set(IDENTITY) | {"seed", "device", "threads", "eval_batch", "checkpoint_every", "data_root",
                                 "download", "cert_eps", "eval_every"}


def collect(results: Path) -> Tuple[List[Tuple[dict, dict]], List[str]]:
    """(result, config) of every finished run below `results`, and a line per corrupt or unreadable run."""
    runs, problems = [], []
    for folder in store.find_runs(results):
        if not (folder / store.RESULT).exists():
            continue
        try:
            runs.append((store.read_result(folder), store.read_config(folder)))
        except store.CorruptRunError as e:
            problems.append(str(e))
    return runs, problems


def _short_note(cfg: dict) -> str:
    notes = []
    if cfg.get("train_subset"):
        notes.append(f"subset {int(cfg['train_subset'])}")
    proto = cfg.get("protocol_epochs")
    if proto and int(cfg["epochs"]) < int(proto):
        notes.append(f"{int(cfg['epochs'])}/{int(proto)} ep")
    return ", ".join(notes)


def run_frame(runs: Iterable[Tuple[dict, dict]], split: str = "test") -> pd.DataFrame:
    """One row per run: identity, hash, seed, status, the split's clean/CRA, K(f), K(h∘f), tightness, ..."""
    rows = []
    for result, cfg in runs:
        row = {k: result[k] for k in IDENTITY}
        row.update(config_hash=result["config_hash"], seed=result["seed"], status=result["status"],
                   short=_short_note(cfg), eps_train=cfg.get("eps"))
        ev = (result.get("eval") or {}).get(split) or {}
        row["clean"] = ev.get("clean")
        for name, value in (ev.get("cra") or {}).items():
            if cfg.get("eps") is not None and "eps" in (cfg.get("cert_eps") or []) and name == f"{float(cfg['eps']):g}":
                name = "ε_train"
            row[f"CRA@{name}"] = value
        for key in ("K_f", "K_hf", "tightness", "lower_bound", "params", "train_seconds"):
            row[key] = result.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def settings_by_hash(runs: Iterable[Tuple[dict, dict]]) -> Dict[str, str]:
    """For each config hash, the keys whose values differ among configs of the same method/arch/dataset
    (e.g. 'eps=0.15'), so rows are labelled by what actually differs between them."""
    configs = {result["config_hash"]: cfg for result, cfg in runs}
    groups: Dict[tuple, List[dict]] = {}
    for cfg in configs.values():
        groups.setdefault(tuple(cfg[k] for k in IDENTITY), []).append(cfg)
    labels = {}
    for h, cfg in configs.items():
        peers = groups[tuple(cfg[k] for k in IDENTITY)]
        varying = sorted(k for k in cfg if k not in _NOT_SETTINGS and len({repr(p.get(k)) for p in peers}) > 1)
        labels[h] = ", ".join(f"{k}={_fmt_setting(cfg.get(k))}" for k in varying)
    return labels


def _fmt_setting(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict) and v.get("schedule"):
        return f"{v['schedule']}({v.get('start', '')}→{v.get('end', '')})"
    return str(v)


METRIC_ORDER = ("clean", "CRA@ε_train", "CRA@36/255", "CRA@72/255", "CRA@108/255", "K_f", "K_hf", "tightness")
PERCENT = {"clean", "tightness"}


def metric_columns(df: pd.DataFrame) -> List[str]:
    cras = [c for c in df.columns if c.startswith("CRA@")]
    ordered = [c for c in METRIC_ORDER if c in df.columns or c in cras]
    return ordered + sorted(c for c in cras if c not in ordered)


def aggregate(df: pd.DataFrame, seeds_expected: Optional[int] = None) -> pd.DataFrame:
    """mean, std (ddof=1), n over complete runs per config; diverged runs are counted, never averaged."""
    if df.empty:
        return df
    metrics = metric_columns(df)
    keys = ["method", "arch", "dataset", "config_hash"]
    out = []
    for key, g in df.groupby(keys, sort=False):
        ok = g[g.status == "complete"]
        row = dict(zip(keys, key))
        row["setting"] = g["setting"].iloc[0] if "setting" in g else ""
        row["short"] = g["short"].iloc[0]
        row["eps_train"] = g["eps_train"].iloc[0]
        row["n"] = len(ok)
        row["diverged"] = int((g.status == "diverged").sum())
        row["seeds_expected"] = seeds_expected
        for m in metrics:
            vals = pd.to_numeric(ok[m], errors="coerce").dropna() if m in ok else pd.Series(dtype=float)
            row[f"{m}_mean"] = vals.mean() if len(vals) else float("nan")
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
        row["params"] = ok["params"].iloc[0] if len(ok) and "params" in ok else None
        out.append(row)
    agg = pd.DataFrame(out)
    return agg.sort_values(["dataset", "arch", "method", "eps_train"], na_position="last", kind="stable")


HEADERS = {"clean": "Clean (%)", "CRA@ε_train": "CRA@ε (%)", "K_f": "K(f)", "K_hf": "K(h∘f)",
           "tightness": "Tightness (%)"}


def _header(m: str) -> str:
    if m in HEADERS:
        return HEADERS[m]
    if m.startswith("CRA@"):
        return f"CRA {m[4:]} (%)"
    return m


def _cell(agg_row, m: str) -> str:
    mean, std = agg_row[f"{m}_mean"], agg_row[f"{m}_std"]
    if pd.isna(mean):
        return "–"
    scale = 100.0 if (m in PERCENT or m.startswith("CRA@")) else 1.0
    digits = 1 if scale == 100.0 else (2 if abs(mean) < 100 else 1)
    s = f"{mean * scale:.{digits}f}"
    if not pd.isna(std):
        s += f" ± {std * scale:.{digits}f}"
    return s


def display_frame(agg: pd.DataFrame) -> pd.DataFrame:
    """The rendered table: one row per config, formatted mean ± std cells, n and diverged counts."""
    if agg.empty:
        return pd.DataFrame()
    metrics = [c[:-5] for c in agg.columns if c.endswith("_mean")]
    rows = []
    for _, r in agg.iterrows():
        label = {"Method": r["method"], "Arch": r["arch"], "Dataset": r["dataset"], "Setting": r["setting"]}
        for m in metrics:
            label[_header(m)] = _cell(r, m)
        n = f"{r['n']}"
        if r["seeds_expected"] and r["n"] < r["seeds_expected"]:
            n += f"/{r['seeds_expected']}"
        if r["diverged"]:
            n += f" (+{r['diverged']} diverged)"
        label["n"] = n
        if r["short"]:
            label["Note"] = f"short run ({r['short']})"
        rows.append(label)
    df = pd.DataFrame(rows).fillna("")
    for col in ("Dataset", "Setting"):
        if col in df and df[col].nunique() <= 1 and col == "Dataset":
            df = df.drop(columns=col)
    return df


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no complete runs)"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    repl = {"±": r"$\pm$", "∘": r"$\circ$", "ε": r"$\varepsilon$", "%": r"\%", "_": r"\_", "&": r"\&",
            "#": r"\#", "→": r"$\to$", "–": "--"}
    return "".join(repl.get(ch, ch) for ch in str(s))


def to_latex(df: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs table, ready to \\input (needs \\usepackage{booktabs})."""
    if df.empty:
        return "% no complete runs"
    cols = list(df.columns)
    align = "".join("l" if c in ("Method", "Arch", "Dataset", "Setting", "Note", "n") else "r" for c in cols)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(_tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    out += [" & ".join(_tex_escape(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{_tex_escape(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out.append(r"\end{table}")
    return "\n".join(out)


def build_table(runs, split: str = "test", seeds_expected: Optional[int] = None) -> Tuple[pd.DataFrame, pd.DataFrame]:
    df = run_frame(runs, split)
    if df.empty:
        return df, pd.DataFrame()
    labels = settings_by_hash(runs)
    df["setting"] = df["config_hash"].map(labels).fillna("")
    agg = aggregate(df, seeds_expected)
    return agg, display_frame(agg)


CAPTION = ("mean ± sample std (ddof = 1) over complete seeds; n = seeds aggregated; diverged runs are "
           "counted, never averaged. CRA and clean accuracy in %, K from converged bounds.")


def render(display: pd.DataFrame, fmt: str, caption: str = CAPTION) -> str:
    if fmt == "md":
        return to_markdown(display) + ("\n\n" + caption if not display.empty else "")
    if fmt == "tex":
        return to_latex(display, caption)
    if fmt == "csv":
        return display.to_csv(index=False)
    raise ValueError(f"unknown format {fmt!r}")


def table_for_folder(results: Path, suite_name: Optional[str] = None, fmt: str = "md",
                     split: Optional[str] = None) -> str:
    if not Path(results).exists():
        raise FileNotFoundError(f"no results folder {results}")
    runs, problems = collect(Path(results))
    seeds_expected = None
    if suite_name:
        from bench.config import load_suite, suite_runs
        from bench.config import config_hash

        suite = load_suite(suite_name)
        wanted = {config_hash(c) for c in suite_runs(suite)}
        runs = [(r, c) for r, c in runs if r["config_hash"] in wanted]
        seeds_expected = suite.get("seeds") if isinstance(suite.get("seeds"), int) else None
    out = []
    splits = [split] if split else _default_splits(runs)
    for sp in splits:
        _, display = build_table(runs, sp, seeds_expected)
        if len(splits) > 1:
            out.append(f"### {sp} split\n" if fmt == "md" else f"% {sp} split")
        out.append(render(display, fmt))
    if problems:
        out.append("\n".join(f"corrupt run skipped: {p}" for p in problems))
    return "\n\n".join(out)


def _default_splits(runs) -> Sequence[str]:
    datasets = {r["dataset"] for r, _ in runs}
    return ("train", "test") if datasets == {"moons"} else ("test",)


def print_results(results: List[dict]) -> None:
    """A short per-run summary after `bench run`."""
    for r in results:
        if r.get("status") != "complete":
            print(f"{r['method']}/{r['arch']}/{r['dataset']} seed {r['seed']}: {r['status']} ({r.get('reason', '')})")
            continue
        test = r["eval"]["test"]
        cra = ", ".join(f"CRA@{k} {100 * v:.1f}%" for k, v in test["cra"].items())
        print(f"{r['method']}/{r['arch']}/{r['dataset']} seed {r['seed']}: clean {100 * test['clean']:.1f}%, {cra}, "
              f"K(f) {r['K_f']:.3g}, K(h∘f) {r['K_hf']:.3g}, tightness {100 * r['tightness']:.1f}%, "
              f"{r['train_seconds']:.0f}s")
