"""LBDN: Lipschitz-bounded deep networks of Sandwich layers (Wang & Manchester, "Direct Parameterization of
Lipschitz-Bounded Deep Networks", ICML 2023). Official code: acfr/LBDN (read at d81ed68).

**Network.** The Sandwich family (bench/nn/families/sandwich.py: the layers, the `DNN` architecture as
`sandwich` / `sandwich-lin` / `sandwich-linear`, and what each layer's guaranteed constant rests on).

**Loss.** The certified runs train with the official `Xent` (taken from SLL): the offset cross-entropy
t·CE((z − u·onehot(y))/t, y) with u = √2·1.5 ≈ 2.121 (`--loss xent`, `config.offset = 1.5` times √2 inside
`Xent`) and t = 0.25 (bench/losses.py). It uses no Lipschitz bound: the net is γ-Lipschitz by construction
(γ = 1 in the certified runs).

**Certificate.** Sound (the engine's): f_j − f_i > ε·K_ji with K = L·∏ (each Sandwich layer's guaranteed
constant, 1 + a proven floating-point allowance) × ‖ŵ_j − ŵ_i‖ (LLN), × √2 (SandwichLin head), or
× ‖W_j − W_i‖ (unconstrained head); L = 1/min(std) = 1 (mean-only normalisation). Published (official
`train.py --cert_acc`): the same with every layer exactly 1, K scaled by γ (`cra_published`).

**Recipe** (README, "Certified robustness", Tables 3–4, and `main.py`/`train.py`/`dataset.py` defaults): the DNN
with LLN, 400 epochs, batch 256 (drop_last), Adam lr 0.01, no weight decay, the per-step triangular lr
0 → lr at 40 % → lr/20 at 80 % → 0 (official `lr_schedule(epoch + (batch + 1)/steps)` with knots at E·2//5,
E·4//5, E epochs: for E = 400 exactly bench/optim.py's `triangular`, whose knots are in steps; they differ by
under an epoch only when 5 ∤ E), γ = 1; inputs ToTensor − mean (std 1: `--normalized` is off in the certified
runs); last epoch reported; seeds 123, 43, 13 in the README. CIFAR-100 and Tiny-ImageNet are the README's
certified runs; CIFAR-10 uses the same recipe and is **not** in the README (its CIFAR-10 experiments are
empirical, with the KWL nets and a hinge loss).

Augmentation (`dataset.py`): RandomCrop(S, padding=4, padding_mode="reflect") → RandomHorizontalFlip →
ColorJitter(brightness=0.1, contrast=(0.5, 2), saturation=(0.3, 2), hue=0.02) (SLL's values), S = 32 and 64
alike (padding 4 on Tiny-ImageNet too), no rotation: the family's `sandwich_inputs` (bench/data/augment.py,
`ImageAugment.configured`), batched on the device in float instead of PIL's uint8 steps.
"""
from __future__ import annotations

from bench.losses import OFFSET_U, TEMPERATURE_T, OffsetCrossEntropyMethod
from bench.nn.families.sandwich import LBDN_MEANS, LBDN_PIPELINE, sandwich_inputs
from bench.registry import register_method

@register_method("lbdn")
class LBDN(OffsetCrossEntropyMethod):
    hparams = {
        "eps": 36 / 255,             # only the radius CRA is reported at when cert_eps names "eps"
        "offset": OFFSET_U,          # u = √2·1.5 of the official Xent (config.offset = 1.5, times √2 inside)
        "temperature": TEMPERATURE_T,  # t = 0.25
    }
    protocols = {name: {**LBDN_PIPELINE, **sandwich_inputs(name), "cert_eps": ["36/255", "72/255", "108/255"]}
                 for name in LBDN_MEANS}
    arch_aliases = {"dnn": "sandwich", "sandwich-lln": "sandwich"}
    certificate = ("sound: f_j − f_i > ε·K_ji, K = L·∏ Sandwich layer bounds (1 + proven floating-point allowance) × "
                   "(‖ŵ_j − ŵ_i‖ with LLN, √2 with SandwichLin); published: every layer = 1, K scaled by γ")

