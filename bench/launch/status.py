"""`bench status SUITE`: how far a suite is, cell by cell (done, running, diverged, partial, missing)."""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Dict, List

from rich.console import Console
from rich.table import Table

from bench import store
from bench.launch.local import run_label

STYLE = {"complete": "green", "diverged": "red", "running": "cyan", "partial": "yellow", "missing": "dim",
         "corrupt": "bold red"}


def suite_status(cfgs: List[Dict[str, object]], results: str) -> "OrderedDict[str, Counter]":
    cells: "OrderedDict[str, Counter]" = OrderedDict()
    notes = []
    for cfg in cfgs:
        state, detail = store.run_state(store.run_dir(results, cfg))
        cell = run_label(cfg).rsplit(" seed ", 1)[0]
        cells.setdefault(cell, Counter())[state] += 1
        if state in ("diverged", "corrupt", "running", "partial"):
            notes.append((state, f"{run_label(cfg)}: {state}" + (f" ({detail})" if detail else "")))
    cells.notes = notes  # type: ignore[attr-defined]
    return cells


def print_status(suite_name: str, cfgs: List[Dict[str, object]], results: str, console: Console = None) -> Counter:
    console = console or Console()
    cells = suite_status(cfgs, results)
    table = Table(title=f"suite {suite_name} in {results}")
    table.add_column("cell")
    for state in store.RUN_STATES:
        table.add_column(state, justify="right")
    total: Counter = Counter()
    for cell, counts in cells.items():
        total.update(counts)
        table.add_row(cell, *[f"[{STYLE[s]}]{counts[s]}[/]" if counts[s] else "·" for s in store.RUN_STATES])
    table.add_row("[bold]total", *[f"[bold]{total[s]}" for s in store.RUN_STATES])
    console.print(table)
    for _, line in cells.notes:  # type: ignore[attr-defined]
        console.print(f"  {line}")
    return total
