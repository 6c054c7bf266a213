"""Paper-style tables from run folders.

One pandas frame holds one row per run (`run_frame`); `aggregate` groups the runs that share a config (all but
the seed) into mean ± std (sample std, ddof = 1) over complete seeds, with the seed count n and the number of
diverged runs beside it (diverged runs are counted, never averaged). Markdown, LaTeX (booktabs) and CSV are
all rendered from that aggregate frame, so they cannot drift apart or from the result.json files.

Presentation, as the paper prints its tables: the best mean per column (per dataset) in bold, and optionally
(+x) deltas of each row against a named baseline row (`baseline="gloro"` or `"gloro/4c3f"`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from bench import store
from bench.config import ConfigError

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


def short_note(cfg: dict) -> str:
    """'' for a run of the full protocol; otherwise what makes it short ('30/1000 ep', 'subset 5000')."""
    notes = []
    if cfg.get("train_subset"):
        notes.append(f"subset {int(cfg['train_subset'])}")
    proto = cfg.get("protocol_epochs")
    if proto and int(cfg["epochs"]) < int(proto):
        notes.append(f"{int(cfg['epochs'])}/{int(proto)} ep")
    return ", ".join(notes)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200
                                                     else f"{seconds / 3600:.1f} h")


def budget_note(result: dict) -> str:
    """'' for an epoch-count run; for a budgeted one its budget, planned epochs and measured training time."""
    b = result.get("budget")
    if not b:
        return ""
    return (f"budget {_duration(float(b['seconds']))}: {int(b['epochs'])} ep, "
            f"measured {_duration(float(b.get('train_seconds', result.get('train_seconds') or 0)))}")


def eps_train_column(cfg: dict, name: str) -> bool:
    """Whether CRA name `name` is the training ε (cert_eps entry "eps"), shown in one 'CRA@ε_train' column."""
    return (cfg.get("eps") is not None and "eps" in (cfg.get("cert_eps") or [])
            and name == f"{float(cfg['eps']):g}")


def run_frame(runs: Iterable[Tuple[dict, dict]], split: str = "test", power: bool = False) -> pd.DataFrame:
    """One row per run: identity, hash, seed, status, the split's clean/CRA, K(f), K(h∘f), tightness, ...
    CRA and K(f) are the guaranteed ones (the certificate); `power` adds the power-iteration CRA (`pCRA@…`) and
    K(f) (`K_f_power`): the paper's way, from below, not a certificate."""
    rows = []
    for result, cfg in runs:
        row = {k: result[k] for k in IDENTITY}
        row.update(config_hash=result["config_hash"], seed=result["seed"], status=result["status"],
                   short="; ".join(n for n in (budget_note(result), short_note(cfg) if not result.get("budget")
                                               else "") if n), eps_train=cfg.get("eps"))
        ev = (result.get("eval") or {}).get(split) or {}
        row["clean"] = ev.get("clean")
        tail = (result.get("last_evals") or {}) if split == "test" else {}
        epochs = tail.get("epochs") or []
        if len(epochs) < 2 or epochs[-1] - epochs[0] != len(epochs) - 1 or \
                epochs[0] <= 0.9 * int(result.get("epochs") or epochs[-1]):
            tail = {}   # end-of-run noise: consecutive epochs in the run's last tenth, never across its schedule
        for name, value in (ev.get("cra") or {}).items():
            col = "CRA@ε_train" if eps_train_column(cfg, name) else f"CRA@{name}"
            row[col] = value
            row[f"{col}{TAIL}"] = (tail.get(f"test_cra@{name}") or {}).get("std")
        row[f"clean{TAIL}"] = (tail.get("test_clean") or {}).get("std")
        row[f"K_f{TAIL}"] = None if result.get("K_f_local") else (tail.get("K_f") or {}).get("std")
        for name, value in (ev.get("cra_ceiling") or {}).items():
            row["ceil@ε_train" if eps_train_column(cfg, name) else f"ceil@{name}"] = value
        if power:
            for name, value in (ev.get("cra_power") or {}).items():
                row["pCRA@ε_train" if eps_train_column(cfg, name) else f"pCRA@{name}"] = value
            row["K_f_power"] = result.get("K_f_power")
        for key in ("K_f", "K_hf", "tightness", "lower_bound", "params", "train_seconds", "device"):
            row[key] = result.get(key)
        if result.get("K_f_local"):  # an input-aware method: its K is per point, reported as mean and max;
            # K(h∘f) and tightness rest on the global bound, so they are left blank rather than mixed in
            row["K_f"], row["K_f_max"] = result["K_f_local"]["mean"], result["K_f_local"]["max"]
            row["K_hf"] = row["tightness"] = None
            if power:
                row["K_f_power"] = result["K_f_local_power"]["mean"]
        rows.append(row)
    return pd.DataFrame(rows)


