"""SLL: SDP-based Lipschitz Layers (Araujo, Havens, Delattre, Allauzen, Hu, "A Unified Algebraic Perspective on
Lipschitz Neural Networks", ICLR 2023). Official code: araujoalexandre/Lipschitz-SLL-Networks (87865db).

The layers, the network, its sizes and what the certificate rests on are the family's
(bench/nn/families/sll.py): `sll-{s,m,l,xl}` (current official layers, LLN head), `-trunc` (truncation head,
√2 rule), `-linear` (unconstrained last layer), and `sll-*-paper*` for the paper-era layers (a478875, as in the
reference paper's fork), which are not exactly 1-Lipschitz and are certified with their computed constants.

**Loss** (official `LossXent`, the default `--loss xent`): the offset cross-entropy of AOL,
t·CE((z − u·onehot(y))/t, y) with u = 3√2/2 and t = 0.25 (bench/losses.py, shared with LBDN).

**Recipe** (official `main.py` defaults, `core/trainer.py`, `core/data/readers.py`):
1000 epochs; batch 64 per GPU × 4 GPUs = 256; Adam lr 0.01, betas (0.5, 0.9), no weight decay; the triangular
lr (`--scheduler interp`, `TriangularLRScheduler`: np.interp over 0, 2T/5, 4T/5, T with knots lr → lr/20 → 0)
stepped per step; the family's input handling (`sll_inputs`): inputs in [0, 1] with the dataset mean subtracted
in-model (`--shift_data`, std 1); training augmentation RandomCrop(32, padding 4, reflect) → RandomHorizontalFlip → ColorJitter(brightness
0.1, contrast (0.5, 2), saturation (0.3, 2), hue 0.02) (Tiny-ImageNet: crop 64, still padding 4); evaluation
of the last epoch at ε ∈ {36, 72, 108, 255}/255.
Deviations, all small: the official loop calls `scheduler.step(t)` after the optimizer step with t the 0-based
step, so step 0 runs at the full lr 0.01 and step k at the factor of k − 1 (lipbench: k + 1); its loader keeps
the last partial batch (196 steps per CIFAR epoch) while the schedule counts 195, so its last ~5 epochs run at
lr 0 (lipbench drops the partial batch: 195 steps, the schedule ends with the run). The jitter runs batched on
the device in float (bench/data/augment.py) instead of on PIL images.

**Certificate.** Sound: f_j − f_i > ε·K_ji with K = L·∏ (each layer's guaranteed constant: 1 for current layers
up to rounding allowances, max(1, 2ū² − 1) in general) × ‖ŵ_j − ŵ_i‖ (LLN, as the official `eval_certified`),
√2 (truncation) or ‖W_j − W_i‖ (unconstrained); L = 1/min(std) = 1. Published: the same with every layer 1.
"""
from __future__ import annotations

from bench.losses import OFFSET_U, TEMPERATURE_T, OffsetCrossEntropyMethod
from bench.nn.families.sll import SLL_MEANS, SLL_PIPELINE, sll_inputs
from bench.registry import register_method

@register_method("sll")
class SLL(OffsetCrossEntropyMethod):
    hparams = {
        "eps": 36 / 255,            # only the radius CRA is reported at when cert_eps names "eps"
        "offset": OFFSET_U,         # u of the offset cross-entropy (official --offset, 3√2/2)
        "temperature": TEMPERATURE_T,  # t (official --temperature, 0.25)
        "betas": [0.5, 0.9],        # Adam's (β₁, β₂) (official --beta1 0.5 --beta2 0.9), on any dataset
    }
    protocols = {name: {**SLL_PIPELINE, **sll_inputs(name), "cert_eps": ["36/255", "72/255", "108/255", "255/255"]}
                 for name in SLL_MEANS}
    arch_aliases = {"s": "sll-s", "m": "sll-m", "l": "sll-l", "xl": "sll-xl"}
    certificate = ("sound: f_j − f_i > ε·K_ji, K = L·∏ max(1, 2ū² − 1) (ū ≥ ‖T^{-1/2}W‖ guaranteed) × "
                   "(‖ŵ_j − ŵ_i‖ with LLN, √2 truncated, ‖W_j − W_i‖ unconstrained); published: every layer = 1")

