"""CLL: Calibrated Lipschitz-Margin Loss (Losch, Stutz, Schiele, Fritz, GCPR 2023).

The logistic scale is calibrated to the margin width 2ε measured in input space (main paper eq. 4–5):

    σ_ε(p) = 2ε / (h⁻¹(1 − p/2) − h⁻¹(p/2)),        h⁻¹(y) = log(y / (1 − y))

and, for label y, the multinomial loss is cross-entropy over (supplement eq. 1–2)

    g_y(i, x) = δ/σ + (f_i(x) − f_y(x)) / (σ·K_iy)     for i ≠ y
    g_y(y, x) = −δ/σ                                   (two-sided; 0 with the one-sided offset)

with the pairwise constants K_iy = K_up·‖W_i − W_y‖₂ (the default), plus the regulariser λ·K̄² with
K̄ = max_ij K_ij (main eq. 3). The model's constant is then K(h∘f) = 1/σ.

Slack `p`: this is the official `err_quantile` q, the value Tables 1, 2 and D5 print (K(h∘f) = 1/σ gives
11.56 at ε = 0.15, p = 0.3, the tables' number). Eq. 5 and Table B4 write p for what is q/2 here: Table B4's
p = 0.15 for 4C3F is q = 0.3 in the official config (reference/cll-official-code.md §0).

Choices, each an option:
* `normalization: pairwise` (default, supplement eq. 2) or `per_logit`, the official
  `KeepLipschitzMarginCELossV2` used by most official configs: g_i = f_i / (σ·K_up·‖W_i‖) ± δ/σ.
* `one_sided: false` (eq. 2) or `true` (offset 0 at the label, as the official two-moons configs).
* `delta`: the offset δ (default: ε; supplement Fig. D4b tunes it).
* `p` and `beta` take schedules (supplement eq. 17); β scales the normaliser as f/(K·β) (Tiny-ImageNet).
* The normaliser K is detached, as in the official code (`detach_K=True, detach_Kfc=True`); only λK̄² carries
  a gradient into K. (The official code also back-propagates through its 5 power-iteration steps; here the
  gradient flows through the final Rayleigh estimate, as in GloRo.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.method import Method
from bench.nn.bound import PairwiseBound
from bench.nn.families.sandwich import LBDN_PIPELINE, sandwich_inputs
from bench.nn.families.sll import SLL_PIPELINE, SLL_SIZES, sll_inputs
from bench.registry import register_method
from bench.schedules import final_value, make_schedule


def logit(y: float) -> float:
    return torch.log(y / (1.0 - y)) if torch.is_tensor(y) else math.log(y / (1.0 - y))


def calibrated_sigma(eps: float, p: float) -> float:
    """σ_ε(p) = 2ε / (logit(1 − p/2) − logit(p/2)), computed in float64 (the official code's `(1−q)+q/2`). A
    0-d float64 tensor p (a compiled packed step's schedule value) gives a tensor, unchecked: the schedule's ends
    are checked when the method is built."""
    if not torch.is_tensor(p) and not 0.0 < p < 1.0:
        raise ValueError(f"CLL slack p must lie in (0, 1), got {p}")
    Q = logit((1.0 - p) + p / 2.0) - logit(p / 2.0)
    return 2.0 * eps / Q


def cll_logits(logits: torch.Tensor, y: torch.Tensor, bound: PairwiseBound, eps: float, p: float,
               delta: float, one_sided: bool = False, normalization: str = "pairwise",
               beta: float = 1.0) -> torch.Tensor:
    """The calibrated logits g_y(i, x) that CLL feeds to cross-entropy (supplement eq. 2). K is detached."""
    sigma = calibrated_sigma(eps, p)
    K_up = bound.K_up.detach()
    if normalization == "pairwise":
        D = bound.detach().distances()[y]                       # ‖W_y − W_i‖, [B, N]
        D = D.scatter(1, y[:, None], 1.0)                         # the label's own entry: f_y − f_y = 0 anyway
        scale = D * (beta * sigma) * K_up
        z = (logits - logits.gather(1, y[:, None])) / scale
    elif normalization == "per_logit":
        row_norms = torch.linalg.vector_norm(bound.W.detach(), dim=1)  # ‖W_i‖
        z = logits / (row_norms * (beta * sigma) * K_up)
    else:
        raise ValueError(f"unknown CLL normalization {normalization!r}; use 'pairwise' or 'per_logit'")
    at_label = torch.zeros_like(z, dtype=torch.bool).scatter(1, y[:, None], True)
    label_offset = 0.0 if one_sided else -delta / sigma
    # 0-d in z's dtype whether σ is a float or a tensor (a compiled pack's scheduled p)
    offset = torch.where(at_label, torch.as_tensor(label_offset, dtype=z.dtype, device=z.device),
                         torch.as_tensor(delta / sigma, dtype=z.dtype, device=z.device))
    return z + offset


@register_method("cll")
class CLL(Method):
    hparams = {
        "eps": 0.15,             # ε: the margin is 2ε
        "p": 0.3,                # slack (official err_quantile q); number or schedule
        "delta": None,           # offset δ; None means δ = ε
        "lam": 1e-4,             # λ of λ·K̄² (Table B4, 4C3F)
        "one_sided": False,
        "normalization": "pairwise",
        "beta": 1.0,             # K-scale β; number or schedule (Tiny-ImageNet: poly 0.01 → 1, power 10)
    }
    protocols = {
        # Supplement B, Table B1: 1000 epochs, batch 100, Adam 1e-3 → 1e-4 at epoch 400, λ = 1e-6,
        # p annealed 1e-3 → 1e-12 with γ = 50 (eq. 17; the official config ends at 1e-15), one-sided offset.
        "moons": {"epochs": 1000, "batch_size": 100, "lr": 1e-3, "lr_milestones": [400],
                  "protocol_epochs": 1000, "lam": 1e-6, "one_sided": True,
                  "p": {"schedule": "poly", "start": 1e-3, "end": 1e-12, "power": 50}},
        # Table B4 (CLL on 4C3F and 6C2F) and the official cifar10_4C3F_cll_* configs: 800 epochs (the configs
        # run 801), batch 128, Adam 1e-3 without weight decay, ×0.1 at epochs 400/600/780, ε = δ = 0.15, fixed,
        # 5 power iterations, p = 0.3 (Table B4 prints 0.15 = q/2; the configs' err_quantile is 0.3), λ = 1e-4.
        # The official 6C2F configs use λ = 1e-6 instead (suites/cifar10.yaml sets it per cell).
        "cifar10": {"epochs": 800, "batch_size": 128, "lr": 1e-3, "lr_milestones": [400, 600, 780],
                    "protocol_epochs": 800, "eps": 0.15, "p": 0.3, "lam": 1e-4},
        # The paper trains no plain net on CIFAR-100: the plain-net CIFAR schedule above with Table B4's
        # CIFAR-100 loss settings (CLL on CPL-XL: ε = δ = 1.0, p = 1e-3, λ = 1e-3; SLL-XL uses p = 3e-3).
        "cifar100": {"epochs": 800, "batch_size": 128, "lr": 1e-3, "lr_milestones": [400, 600, 780],
                     "protocol_epochs": 800, "eps": 1.0, "p": 1e-3, "lam": 1e-3},
        # Table B4 (CLL on 8C2F) and the official tiny-imagenet_8C2F_cll_* configs: 800 epochs, batch 256, Adam
        # 2.5e-4 ×0.1 at 400/600/780, β polynomial 0.01 → 1 with γ = 10, ε = 0.5 with p = 0.01 (Table 1's first
        # row) and λ = 1e-5. The ε = 1.0, p = 0.025 runs use λ = 1e-3 in the official configs (Table B4: 1e-5);
        # suites/tinyimagenet.yaml holds both cells.
        "tinyimagenet": {"epochs": 800, "batch_size": 256, "lr": 2.5e-4, "lr_milestones": [400, 600, 780],
                         "protocol_epochs": 800, "eps": 0.5, "p": 0.01, "lam": 1e-5,
                         "beta": {"schedule": "poly", "start": 0.01, "end": 1.0, "power": 10}},
    }
    # CLL on the 1-Lipschitz families (supplement B: "unconstrained final classification layer, instead of
    # last-layer normalization"): K_up = the backbone's sound bound × L, K_ij = K_up·‖W_i − W_j‖. Keyed
    # "<dataset>@<arch family>" (the arch factory's `family`), refining the dataset's recipe above. The
    # official forks keep `best` checkpoints by test accuracy beside the last; lipbench reports the last epoch.
    # Their λ·K̄² takes the max over the batch's label rows; lipbench's over all pairs.
    protocols.update({
        # Table B4 (LipConv, CIFAR-10) and mlosch/CLL soc/train_cll_on_cifar10.sh: HH1, 200 epochs, batch 128,
        # AdamW 1e-3 with decoupled weight decay 5e-4 (none on HH parameters), ×0.1 at epochs 100 and 150,
        # ε = δ = 0.25, p = 0.05, λ = 1e-3; SOC's inputs (mean, std 0.2507: L = 3.99). The official loader
        # augments by crop + flip only; the CIFAR dataset's augmentation adds jitter and rotation.
        "cifar10@lipconv": {"epochs": 200, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3,
                            "weight_decay": 5e-4, "lr_milestones": [100, 150], "protocol_epochs": 200,
                            "eps": 0.25, "p": 0.05, "lam": 1e-3,
                            "normalize": [[0.4914, 0.4822, 0.4465], [0.2507, 0.2507, 0.2507]]},
        # Table B4 (LipConv, Tiny-ImageNet) and soc/train_cll_on_tinyimagenet.sh: ε = δ = 0.15, λ = 1e-5,
        # p = 0.3 for LipConv-20 (Table 1's row; the script uses p = 0.1 for LipConv-10), no β schedule, else
        # as CIFAR-10.
        "tinyimagenet@lipconv": {"epochs": 200, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3,
                                 "weight_decay": 5e-4, "lr_milestones": [100, 150], "protocol_epochs": 200,
                                 "eps": 0.15, "p": 0.3, "lam": 1e-5, "beta": 1.0,
                                 "normalize": [[0.4914, 0.4822, 0.4465], [0.2507, 0.2507, 0.2507]]},
        # Table B4 ((CPL-)XL) and cpl/train_cll_on_cifar10.sh: 200 epochs, batch 256, Adam 1e-3, triangular lr,
        # ε = δ = 0.25, p = 0.1, λ = 1e-3; CPL's inputs (mean subtracted, std 1: L = 1).
        "cifar10@cpl": {"epochs": 200, "protocol_epochs": 200, "batch_size": 256, "optimizer": "adam", "lr": 1e-3,
                        "weight_decay": 0.0, "lr_schedule": "triangular", "lr_milestones": [],
                        "eps": 0.25, "p": 0.1, "lam": 1e-3,
                        "normalize": [[0.4913997551666284, 0.48215855929893703, 0.4465309133731618],
                                      [1.0, 1.0, 1.0]]},
        # cpl/train_cll_on_cifar100.sh: ε = δ = 1.0, p = 1e-3, λ = 1e-3.
        "cifar100@cpl": {"epochs": 200, "protocol_epochs": 200, "batch_size": 256, "optimizer": "adam",
                         "lr": 1e-3, "weight_decay": 0.0, "lr_schedule": "triangular", "lr_milestones": [],
                         "eps": 1.0, "p": 1e-3, "lam": 1e-3,
                         "normalize": [[0.5071, 0.4865, 0.4409], [1.0, 1.0, 1.0]]},
    })
    # Table B4 ((SLL-)XL) and the official SLL fork (mlosch/CLL sll/): SLL's own training pipeline (1000 epochs,
    # batch 256, Adam 0.01 with betas (0.5, 0.9), the per-step triangular lr, SLL's inputs and augmentation) with
    # the CLL loss at ε = δ = 1.0. CIFAR-10: p = 5e-5, λ = 1e-3 (K(h∘f) = 1/σ = 10.6, Table 2's value).
    # CIFAR-100: p = 3e-3 (K(h∘f) = 6.5, Table 2) and λ = 1e-3 as Table B4; the fork's CIFAR-100 script passes
    # λ = 1e-5 but cannot run as committed (its --clip_* flags are not the parser's --cll_*,
    # cll-official-code.md §8), so Table B4 is the recipe of record. The fork uses the paper-era layers: arch
    # `sll-xl-paper-linear`; `--arch sll-xl` means the current official layers, as for SLL itself.
    protocols.update({
        "cifar10@sll": {**SLL_PIPELINE, **sll_inputs("cifar10"), "eps": 1.0, "p": 5e-5, "lam": 1e-3},
        "cifar100@sll": {**SLL_PIPELINE, **sll_inputs("cifar100"), "eps": 1.0, "p": 3e-3, "lam": 1e-3},
    })
    # CLL on Sandwich: the paper trains none (Table 1 sets LBDN on Sandwich against CLL on 8C2F). lipbench's
    # recipe, so the two losses can run side by side on one backbone: LBDN's certified pipeline (400 epochs,
    # batch 256, Adam 0.01, the triangular lr, LBDN's inputs and augmentation) with the CLL settings of the
    # paper row each dataset compares with the AOL loss: Tiny-ImageNet ε = 1.0, p = 0.025 (Table 1, 8C2F) with
    # λ = 1e-3 as the official tiny-imagenet_8C2F_cll_random_seeds configs (Table B4 prints 1e-5); CIFAR-10 and
    # CIFAR-100 as CLL on SLL-XL above.
    protocols.update({
        f"{ds}@sandwich": {**LBDN_PIPELINE, **sandwich_inputs(ds), "eps": 1.0, "p": p, "lam": 1e-3,
                           "beta": 1.0}
        for ds, p in {"cifar10": 5e-5, "cifar100": 3e-3, "tinyimagenet": 0.025}.items()
    })
    # CLL needs weight rows in the last layer: these names mean the families' unconstrained-linear variants.
    arch_aliases = {"xl": "cpl-xl-linear", "cpl-xl": "cpl-xl-linear",
                    "lipconv-10": "lipconv-10-linear", "lipconv-20": "lipconv-20-linear",
                    "sandwich": "sandwich-linear", "sandwich-lin": "sandwich-linear",
                    **{f"sll-{size}{variant}{head}": f"sll-{size}{variant}-linear"
                       for size in SLL_SIZES for variant in ("", "-paper") for head in ("", "-trunc")}}
    # `--profile official`: the official code (mlosch/CLL, unconstrained/) wherever lipbench differs on purpose,
    # each an ordinary option (reference/cll-official-code.md §1, §5, §7, §8). Not switchable: the official CLL
    # back-propagates through its 5 power-iteration steps (lipbench through the final estimate; the iterate is
    # near-converged, as it is re-converged every epoch) and draws the moons from numpy's global RNG.
    profiles = {"official": {
        # moons configs: KeepLipschitzMarginCELossV2 (per-logit ‖W_i‖), q 1e-3 → 1e-15 (the paper says 1e-12),
        # AdamW (weight decay 0), 1001 epochs of 20 iterations, lr ×0.1 at iteration 8000 (epoch 400)
        "moons": {"normalization": "per_logit", "optimizer": "adamw", "epochs": 1001, "protocol_epochs": 1001,
                  "p": {"schedule": "poly", "start": 1e-3, "end": 1e-15, "power": 50}},
        # cifar10_*_cll_* configs: 801 epochs (milestones stay at 400/600/780), AdamW with weight decay 0. The 4C3F
        # sweeps use the pairwise `CLL` class, the 6C2F ones per-logit V2 (`--set normalization=per_logit`).
        "cifar10": {"optimizer": "adamw", "epochs": 801, "protocol_epochs": 801},
        # tiny-imagenet_8C2F_cll_* configs: V2 (per-logit), 801 epochs, AdamW
        "tinyimagenet": {"normalization": "per_logit", "optimizer": "adamw", "epochs": 801, "protocol_epochs": 801},
    }}
    certificate = Method.certificate

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.eps = float(cfg["eps"])
        self.delta = self.eps if cfg.get("delta") is None else float(cfg["delta"])
        self.p = make_schedule(cfg["p"])
        self.beta = make_schedule(cfg["beta"])
        self.lam = float(cfg["lam"])
        self.one_sided = bool(cfg["one_sided"])
        self.normalization = str(cfg["normalization"])
        for t in (0.0, 1.0):   # validate p early, at both ends of its schedule
            calibrated_sigma(self.eps, self.p(t))

    @classmethod
    def member_scalars(cls, cfg):
        return ("eps", "delta")

    def loss(self, logits, y, bound, progress, eps=None, delta=None):
        eps = self.eps if eps is None else eps
        delta = self.delta if delta is None else delta
        p, beta = self.p(progress), self.beta(progress)
        z = cll_logits(logits, y, bound, eps, p, delta, self.one_sided, self.normalization, beta)
        ce = F.cross_entropy(z, y)
        K_bar = bound.max(self.num_classes)
        total = ce + self.lam * K_bar ** 2 if self.lam else ce
        return total, {"ce": ce.detach(), "K_bar": K_bar.detach(), "p": p}

    def K_hf(self, bound):
        """K(h∘f) = 1/σ_ε(p) at the end of the p schedule (main paper §3.3)."""
        return 1.0 / calibrated_sigma(self.eps, final_value(self.cfg["p"]))
