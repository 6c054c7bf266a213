"""Equal-compute budgets: how close a budgeted run's measured training time comes to its budget.

    python benchmarks/budget.py [--method cll] [--arch moons-mlp] [--budget 60s] [--seeds 1] [--device cpu]

Trains each seed with `budget:` set (a first plan of epochs from timed steps on a copy of the network, bench/train.py
`plan_budget`, re-planned before every epoch by `Run.replan`) and prints the first plan's and the final epochs,
the re-plans, the planned and measured seconds per epoch and the measured training time against the budget. Load
from other jobs slows the steps; the re-plans follow it.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.config import budget_seconds, resolve
from bench.train import train_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="cll")
    ap.add_argument("--arch", default="moons-mlp")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--budget", default="60s")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    args = ap.parse_args(argv)
    print(f"{'seed':>4} {'planned':>7} {'epochs':>7} {'re-plans':>8} {'s/epoch planned':>16} {'s/epoch measured':>17} {'train s':>9} "
          f"{'budget s':>9} {'measured/budget':>16}")
    for seed in range(1, args.seeds + 1):
        spec = {"method": args.method, "arch": args.arch, "budget": args.budget, "device": args.device,
                "lower_bound_pairs": 16, "lower_bound_steps": 5}
        if args.dataset:
            spec["dataset"] = args.dataset
        if args.data_root:
            spec["data_root"] = args.data_root
        if args.train_subset:
            spec["train_subset"] = args.train_subset
        cfg = {**resolve(spec), "seed": seed}
        with tempfile.TemporaryDirectory() as d:
            r = train_run(cfg, Path(d))
        b = r["budget"]
        print(f"{seed:>4} {b['epochs_planned']:>7} {r['epochs']:>7} {b['replans']:>8} "
              f"{b['seconds_per_epoch_planned']:>16.4f} "
              f"{b['seconds_per_epoch_measured']:>17.4f} {r['train_seconds']:>9.1f} {budget_seconds(args.budget):>9.1f} "
              f"{r['train_seconds'] / budget_seconds(args.budget):>16.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
