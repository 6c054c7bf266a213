"""A finished run loaded for use from Python (`from bench import load_run`): its model with the checkpoint's
weights, converged bounds, data and certificates. Above the engine: it builds through bench.train and reads the
run folder through bench.store."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bench import store
from bench import train as engine
from bench.certify import DTYPES, certify_split, predict


class Run:
    """A finished run, loaded for use from Python (`from bench import load_run`)."""

    def __init__(self, folder: Path, device="cpu"):
        self.folder = Path(folder)
        self.result = store.read_result(self.folder)
        self.config = store.read_config(self.folder)
        self._data = None
        self.model = engine.build_model(self.config, self.data_bundle(), device=device)
        state = store.load_checkpoint(self.folder / store.CHECKPOINT, map_location=device)
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.model.converge(tol=float(self.config["converge_tol"]))
        self.bound = self.model.certified_bound()         # guaranteed: the certificate
        self.power = self.model.power_bound()             # converged power iteration (the paper's K)

    def data_bundle(self):
        if self._data is None:
            self._data = engine.build_data(self.config)
        return self._data

    def data(self, split: str):
        """The split's inputs (data units, no augmentation) and labels, on CPU."""
        bundle = self.data_bundle()
        x, y = bundle.split(split)
        return bundle.inputs(x), y

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.model, x, DTYPES[str(self.config["certify_dtype"])])

    def certified(self, x: torch.Tensor, eps: float, rule: str = "sound") -> torch.Tensor:
        """A bool per input (data units): its prediction is certified at radius eps (strict; ties are not
        certified), through the one certification path (`certify_split`; per batch and per ε for input-aware
        models). `rule="power"` gives the paper's power-iteration rule, which is not a certificate."""
        dtype = DTYPES[str(self.config["certify_dtype"])]
        split = certify_split(self.model, x, {"eps": float(eps)}, dtype, rules=(rule,),
                              converge_tol=float(self.config["converge_tol"]))
        return split.certified[rule]["eps"]


def load_run(folder: os.PathLike, device: str = "cpu") -> Run:
    return Run(Path(folder), device=device)
