"""Where the tests find their inputs: the conformance fixtures ship in tests/fixtures (loaded by
bench/conformance.py, re-exported here); $LIPBENCH_SHARED (default ../shared) only points at the real data sets
(`SHARED / "data"`, conftest's `real_cifar10`)."""
from __future__ import annotations

import os
from pathlib import Path

from bench.conformance import (CPL_CASES, FIXTURES, SOC_CASES, cpl_layer, load_fixture, soc_layer,  # noqa: F401
                               t64)

SHARED = Path(os.environ.get("LIPBENCH_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
