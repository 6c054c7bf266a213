import pytest
import torch

from tests.official import FIXTURES, SHARED, load_fixture, t64  # noqa: F401 (re-exported to the tests)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def fixture(name: str) -> dict:
    """Load a conformance case from ../shared/fixtures (numbers from the official implementations)."""
    if not FIXTURES.exists():
        pytest.skip(f"conformance fixtures not found at {FIXTURES} (set LIPBENCH_SHARED)")
    return load_fixture(name)
