import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LIPBENCH_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def fixture(name: str) -> dict:
    """Load a conformance case from ../shared/fixtures (numbers from the official implementations)."""
    path = FIXTURES / f"{name}.npz"
    if not FIXTURES.exists():
        pytest.skip(f"conformance fixtures not found at {FIXTURES} (set LIPBENCH_SHARED)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)
