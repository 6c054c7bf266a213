"""Paper-vs-measured: the numbers a paper prints for a suite's cells, beside what lipbench measured.

A suite carries them under a top-level `paper:` list; each entry names its source and the configs it applies to:

    paper:
      - source: Table 2 (CIFAR-10)           # where the numbers are printed (required)
        match: {method: cll, arch: 4c3f, eps: 0.15, p: 0.3}   # config keys a run must have (required)
        split: test                          # evaluation split (default: test)
        clean: 77.6                          # as printed: accuracies and tightness in %,
        cra: {36/255: 61.4, 72/255: 44.2}    #   CRA keyed by ε (a number or a fraction),
        K_f: 72.1                            #   K(f) and K(h∘f) as printed
        K_hf: 11.6
        tightness: 80
        note: free text shown beside the row
        seeds:                               # optional per-seed numbers (Tables D6–D8), to check the printed mean
          source: Table D6
          clean: [77.3, 77.1, ...]
          cra: {36/255: [61.2, 61.5, ...]}

`match` keys are compared with the resolved config of each run (numbers with a relative tolerance, ε also as
fractions); `dataset` defaults to the suite's `defaults.dataset`. The run length is not part of a match on
purpose: a run with fewer epochs than its protocol, or trained on a subset, still lines up with the paper's cell
but is marked SHORT and never presented as a reproduction.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from bench.certify import parse_eps
from bench.config import ConfigError
from bench.report import tables

METRICS = ("clean", "cra", "K_f", "K_hf", "tightness")
ENTRY_KEYS = {"source", "match", "split", "note", "seeds"} | set(METRICS)


@dataclass
class PaperCell:
    source: str
    match: Dict[str, object]
    split: str = "test"
    values: Dict[str, float] = field(default_factory=dict)   # metric column ('clean', 'CRA@36/255', ...) → printed
    printed: Dict[str, str] = field(default_factory=dict)    # the same numbers as written in the suite ('61.0')
    note: str = ""
    seeds: Dict[str, List[float]] = field(default_factory=dict)
    seeds_source: str = ""
    suite: str = ""

    def key(self) -> tuple:
        return (self.source, tuple(sorted((k, repr(v)) for k, v in self.match.items())), self.split,
                tuple(sorted(self.values.items())))


def _flat_metrics(entry: dict, where: str) -> Dict[str, object]:
    """{'clean': v, 'cra': {eps: v}} → {'clean': v, 'CRA@eps': v}."""
    out: Dict[str, object] = {}
    for m in METRICS:
        if m not in entry:
            continue
        if m == "cra":
            if not isinstance(entry["cra"], dict):
                raise ConfigError(f"{where}: 'cra' must map ε to a number, e.g. {{36/255: 61.4}}")
            for eps, v in entry["cra"].items():
                try:
                    parse_eps(eps)
                except ValueError as e:
                    raise ConfigError(f"{where}: {e}") from None
                out[f"CRA@{eps}"] = v
        else:
            out[m] = entry[m]
    return out


def parse_paper(suite: dict) -> List[PaperCell]:
    """The suite's `paper:` entries, validated (a malformed entry is a ConfigError naming it)."""
    block = suite.get("paper")
    if block is None:
        return []
    name = str(suite.get("name", "?"))
    if not isinstance(block, list):
        raise ConfigError(f"suite {name!r}: 'paper' must be a list of entries (source, match, numbers)")
    default_dataset = (suite.get("defaults") or {}).get("dataset")
    cells = []
    for i, entry in enumerate(block):
        where = f"suite {name!r}, paper entry {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(ENTRY_KEYS))}")
        if not entry.get("source") or not isinstance(entry.get("match"), dict) or not entry["match"]:
            raise ConfigError(f"{where}: needs a 'source' (the table it is printed in) and a 'match' mapping")
        match = dict(entry["match"])
        if "dataset" not in match and default_dataset:
            match["dataset"] = default_dataset
        values = _flat_metrics(entry, where)
        if not values:
            raise ConfigError(f"{where}: no numbers (give clean, cra, K_f, K_hf or tightness)")
        for k, v in values.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{where}: {k} must be a number as printed, got {v!r}")
        seeds_block = entry.get("seeds") or {}
        seeds = {k: list(v) for k, v in _flat_metrics(seeds_block, where + " (seeds)").items()}
        cells.append(PaperCell(source=str(entry["source"]), match=match, split=str(entry.get("split", "test")),
                               values={k: float(v) for k, v in values.items()},
                               printed={k: str(v) for k, v in values.items()}, note=str(entry.get("note", "")),
                               seeds=seeds, seeds_source=str(seeds_block.get("source", "")), suite=name))
    return cells


