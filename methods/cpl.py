"""CPL: Convex Potential Layers (Meunier, Delattre, Araujo, Allauzen, "A Dynamical System Perspective for
Lipschitz Neural Networks", ICML 2022). Official code: MILES-PSL/Convex-Potential-Layer.

The layers, the network, its `cpl-*` sizes and what the certificate rests on are the family's
(bench/nn/families/cpl.py).

**Loss.** The multi-class hinge F.multi_margin_loss(z, y, margin=m, p=1) = (1/N)·Σ_{i≠y} max(0, m − z_y + z_i),
m = 0.7 (official `margin_loss`).
"""
from __future__ import annotations

import torch.nn.functional as F

from bench.method import Method
from bench.registry import register_method

_CPL_CIFAR = {
    # main.py / trainer.py defaults (the reference paper's fork keeps them): 200 epochs, batch 256, Adam 1e-3,
    # no weight decay, the per-step triangular lr; crop 32 (pad 4) + flip; inputs in [0,1] with the mean
    # subtracted in-model and std 1 (no --norm_input). The official trainer saves `best_model.pt` by *test*
    # clean accuracy beside `last_model.pt`; lipbench reports the last epoch only.
    "epochs": 200, "protocol_epochs": 200, "batch_size": 256, "optimizer": "adam", "lr": 1e-3,
    "weight_decay": 0.0, "lr_schedule": "triangular", "augment": True, "cert_eps": ["36/255", "72/255", "108/255"],
}


@register_method("cpl")
class CPL(Method):
    hparams = {
        "eps": 36 / 255,   # only the radius CRA is reported at when cert_eps names "eps"
        "margin": 0.7,     # m of the hinge loss
    }
    protocols = {
        "cifar10": {**_CPL_CIFAR, "normalize": [[0.4913997551666284, 0.48215855929893703, 0.4465309133731618],
                                                [1.0, 1.0, 1.0]]},
        "cifar100": {**_CPL_CIFAR, "normalize": [[0.5071, 0.4865, 0.4409], [1.0, 1.0, 1.0]]},
    }
    arch_aliases = {"xl": "cpl-xl", "s": "cpl-s", "m": "cpl-m", "l": "cpl-l"}
    certificate = ("sound: f_j − f_i > ε·K_ji, K = L·∏ max(1, h·σ̄² − 1) × (√2, or ‖ŵ_j − ŵ_i‖ with LLN); "
                   "published: the same with every layer = 1")

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.margin = float(cfg["margin"])

    def loss(self, logits, y, bound, progress):
        loss = F.multi_margin_loss(logits, y, margin=self.margin, p=1)
        return loss, {"hinge": loss.detach()}


__all__ = ["CPL"]