#: keys named on every row when they differ anywhere in a dataset's table, not only within a method/arch group
ALWAYS_LABELLED = ("eps",)


def _profile_keys(cfg: dict) -> set:
    """The keys a run's profile set (and that still hold the profile's value): they are named by the profile."""
    if not cfg.get("profile"):
        return set()
    from bench.config import ConfigError as _ConfigError, profile_values
    from bench.registry import ARCHS, METHODS, UnknownNameError
    try:
        family = getattr(ARCHS.get(str(cfg["arch"])), "family", None)
        values = profile_values(METHODS.get(str(cfg["method"])), str(cfg["method"]), str(cfg["profile"]),
                                str(cfg["dataset"]), family)
    except (_ConfigError, UnknownNameError):
        return set()
    return {k for k, v in values.items() if cfg.get(k) == v}


def settings_by_hash(runs: Iterable[Tuple[dict, dict]], exclude: Sequence[str] = ()) -> Dict[str, str]:
    """For each config hash, the keys whose values differ among configs of the same method/arch/dataset
    (e.g. 'eps=0.15'), so rows are labelled by what actually differs between them (`exclude`: keys left out,
    e.g. the swept one). Keys a profile set are named by the profile ('profile=official'), not one by one."""
    configs = {result["config_hash"]: cfg for result, cfg in runs}
    by_profile = {h: _profile_keys(cfg) for h, cfg in configs.items()}
    groups: Dict[tuple, List[Tuple[str, dict]]] = {}
    by_dataset: Dict[str, List[dict]] = {}
    for h, cfg in configs.items():
        groups.setdefault(tuple(cfg[k] for k in IDENTITY), []).append((h, cfg))
        by_dataset.setdefault(str(cfg["dataset"]), []).append(cfg)
    labels = {}
    for h, cfg in configs.items():
        peers = groups[tuple(cfg[k] for k in IDENTITY)]
        table = by_dataset[str(cfg["dataset"])]
        varying = sorted(k for k in cfg if k not in _NOT_SETTINGS and k not in exclude and k not in by_profile[h] and (
            len({repr(p.get(k)) for ph, p in peers if k not in by_profile[ph]}) > 1
            or (k in ALWAYS_LABELLED and len({repr(p.get(k)) for p in table}) > 1)))
        labels[h] = ", ".join(f"{k}={_fmt_setting(cfg.get(k))}" for k in varying)
    return labels


def _fmt_setting(v) -> str:
    if isinstance(v, float):
        k = round(v * 255)
        if k and abs(v * 255 - k) < 1e-9 and abs(v * 10 ** 4 - round(v * 10 ** 4)) > 1e-9:
            return f"{k}/255"  # the field's radii (36/255 = 0.141176…), not a rounded decimal
        return f"{v:g}"
    if isinstance(v, dict) and v.get("schedule"):
        return f"{v['schedule']}({v.get('start', '')}→{v.get('end', '')})"
    return str(v)


#: suffix of a run-frame column holding the run's std over its last 10 test evaluations (result.json
#: `last_evals`), averaged per cell and shown as a footnote where it exceeds the seed std
TAIL = "~tail"

METRIC_ORDER = ("clean", "CRA@ε_train", "ceil@ε_train", "CRA@36/255", "CRA@72/255", "CRA@108/255",
                "pCRA@ε_train", "pCRA@36/255", "pCRA@72/255", "pCRA@108/255", "K_f", "K_f_max", "K_f_power", "K_hf",
                "tightness")
PERCENT = {"clean", "tightness"}
#: columns where a larger mean is better: these get the bold best value and the (+x) deltas
HIGHER_IS_BETTER = ("clean", "tightness")


def is_cra(m: str) -> bool:
    """A certified-accuracy column: guaranteed (`CRA@…`) or under the power-iteration bound (`pCRA@…`)."""
    return m.startswith("CRA@") or m.startswith("pCRA@")


