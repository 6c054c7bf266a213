"""The method plugin interface.

A method is a loss that uses the network's Lipschitz bound at the batch (`model.bound(x, ε)`: global families
ignore both), plus its hyperparameters (with the paper's names) and its paper's training recipe per dataset.
Certification is the same path for every method (bench/certify.py `certify_split`); a method only states its
K(h∘f) and its certificate rule in words.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Mapping, Optional, Tuple

import torch

from bench.nn.bound import PairwiseBound


class Method(ABC):
    #: hyperparameter → default; keys are config keys (`--set key=value`)
    hparams: Dict[str, object] = {}
    #: dataset → recipe (trainer keys and hyperparameters) that reproduces the paper on that dataset
    protocols: Dict[str, Dict[str, object]] = {}
    #: profile name → {"*" | dataset | "<dataset>@<family>": config values}: e.g. "official", the official code's
    #: behaviour wherever lipbench deliberately differs (`--profile official`; each value an ordinary option)
    profiles: Dict[str, Dict[str, Dict[str, object]]] = {}
    #: certificate rule in words, recorded in result.json
    certificate = "f_j − f_i > ε·K_ji for all i ≠ j (j = argmax f, strict: ties are not certified)"

    def __init__(self, cfg: Dict[str, object], num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes

    @abstractmethod
    def loss(self, logits: torch.Tensor, y: torch.Tensor, bound: PairwiseBound,
             progress: float, **member_values) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean training loss at training progress t/T, and what to log: detached 0-d tensors (averaged over the
        epoch on the device; never read on the host in the step, which on a GPU would be a sync) or Python
        numbers such as a schedule's value (the epoch's last). `member_values`: the `member_scalars` as 0-d
        tensors, each in place of the instance's own value (a pack's members, one row each under vmap)."""

    @classmethod
    def member_scalars(cls, cfg: Mapping[str, object]) -> Tuple[str, ...]:
        """Hyperparameters (config keys, and the instance attributes of the same name) that the loss only computes
        with, never branches on: the members of a pack that differ in nothing else share one vmapped loss, with
        these as per-member tensors passed to `loss` by keyword. Default: none (each configuration its own)."""
        return ()

    #: short architecture names this method resolves to its own architectures, e.g. {"xl": "cpl-xl"}
    arch_aliases: Dict[str, str] = {}

    def bound_eps(self, progress: float) -> Optional[float]:
        """The radius the network's bound is asked for at training progress t/T (`model.bound(x, eps)`). Global
        bounds ignore it; an input-aware method (Local-Lip-B) returns its current training ε."""
        return None

    def K_hf(self, bound: PairwiseBound) -> float:
        """K(h∘f), the Lipschitz constant of the loss's output map composed with f. For losses whose h is a
        plain softmax this is K̄(f) = max_ij K_ij (the paper's tables print the same number)."""
        return float(bound.max(self.num_classes))
