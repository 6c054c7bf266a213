"""lipbench: train, certify soundly and tabulate Lipschitz-margin certified robustness."""
from bench.registry import register_arch, register_dataset, register_method

__all__ = ["load_run", "register_method", "register_arch", "register_dataset"]
__version__ = "0.1.0"


def __getattr__(name):
    # `from bench import load_run` loads the engine only when asked (the CLI's startup stays light)
    if name == "load_run":
        from bench.loaded_run import load_run
        return load_run
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