def is_ceiling(m: str) -> bool:
    """The data's CRA ceiling at a radius (bench/data/ceiling.py): what any classifier could certify."""
    return m.startswith("ceil@")


def is_percent(m: str) -> bool:
    return m in PERCENT or is_cra(m) or is_ceiling(m)


def _better_is_higher(m: str) -> bool:
    return m in HIGHER_IS_BETTER or is_cra(m)


def metric_columns(df: pd.DataFrame) -> List[str]:
    cras = [c for c in df.columns if (is_cra(c) or is_ceiling(c)) and not c.endswith(TAIL)]
    ordered = [c for c in METRIC_ORDER if c in df.columns]
    rest = sorted(c for c in cras if c not in ordered)
    return ordered + [c for c in rest if c.startswith("CRA@")] + [c for c in rest if is_ceiling(c)] + \
        [c for c in rest if c.startswith("pCRA@")]


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
            tail = pd.to_numeric(ok[f"{m}{TAIL}"], errors="coerce").dropna() if f"{m}{TAIL}" in ok \
                else pd.Series(dtype=float)
            if len(tail):
                row[f"{m}{TAIL}"] = tail.mean()
        row["params"] = int(ok["params"].iloc[0]) if len(ok) and "params" in ok and pd.notna(ok["params"].iloc[0]) \
            else None
        row["train_seconds"] = float(pd.to_numeric(g.get("train_seconds"), errors="coerce").sum()) \
            if "train_seconds" in g else float("nan")
        row["devices"] = ", ".join(sorted({str(d) for d in g.get("device", []) if d})) if "device" in g else ""
        out.append(row)
    agg = pd.DataFrame(out)
    return agg.sort_values(["dataset", "arch", "method", "eps_train"], na_position="last",
                           kind="stable").reset_index(drop=True)


HEADERS = {"clean": "Clean (%)", "CRA@ε_train": "CRA@ε (%)", "ceil@ε_train": "Ceiling@ε (%)", "pCRA@ε_train": "CRA@ε PI (%)", "K_f": "K(f)",
           "K_f_power": "K(f) PI", "K_hf": "K(h∘f)", "tightness": "Tightness (%)", "K_f_max": "K(f) max"}


def header(m: str) -> str:
    if m in HEADERS:
        return HEADERS[m]
    if m.startswith("CRA@"):
        return f"CRA {m[4:]} (%)"
    if m.startswith("pCRA@"):
        return f"CRA {m[5:]} PI (%)"
    if is_ceiling(m):
        return f"Ceiling {m[5:]} (%)"
    return m


def _scale_digits(m: str, mean: float) -> Tuple[float, int]:
    if is_percent(m):
        return 100.0, 1
    return 1.0, (2 if abs(mean) < 100 else 1)


def fmt_value(m: str, value: float, digits_for: Optional[float] = None) -> str:
    """One number in table units: percentages with one decimal, K with 2 (1 from 100 up)."""
    scale, digits = _scale_digits(m, value if digits_for is None else digits_for)
    return f"{value * scale:.{digits}f}"


def _cell(agg_row, m: str) -> str:
    mean, std = agg_row[f"{m}_mean"], agg_row[f"{m}_std"]
    if pd.isna(mean):
        return "–"
    s = fmt_value(m, mean)
    if not pd.isna(std):
        s += f" ± {fmt_value(m, std, digits_for=mean)}"
    tail = agg_row.get(f"{m}{TAIL}")
    if tail is not None and not pd.isna(tail) and float(fmt_value(m, tail, digits_for=mean)) > 0 \
            and (pd.isna(std) or tail > std):
        s += f" †{fmt_value(m, tail, digits_for=mean)}"
    return s


def _fmt_params(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = int(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else str(n))


def n_label(r) -> str:
    """'3', or '2/3' below the expected seed count, with '(+1 diverged)' beside it."""
    n = f"{r['n']}"
    if r["seeds_expected"] and r["n"] < r["seeds_expected"]:
        n += f"/{r['seeds_expected']}"
    if r["diverged"]:
        n += f" (+{r['diverged']} diverged)"
    return n


# ---------------------------------------------------------------------------------------------------------
# Baseline deltas and the best value per column
# ---------------------------------------------------------------------------------------------------------
def parse_baseline(spec: Optional[str]) -> Optional[Dict[str, str]]:
    """'gloro' → {method: gloro}; 'gloro/4c3f' → {method: gloro, arch: 4c3f}."""
    if not spec:
        return None
    parts = str(spec).split("/")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"baseline {spec!r}: write METHOD or METHOD/ARCH")
    return dict(zip(("method", "arch"), parts))


