"""SOC: Skew Orthogonal Convolutions (Singla & Feizi, ICML 2021), with last-layer normalization (LLN),
certificate regularization (CR) and Householder activations (HH1, HH2) from Singla, Singla & Feizi, "Improved
deterministic l2 robustness on CIFAR-10 and CIFAR-100" (ICLR 2022). Official code: singlasahil14/SOC.

The layers, LipConvNet, its `lipconv-*` architectures and what the certificate rests on are the family's
(bench/nn/families/soc.py).

**Loss (CR).** CE(z, y) − γ·mean(relu(cert_y)), cert_y = min_{j≠y} (z_y − z_j)/K_yj computed at the label
(ICLR 2022 eq. for CR; γ = 0 is the ICML 2021 loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.method import Method
from bench.nn.families.soc import CIFAR_MEAN, SOC_STD
from bench.registry import register_method


def label_certificates(logits: torch.Tensor, y: torch.Tensor, bound, num_classes: int) -> torch.Tensor:
    """cert_y = min_{j≠y} (z_y − z_j)/K_yj (official `ortho_certificates` / `lln_certificates` at the label)."""
    K = bound.rows(y, num_classes)
    gap = logits.gather(1, y[:, None]) - logits
    is_y = torch.zeros_like(logits, dtype=torch.bool).scatter(1, y[:, None], True)
    ratio = gap / torch.where(is_y, torch.ones_like(K), K)
    return ratio.masked_fill(is_y, float("inf")).amin(dim=1)


_SOC_CIFAR = {
    # train_robust.py defaults (ICML 2021 / ICLR 2022): 200 epochs, batch 128, SGD lr 0.1, momentum 0.9, weight
    # decay 5e-4 (none on activation parameters: LipConvNet.param_groups), ×0.1 at 50% and 75% of the steps;
    # RandomCrop(32, 4) + flip; Normalize(mean, 0.2507). The official trainer keeps `best.pth` by *test* CRA@36
    # and reports it beside the last epoch; lipbench reports the last epoch only. Apex O2 (fp16) is not used.
    "epochs": 200, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "lr_schedule": "step", "lr_milestones": [100, 150], "lr_gamma": 0.1, "protocol_epochs": 200,
    "normalize": [list(CIFAR_MEAN), list(SOC_STD)], "augment": True,
    "cert_eps": ["36/255", "72/255", "108/255"],
}


@register_method("soc")
class SOC(Method):
    hparams = {
        "eps": 36 / 255,   # only the radius CRA is reported at when cert_eps names "eps"
        "gamma": 0.0,      # γ of the certificate regularization (ICLR 2022; 0 is the ICML 2021 loss)
    }
    protocols = {
        "cifar10": dict(_SOC_CIFAR),
        # the official loader normalizes CIFAR-100 with the CIFAR-10 constants too
        "cifar100": dict(_SOC_CIFAR),
        # the reference paper's own SOC runs (mlosch/CLL soc/train_soc_on_tinyimagenet.sh, Table B3):
        # LipConv-10 with LLN, γ = 0.3 (best of 0.05–0.4), CIFAR constants, horizontal flip only.
        "tinyimagenet": {**_SOC_CIFAR, "gamma": 0.3},
    }
    certificate = ("sound: f_j − f_i > ε·K_ji, K = L·∏ layer bounds (truncation error or converged power "
                   "iteration, ≥ 1) × (√2, or ‖ŵ_j − ŵ_i‖ with LLN); published: the same with every layer = 1")

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.gamma = float(cfg["gamma"])

    def loss(self, logits, y, bound, progress):
        ce = F.cross_entropy(logits, y)
        cert = label_certificates(logits, y, bound, self.num_classes)
        loss = ce - self.gamma * F.relu(cert).mean() if self.gamma else ce
        return loss, {"ce": ce.detach(), "cert": cert.detach().clamp_min(0).mean()}



__all__ = ["SOC", "label_certificates"]
