"""Optimizers and learning-rate schedules, built from a run config.

The lr schedule is stepped once per iteration. `lr_schedule: step` multiplies the lr by `lr_gamma` at
`lr_milestones` (epochs of the protocol); a run given fewer epochs than its protocol (`protocol_epochs`) has its
milestones scaled in proportion, e.g. 400/600/780 of 800 becomes 50%, 75% and 97.5% of the run (SOC's
×0.1 at 50% and 75% of the steps is `lr_milestones: [100, 150]` of `protocol_epochs: 200`).

`lr_schedule: exp` is Local-Lip-B's (`utils.lr_exp`, stepped per epoch): constant until epoch E/2 + `lr_more`
(25 of 800 epochs, scaled with the run), then exponential decay to `lr_end` at the last epoch.

`lr_schedule: triangular` is CPL's piecewise-linear schedule (Meunier et al. 2022, `TriangularLRScheduler`):
0 → lr at 2/5 of the steps → lr/20 at 4/5 → 0 at the end, stepped per iteration over the run's own length.
The official CPL trainer calls it with t = epoch·len + batch + 1 and epochs counted from 1, i.e. one epoch
ahead: its peak comes an epoch early and its last epoch runs at lr 0. lipbench evaluates step k at t = k + 1.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, List, Mapping, Optional

import numpy as np
import torch


def lr_milestones(cfg: Mapping[str, object], steps_per_epoch: int) -> List[int]:
    """Milestones in iterations, scaled to the run's length (to whole epochs, halves rounded up: Python's
    round-half-even would put 100 of 200 at epoch 0 of a 1-epoch run and decay the lr before the first step)."""
    epochs = int(cfg["epochs"])
    protocol = int(cfg.get("protocol_epochs") or epochs)
    return [int(math.floor(m * epochs / protocol + 0.5)) * steps_per_epoch for m in cfg["lr_milestones"]]


def make_optimizer(cfg: Mapping[str, object], model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD. A model may define `param_groups(weight_decay)` to exempt parameters from weight
    decay (e.g. activation parameters)."""
    name = str(cfg["optimizer"]).lower()
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    params = model.param_groups(wd) if hasattr(model, "param_groups") else model.parameters()
    # `betas`: None means torch's default; SLL's recipes (and CLL's on the SLL family) use (0.5, 0.9)
    betas = tuple(float(b) for b in cfg.get("betas") or (0.9, 0.999))
    # The fused kernels compute the same update as the loop; on small nets they cut the step time by 3×.
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg["momentum"]), weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def make_lr_scheduler(cfg: Mapping[str, object], opt: torch.optim.Optimizer, steps_per_epoch: int,
                      virtual_step: Optional[Callable[[], float]] = None):
    """The run's lr schedule, stepped once per iteration. With `virtual_step` (a budgeted run, whose epoch count
    is re-planned as it trains) the factor is read at step `virtual_step()` of the schedule `cfg` describes
    (progress × its steps) instead of at the scheduler's own count."""
    if virtual_step is not None:
        factor = lr_factor(cfg, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factor(int(math.floor(virtual_step() + 0.5))))
    if str(cfg.get("lr_schedule", "step")) == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestones(cfg, steps_per_epoch), float(cfg["lr_gamma"]))
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))


def lr_factor(cfg: Mapping[str, object], steps_per_epoch: int) -> Callable[[int], float]:
    """The lr factor after k iterations of the schedule `make_lr_scheduler` builds for `cfg` (MultiStepLR's
    γ^#{milestones ≤ k}, or the LambdaLR's factor)."""
    kind = str(cfg.get("lr_schedule", "step"))
    if kind == "step":
        milestones, gamma = lr_milestones(cfg, steps_per_epoch), float(cfg["lr_gamma"])
        return lambda k: gamma ** bisect.bisect_right(milestones, k)
    if kind == "triangular":
        total = max(1, int(cfg["epochs"]) * steps_per_epoch)
        return lambda k: triangular_factor(k + 1, total)
    if kind == "exp":
        epochs = int(cfg["epochs"])
        more = lr_scaled_epochs(cfg, float(cfg["lr_more"]))
        ratio = float(cfg["lr_end"]) / float(cfg["lr"])
        return lambda k: exp_tail_factor(k // max(1, steps_per_epoch), epochs, more, ratio)
    raise ValueError(f"unknown lr_schedule {kind!r}; use 'step', 'triangular' or 'exp'")


def lr_scaled_epochs(cfg: Mapping[str, object], protocol_value: float) -> int:
    """An epoch count of the protocol, scaled to the run's length (as the milestones are)."""
    epochs = int(cfg["epochs"])
    protocol = int(cfg.get("protocol_epochs") or epochs)
    return int(math.floor(protocol_value * epochs / protocol + 0.5))


def exp_tail_factor(epoch: int, epochs: int, more: int, ratio: float) -> float:
    """Local-Lip-B's `lr_exp` (utils.py), per epoch: the lr holds until epoch E//2 + more, then decays
    exponentially to ratio·lr at the last epoch: factor = ratio^((e − (E//2 + more − 1)) / (E//2 − more))."""
    start = epochs // 2 + more
    if epoch < start:
        return 1.0
    return ratio ** ((epoch - (start - 1)) / max(1, epochs // 2 - more))


def triangular_factor(t: int, total: int) -> float:
    """CPL's lr factor at iteration t of `total`: linear 0 → 1 → 1/20 → 0 with knots at 0, 2T/5, 4T/5, T
    (integer knots, as the official `np.interp` call)."""
    return float(np.interp(t, [0, total * 2 // 5, total * 4 // 5, total], [0.0, 1.0, 1.0 / 20.0, 0.0]))