def baseline_rows(agg: pd.DataFrame, baseline: Optional[str]) -> Dict[int, Optional[int]]:
    """For each row index, the index of the baseline row it is compared with (None when there is none or
    more than one candidate). Candidates share the dataset; among them the same arch is preferred, then the
    same training ε, so e.g. CLL at ε = 0.15 is compared with GloRo at ε = 0.15. CRA at the training ε is only
    compared when both rows trained at the same ε (see `display_frame`)."""
    if baseline == DEFAULTS_BASELINE and not agg.empty:
        return _defaults_rows(agg)
    spec = parse_baseline(baseline)
    if spec is None or agg.empty:
        return {}
    is_base = pd.Series(True, index=agg.index)
    for k, v in spec.items():
        is_base &= agg[k].astype(str) == v
    if not is_base.any():
        raise ConfigError(f"baseline {baseline!r} matches no row of the table")
    out: Dict[int, Optional[int]] = {}
    for i, r in agg.iterrows():
        if is_base[i]:
            continue
        cand = agg[is_base & (agg["dataset"] == r["dataset"])]
        for key in ("arch", "eps_train"):
            narrower = cand[cand[key].astype(str) == str(r[key])]
            if len(narrower):
                cand = narrower
        out[i] = int(cand.index[0]) if len(cand) == 1 else None
    return out


#: `baseline: defaults` compares each row with lipbench's defaults: the row of the same method, arch, dataset
#: and ε whose setting names nothing but ε (an ablation's reference row)
DEFAULTS_BASELINE = "defaults"


def defaults_by_hash(runs) -> Dict[str, Optional[str]]:
    """For each config hash, the hash of the config among the runs that is closest to lipbench's defaults for
    the same method, arch, dataset and ε: the fewest keys differing from `resolve({method, arch, dataset, ε})`
    (execution keys and the seed aside). None where that closest config is not unique."""
    from bench.config import EXECUTION_KEYS, resolve

    configs = {r["config_hash"]: c for r, c in runs}
    distance: Dict[str, int] = {}
    for h, cfg in configs.items():
        spec = {k: cfg[k] for k in ("method", "arch", "dataset")}
        if cfg.get("eps") is not None:
            spec["eps"] = cfg["eps"]
        base = resolve(spec)
        distance[h] = sum(1 for k in set(base) | set(cfg)
                          if k not in EXECUTION_KEYS and k != "seed" and base.get(k) != cfg.get(k))
    groups: Dict[tuple, List[str]] = {}
    for h, cfg in configs.items():
        groups.setdefault((cfg["method"], cfg["arch"], cfg["dataset"], repr(cfg.get("eps"))), []).append(h)
    out: Dict[str, Optional[str]] = {}
    for members in groups.values():
        best = min(distance[h] for h in members)
        closest = [h for h in members if distance[h] == best]
        for h in members:
            out[h] = closest[0] if len(closest) == 1 else None
    return out


def _defaults_rows(agg: pd.DataFrame) -> Dict[int, Optional[int]]:
    """Row → the row of its defaults config (`defaults_by_hash`, filled in by `build_table`)."""
    if "defaults_hash" not in agg:
        return {}
    index = {h: i for i, h in zip(agg.index, agg["config_hash"])}
    out: Dict[int, Optional[int]] = {}
    for i, r in agg.iterrows():
        base = r["defaults_hash"]
        if isinstance(base, str) and base != r["config_hash"]:
            out[i] = index.get(base)
    return out


def _delta(m: str, value: float, base: float) -> str:
    """'(+1.8)' / '(−0.4)' at display precision; '' when the difference rounds to zero."""
    scale, digits = _scale_digits(m, value)
    d = round((value - base) * scale, digits)
    return "" if d == 0 else f"({d:+.{digits}f})".replace("-", "−")


def best_cells(agg: pd.DataFrame, metrics: Sequence[str]) -> Dict[str, List[int]]:
    """Row indices holding the best (largest, at display precision) mean per column and dataset; CRA at the
    training ε is only compared between rows of the same ε. Nothing is bold where all rows tie."""
    best: Dict[str, List[int]] = {}
    for m in metrics:
        if not _better_is_higher(m) or f"{m}_mean" not in agg:
            continue
        keys = ["dataset", "eps_train"] if m == "CRA@ε_train" else ["dataset"]
        for _, g in agg.groupby(keys, sort=False, dropna=False):
            vals = g[f"{m}_mean"].dropna()
            if len(vals) < 2:
                continue
            shown = vals.map(lambda v: float(fmt_value(m, v)))
            top = shown.index[shown == shown.max()]
            if len(top) < len(shown):
                best.setdefault(m, []).extend(int(i) for i in top)
    return best


