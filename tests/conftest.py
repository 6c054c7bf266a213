import pytest
import torch

from tests.official import FIXTURES, SHARED, load_fixture, t64  # noqa: F401 (re-exported to the tests)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def real_cifar10():
    """The real CIFAR-10 in ../shared/data, through the project's own loader (skips where it is absent)."""
    from bench.registry import DATASETS

    npz = SHARED / "data" / "cifar10.npz"
    if not npz.is_file():
        pytest.skip(f"real CIFAR-10 not found at {npz} (set LIPBENCH_SHARED)")
    return DATASETS.get("cifar10")({"data_root": str(npz.parent)}, 1)


def fixture(name: str) -> dict:
    """Load a conformance case from tests/fixtures (numbers from the official implementations). The fixtures
    ship with the repository: a missing one is a failure, never a skip."""
    return load_fixture(name)
