"""lipbench: train, certify soundly and tabulate Lipschitz-margin certified robustness."""
from bench.registry import register_arch, register_dataset, register_method
from bench.store import load_run

__all__ = ["load_run", "register_method", "register_arch", "register_dataset"]
__version__ = "0.1.0"
