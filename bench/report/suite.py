"""What `bench suite` writes after its runs: under <results>/<suite>/ the tables (Markdown, LaTeX, CSV), the
per-seed appendix, paper-vs-measured, the figures and report.md (see bench/report/report.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List


def write_suite_outputs(suite: Dict, cfgs: List[Dict], results: Path) -> Dict[str, Path]:
    from bench.report.report import write_report

    written = write_report(suite, cfgs, Path(results))
    print(f"report: {written['report.md']}")
    return written
