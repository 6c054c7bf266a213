"""Plain cross-entropy on f, no margin and no Lipschitz control (main paper Fig. 2a). A baseline whose
certificate uses the same converged bound as every other method."""
from __future__ import annotations

import torch.nn.functional as F

from bench.method import Method
from bench.registry import register_method


@register_method("standard")
class Standard(Method):
    hparams = {"eps": 0.15}  # ε only sets the radius CRA is reported at when cert_eps names "eps"
    protocols = {
        "moons": {"epochs": 1000, "batch_size": 100, "lr": 1e-3, "lr_milestones": [400], "protocol_epochs": 1000},
    }

    def loss(self, logits, y, bound, progress):
        ce = F.cross_entropy(logits, y)
        return ce, {"ce": ce.detach()}
