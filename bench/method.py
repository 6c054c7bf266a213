"""The method plugin interface.

A method is a loss that uses the network's pairwise Lipschitz bound, plus its hyperparameters (with the
paper's names) and its paper's training recipe per dataset. The certificate itself is the same arithmetic for
every method (bench/certify.py); a method only states its K(h∘f).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Tuple

import torch

from bench import certify
from bench.nn.bound import PairwiseBound


class Method(ABC):
    #: hyperparameter → default; keys are config keys (`--set key=value`)
    hparams: Dict[str, object] = {}
    #: dataset → recipe (trainer keys and hyperparameters) that reproduces the paper on that dataset
    protocols: Dict[str, Dict[str, object]] = {}
    #: certificate rule in words, recorded in result.json
    certificate = "f_j − f_i > ε·K_ji for all i ≠ j (j = argmax f, strict: ties are not certified)"

    def __init__(self, cfg: Dict[str, object], num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes

    @abstractmethod
    def loss(self, logits: torch.Tensor, y: torch.Tensor, bound: PairwiseBound,
             progress: float) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean training loss at training progress t/T, and scalars to log."""

    #: short architecture names this method resolves to its own architectures, e.g. {"xl": "cpl-xl"}
    arch_aliases: Dict[str, str] = {}

    def published_cra(self, logits: torch.Tensor, y: torch.Tensor, model, eps: Dict[str, float]):
        """CRA per ε under the *published* certificate rule of the model's family, when it has its own
        (recorded next to the sound CRA in result.json): a 1-Lipschitz family (`published_rule_nominal`) publishes
        certificates that take every layer as exactly 1 (`nominal_bound`). None when the rule is the engine's."""
        if not getattr(model, "published_rule_nominal", False):
            return None
        return certify.evaluate_logits(logits, y, model.nominal_bound(), eps, self.num_classes)["cra"]

    def K_hf(self, bound: PairwiseBound) -> float:
        """K(h∘f), the Lipschitz constant of the loss's output map composed with f. For losses whose h is a
        plain softmax this is K̄(f) = max_ij K_ij (the paper's tables print the same number)."""
        return float(bound.max(self.num_classes))