def cells_for(suite: Optional[dict]) -> List[PaperCell]:
    """The paper cells of one suite; without a suite, or for a suite without a `paper:` block (e.g. a short
    variant of a paper suite), those of every suite in suites/ (each once)."""
    if suite is not None and suite.get("paper"):
        return parse_paper(suite)
    from bench.config import list_suites, load_suite

    seen, out = set(), []
    for name in list_suites():
        try:
            cells = parse_paper(load_suite(name))
        except ConfigError as e:
            print(f"bench: note: paper numbers of suite {name!r} skipped: {e}", file=sys.stderr)
            continue
        for c in cells:
            if c.key() not in seen:
                seen.add(c.key())
                out.append(c)
    return out


def _same(expected, actual) -> bool:
    if isinstance(expected, dict) or isinstance(actual, dict):
        return expected == actual
    if isinstance(expected, (list, tuple)) or isinstance(actual, (list, tuple)):
        return list(expected) == list(actual or [])
    if expected is None or actual is None:
        return expected is actual
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected == actual
    try:
        a, b = parse_eps(expected), parse_eps(actual)
    except (ValueError, TypeError):
        return str(expected) == str(actual)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def matches(cell: PaperCell, cfg: dict) -> bool:
    return all(k in cfg and _same(v, cfg[k]) for k, v in cell.match.items())


def measured_value(result: dict, metric: str, split: str) -> Optional[float]:
    """A metric of one run in result.json units (fractions for accuracies and tightness)."""
    if metric in ("K_f", "K_hf", "tightness"):
        return result.get(metric)
    ev = (result.get("eval") or {}).get(split) or {}
    if metric == "clean":
        return ev.get("clean")
    want = parse_eps(metric[len("CRA@"):])
    for name, value in (ev.get("cra") or {}).items():
        try:
            if math.isclose(parse_eps(name), want, rel_tol=1e-9, abs_tol=1e-12):
                return value
        except ValueError:
            continue
    return None


def _label(cell: PaperCell) -> str:
    return ", ".join(f"{k}={tables._fmt_setting(v)}" for k, v in cell.match.items()
                     if k not in ("method", "arch", "dataset"))


def _seed_check(cell: PaperCell, metric: str) -> str:
    """When per-seed numbers are given, say so if their mean differs from the printed mean."""
    seeds = [float(v) for v in cell.seeds.get(metric, [])]
    if len(seeds) < 2:
        return ""
    mean = sum(seeds) / len(seeds)
    std = math.sqrt(sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1))
    if abs(mean - cell.values[metric]) < 0.05 + 1e-9:
        return ""
    return (f"{cell.seeds_source or 'per-seed'} values average {mean:.2f} ± {std:.2f} (n={len(seeds)}), "
            f"not the printed {cell.printed.get(metric, cell.values[metric])}")


def vs_paper_frame(runs: Sequence[Tuple[dict, dict]], cells: Sequence[PaperCell],
                   seeds_expected: Optional[int] = None, include_missing: bool = True) -> pd.DataFrame:
    """One row per paper number × matching measured cell: paper, measured mean ± std, Δ, n, whether the runs
    followed the full protocol (a short run is never a reproduction), the source."""
    by_hash: Dict[str, Tuple[dict, List[dict]]] = {}
    for result, cfg in runs:
        by_hash.setdefault(result["config_hash"], (cfg, []))[1].append(result)
    rows = []
    for cell in cells:
        hits = [h for h, (cfg, _) in by_hash.items() if matches(cell, cfg)]
        # full-protocol cells first, then by run length
        hits.sort(key=lambda h: (bool(tables.short_note(by_hash[h][0])), -int(by_hash[h][0].get("epochs") or 0)))
        if not hits and not include_missing:
            continue
        for h in hits or [None]:
            cfg, results = by_hash[h] if h else ({}, [])
            ok = [r for r in results if r["status"] == "complete"]
            diverged = sum(r["status"] == "diverged" for r in results)
            short = tables.short_note(cfg) if h else ""
            for metric, printed in cell.values.items():
                scale = 100.0 if tables.is_percent(metric) else 1.0
                vals = [measured_value(r, metric, cell.split) for r in ok]
                vals = [float(v) * scale for v in vals if v is not None]
                mean = sum(vals) / len(vals) if vals else float("nan")
                std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1
                       else float("nan"))
                notes = [n for n in (cell.note, _seed_check(cell, metric)) if n]
                rows.append({
                    "Method": cell.match.get("method", ""), "Arch": cell.match.get("arch", cfg.get("arch", "any")),
                    "Dataset": cell.match.get("dataset", cfg.get("dataset", "")), "Setting": _label(cell),
                    "Split": cell.split, "Metric": tables.header(metric), "metric_key": metric,
                    "paper": printed, "paper_printed": cell.printed.get(metric, f"{printed:g}"), "mean": mean, "std": std, "n_runs": len(vals), "diverged": diverged,
                    "seeds_expected": seeds_expected, "measured": bool(h), "short": short,
                    "epochs": cfg.get("epochs"), "Source": cell.source, "Note": "; ".join(notes),
                    "config_hash": h or "",
                })
    return pd.DataFrame(rows)