def display_frame(agg: pd.DataFrame, baseline: Optional[str] = None) -> pd.DataFrame:
    """The rendered table: one row per config, formatted mean ± std cells (with (+x) deltas against the
    baseline row when one is named), #params, n and diverged counts. `attrs['bold']` lists the (row, column)
    cells holding a column's best value; `attrs['agg']` keeps the numeric frame it came from."""
    if agg.empty:
        return pd.DataFrame()
    metrics = [c[:-5] for c in agg.columns if c.endswith("_mean")]
    bases = baseline_rows(agg, baseline)
    best = best_cells(agg, metrics)
    rows, bold = [], []
    for pos, (i, r) in enumerate(agg.iterrows()):
        label = {"Method": r["method"], "Arch": r["arch"], "Dataset": r["dataset"], "Setting": r["setting"]}
        base = agg.loc[bases[i]] if bases.get(i) is not None else None
        for m in metrics:
            cell = _cell(r, m)
            comparable = m != "CRA@ε_train" or (base is not None and base["eps_train"] == r["eps_train"])
            if base is not None and comparable and _better_is_higher(m) and not pd.isna(r[f"{m}_mean"]) \
                    and not pd.isna(base[f"{m}_mean"]):
                cell = (cell + " " + _delta(m, r[f"{m}_mean"], base[f"{m}_mean"])).rstrip()
            label[header(m)] = cell
            if i in best.get(m, []):
                bold.append((pos, header(m)))
        label["#params"] = _fmt_params(r.get("params"))
        label["n"] = n_label(r)
        label["Note"] = ("" if not r["short"] else r["short"] if str(r["short"]).startswith("budget ")
                         else f"short run ({r['short']})")
        rows.append(label)
    df = pd.DataFrame(rows).fillna("")
    if df["Dataset"].nunique() <= 1:
        df = df.drop(columns="Dataset")
    if not df["Note"].astype(bool).any():
        df = df.drop(columns="Note")
    if not df["Setting"].astype(bool).any():
        df = df.drop(columns="Setting")
    df.attrs["bold"] = bold
    df.attrs["agg"] = agg
    df.attrs["baseline"] = baseline
    return df