def _fmt(metric: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.1f}" if tables.is_percent(metric) or abs(v) >= 100 else f"{v:.2f}"


def display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    rows = []
    for _, r in frame.iterrows():
        m = r["metric_key"]
        if not r["measured"]:
            measured, delta, n, run = "not run", "", "0", ""
        else:
            measured = _fmt(m, r["mean"]) + (f" ± {_fmt(m, r['std'])}" if not pd.isna(r["std"]) else "")
            delta = "" if pd.isna(r["mean"]) else (f"{r['mean'] - r['paper']:+.1f}" if tables.is_percent(m)
                                                    else f"{r['mean'] - r['paper']:+.2f}").replace("-", "−")
            n = tables.n_label({"n": r["n_runs"], "seeds_expected": r["seeds_expected"], "diverged": r["diverged"]})
            run = f"⚠ SHORT ({r['short']}): not a reproduction" if r["short"] else "full protocol"
        rows.append({"Method": r["Method"], "Arch": r["Arch"], "Setting": r["Setting"], "Split": r["Split"],
                     "Metric": r["Metric"], "Paper": r["paper_printed"], "Measured": measured,
                     "Δ": delta, "n": n, "Run": run, "Source": r["Source"], "Note": r["Note"]})
    df = pd.DataFrame(rows)
    for col in ("Setting", "Note"):
        if not df[col].astype(bool).any():
            df = df.drop(columns=col)
    if df["Split"].nunique() == 1 and df["Split"].iloc[0] == "test":
        df = df.drop(columns="Split")
    return df


CAPTION = ("Paper: the number as printed in the named source. Measured: mean ± sample std (ddof = 1) over "
           "complete seeds of the matching cell. Δ = measured − paper (percentage points for accuracies and "
           "tightness). Rows marked SHORT trained for fewer epochs than the protocol or on a training subset: they "
           "are smoke tests, not reproductions, and their Δ says nothing about the paper.")


def short_banner(frame: pd.DataFrame) -> str:
    """A loud warning when any measured cell is a short run, else ''."""
    if frame.empty:
        return ""
    measured = frame[frame["measured"]].drop_duplicates("config_hash")
    short = measured[measured["short"].astype(bool)]
    if short.empty:
        return ""
    what = sorted(set(short["short"]))
    return (f"⚠ WARNING: {len(short)} of {len(measured)} measured cells are SHORT RUNS ({'; '.join(what)}), not "
            f"the paper's protocol. They are NOT reproductions: compare them with the paper only as a smoke test.")


def render(frame: pd.DataFrame, fmt: str = "md") -> str:
    if frame.empty:
        return ("(no paper numbers for these runs: a suite lists them under `paper:`)" if fmt == "md"
                else "% no paper numbers for these runs" if fmt == "tex" else "")
    banner = short_banner(frame)
    shown = display(frame)
    if fmt == "md":
        parts = [f"**{banner}**"] if banner else []
        parts += [tables.to_markdown(shown), CAPTION]
        if banner:
            parts.append(f"**{banner}**")
        return "\n\n".join(parts)
    if fmt == "tex":
        body = tables.to_latex(shown, (banner + " " if banner else "") + CAPTION, "tab:paper-vs-measured")
        return (f"% {banner}\n" if banner else "") + body
    if fmt == "csv":
        return frame.drop(columns=["metric_key"]).to_csv(index=False)
    raise ValueError(f"unknown format {fmt!r}")