# ---------------------------------------------------------------------------------------------------------
# Renderers: Markdown, LaTeX (booktabs), CSV
# ---------------------------------------------------------------------------------------------------------
def _bold_set(df: pd.DataFrame) -> set:
    return set(map(tuple, df.attrs.get("bold", [])))


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no complete runs)"
    cols = list(df.columns)
    bold = _bold_set(df)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in cols) + "|"]
    for pos, row in enumerate(df.itertuples(index=False)):
        cells = [f"**{v}**" if (pos, c) in bold and v else str(v) for c, v in zip(cols, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TEXT_COLUMNS = ("Method", "Arch", "Dataset", "Setting", "Note", "n", "Model", "Metric", "Source", "Run",
                "Split")
_TEX = {"±": r"$\pm$", "∘": r"$\circ$", "ε": r"$\varepsilon$", "%": r"\%", "_": r"\_", "&": r"\&",
        "#": r"\#", "→": r"$\to$", "–": "--", "−": "$-$", "Δ": r"$\Delta$", "$": r"\$", "{": r"\{", "}": r"\}",
        "\\": r"\textbackslash{}", "^": r"\^{}", "~": r"\~{}", "⚠": "(!)", "·": r"$\cdot$", "≈": r"$\approx$",
        "†": r"$^\dagger$", "§": r"\S{}", "“": "``", "”": "''", "≤": r"$\le$", "≥": r"$\ge$", "λ": r"$\lambda$",
        "δ": r"$\delta$", "σ": r"$\sigma$", "₀": r"$_0$", "₁": r"$_1$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


_tex_escape = tex_escape


def to_latex(df: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs table, ready to \\input (needs \\usepackage{booktabs})."""
    if df.empty:
        return "% no complete runs"
    cols = list(df.columns)
    bold = _bold_set(df)
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in cols)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for pos, row in enumerate(df.itertuples(index=False)):
        cells = [rf"\textbf{{{tex_escape(v)}}}" if (pos, c) in bold and v else tex_escape(v)
                 for c, v in zip(cols, row)]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{tex_escape(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out.append(r"\end{table}")
    return "\n".join(out)


def numeric_frame(display: pd.DataFrame) -> pd.DataFrame:
    """The CSV view of a table: the same rows as `display`, numbers in table units (%, K) as mean and std
    columns, n, diverged and the short-run note; no formatting."""
    agg = display.attrs.get("agg")
    if agg is None or agg.empty:
        return display
    metrics = [c[:-5] for c in agg.columns if c.endswith("_mean")]
    out = agg[["method", "arch", "dataset", "setting"]].copy()
    for m in metrics:
        scale = 100.0 if is_percent(m) else 1.0
        out[f"{header(m)} mean"] = (agg[f"{m}_mean"] * scale).round(4)
        out[f"{header(m)} std"] = (agg[f"{m}_std"] * scale).round(4)
    out["params"] = agg["params"]
    out["n"] = agg["n"]
    out["seeds_expected"] = agg["seeds_expected"]
    out["diverged"] = agg["diverged"]
    out["short"] = agg["short"]
    out["config_hash"] = agg["config_hash"]
    return out


def build_table(runs, split: str = "test", seeds_expected: Optional[int] = None,
                baseline: Optional[str] = None, power: bool = False) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(aggregate, display) for one evaluation split (`power`: with the power-iteration columns)."""
    runs = list(runs)
    df = run_frame(runs, split, power)
    if df.empty:
        return df, pd.DataFrame()
    labels = settings_by_hash(runs)
    df["setting"] = df["config_hash"].map(labels).fillna("")
    agg = aggregate(df, seeds_expected)
    if baseline == DEFAULTS_BASELINE and not agg.empty:
        agg["defaults_hash"] = agg["config_hash"].map(defaults_by_hash(runs))
    return agg, display_frame(agg, baseline)


CAPTION = ("mean ± sample std (ddof = 1) over complete seeds; n = seeds aggregated (shown as n/N when seeds "
           "are missing); diverged runs are counted beside n, never averaged. CRA and clean accuracy in %; CRA "
           "and K(f) from guaranteed per-layer bounds (the certificate); the best value per column in bold.")
POWER_CAPTION = (" PI columns: CRA and K(f) under the converged power iteration, the way papers report them; "
                 "power iteration approaches the norm from below, so these are not certificates.")


LOCAL_CAPTION = (" Input-aware methods (Local-Lip-B) certify each point with its own local bound: their K(f) is the"
                 " mean of the per-point bound over the test split at the first certified ε, 'K(f) max' its maximum.")


CEILING_CAPTION = (" Ceiling: the largest CRA any classifier can reach on the same points at that ε (n minus a "
                   "maximum matching of opposite-class pairs at most 2ε apart; bench/data/ceiling.py), mean ± std "
                   "over the seeds' data.")
TAIL_CAPTION = (" †s: the run's own spread at its end, the sample std over its last 10 epochs' test evaluations "
                "(mean over seeds), shown where it exceeds the seed std: a single final evaluation is then noisier "
                "than ± says.")


def caption_for(display: pd.DataFrame, base: str = CAPTION) -> str:
    text = base
    if any(str(c).startswith("Ceiling") for c in display.columns):
        text += CEILING_CAPTION
    if any("†" in str(v) for col in display.columns for v in display[col]):
        text += TAIL_CAPTION
    if any(" PI" in str(c) for c in display.columns):
        text += POWER_CAPTION
    if "K(f) max" in display.columns:
        text += LOCAL_CAPTION
    if display.attrs.get("baseline") == DEFAULTS_BASELINE:
        text += (" (+x): difference to lipbench's defaults, the row of the same method, arch and ε whose config is "
                 "closest to the resolved defaults.")
    elif display.attrs.get("baseline"):
        text += f" (+x): difference to the {display.attrs['baseline']} row of the same dataset, arch and ε."
    if "Note" in display and display["Note"].astype(bool).any():
        text += (" Rows marked 'short run' trained for fewer epochs than the protocol or on a training subset:"
                 " they are not reproductions.")
    return text


def render(display: pd.DataFrame, fmt: str, caption: Optional[str] = None) -> str:
    caption = caption_for(display) if caption is None else caption
    if fmt == "md":
        return to_markdown(display) + ("\n\n" + caption if not display.empty else "")
    if fmt == "tex":
        return to_latex(display, caption)
    if fmt == "csv":
        return numeric_frame(display).to_csv(index=False)
    raise ValueError(f"unknown format {fmt!r}")


# ---------------------------------------------------------------------------------------------------------
# The per-seed appendix table (as Tables D6–D8)
# ---------------------------------------------------------------------------------------------------------
def per_seed_frame(runs, split: str = "test", seeds_expected: Optional[int] = None,
                   split_metrics_only: bool = False, power: bool = False) -> pd.DataFrame:
    """One row per cell × metric, one column per seed, and Avg (mean ± std over complete seeds), as the
    paper's Tables D6–D8. A diverged seed reads 'div.', a missing one '–'. `split_metrics_only`: clean and CRA
    only (K and tightness do not depend on the split, so a second split need not repeat them)."""
    runs = list(runs)
    df = run_frame(runs, split, power)
    if df.empty:
        return pd.DataFrame()
    labels = settings_by_hash(runs)
    df["setting"] = df["config_hash"].map(labels).fillna("")
    agg = aggregate(df, seeds_expected)
    metrics = [c[:-5] for c in agg.columns if c.endswith("_mean")]
    if split_metrics_only:
        metrics = [m for m in metrics if m == "clean" or is_cra(m) or is_ceiling(m)]
    seeds = sorted(set(int(s) for s in df["seed"]) | set(range(1, int(seeds_expected or 0) + 1)))
    rows = []
    for _, r in agg.iterrows():
        g = df[df["config_hash"] == r["config_hash"]].set_index("seed")
        model = f"{r['method']}@{r['arch']}" + (f" ({r['setting']})" if r["setting"] else "")
        if r["short"]:
            model += f" [short: {r['short']}]"
        for m in metrics:
            if pd.isna(r[f"{m}_mean"]):
                continue
            row = {"Model": model, "Metric": header(m)}
            for s in seeds:
                if s not in g.index:
                    row[str(s)] = "–"
                elif g.loc[s, "status"] != "complete":
                    row[str(s)] = "div."
                else:
                    v = pd.to_numeric(g.loc[s, m], errors="coerce") if m in g else float("nan")
                    row[str(s)] = "–" if pd.isna(v) else fmt_value(m, v, digits_for=r[f"{m}_mean"])
            row["Avg"] = _cell(r, m)
            rows.append(row)
    return pd.DataFrame(rows)


PER_SEED_CAPTION = ("Every seed of every cell (as the paper's Tables D6–D8); Avg is the mean ± sample std "
                    "(ddof = 1) over the complete seeds; 'div.' marks a diverged seed, '–' a missing one.")


# ---------------------------------------------------------------------------------------------------------
# Entry points used by the CLI
# ---------------------------------------------------------------------------------------------------------
def suite_filter(runs, suite_name: Optional[str]):
    """The runs of a suite (by config hash, any --epochs/--set variant of its cells included) and its seed
    count; all runs and None without a suite."""
    if not suite_name:
        return runs, None, None
    from bench.config import load_suite

    suite = load_suite(suite_name)
    wanted = suite_cell_keys(suite)
    runs = [(r, c) for r, c in runs if cell_key(c) in wanted]
    seeds_expected = suite.get("seeds") if isinstance(suite.get("seeds"), int) else None
    return runs, seeds_expected, suite


def cell_key(cfg: dict) -> str:
    """A config's identity up to run length and subset, so a suite also finds its short (--epochs N) runs."""
    from bench.config import config_hash

    return config_hash({k: v for k, v in cfg.items() if k not in ("epochs", "train_subset")})


def suite_cell_keys(suite: dict) -> set:
    from bench.config import suite_runs

    return {cell_key(c) for c in suite_runs(suite)}


def default_splits(runs) -> Sequence[str]:
    """moons: train (as the paper's figures) and test; otherwise test, then the named test subsets the runs
    evaluated (e.g. test_lossless, the 1,000 lossless images of the offline CIFAR-10 file)."""
    datasets = {r["dataset"] for r, _ in runs}
    if datasets == {"moons"}:
        return ("train", "test")
    subsets = sorted({s for r, _ in runs for s in (r.get("eval") or {}) if s.startswith("test_")})
    return ("test", *subsets)



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
