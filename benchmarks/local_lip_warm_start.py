"""Local-Lip-B's warm start: bound quality against memory, lipbench's 4-bit store against the official one.

The official trainer stores, for every training image and every layer, the last singular vector of its masked
power iteration and restarts from it the next epoch (`u_train`: ≈ 114 k floats per CIFAR-10 image for 6C2F,
23 GB of pinned host memory). lipbench stores those iterates at 4 bits per value, the earliest layers first,
within `warm_start_gb` (`WarmStartStore`); the other layers start from their own *global* power iterate.

This script measures, on a run's checkpoint (or a freshly built net), for N test images at radius ε, the local
norms ‖D_i W_i D_{i−1}‖ after `--steps` power-iteration steps (training uses 2) from
  * a random start (no warm start at all),
  * the shared start alone (every layer from its global iterate, masked; `warm_start_gb: 0`),
  * the converged per-image vector (the limit the official per-image store approaches when the weights move
    slowly: its best case),
  * the same vector through lipbench's store at `--budget-gb` for a training set of `--train-size` images,
against the converged norms (`--converge` steps), per layer and for the product K(x) = ∏ σ_i. Ratios below 1 are
under-estimates (power iteration approaches from below).

With `--dynamic E` (a run folder only) it measures the starts while the weights move instead: E visits of the
same `--points` training images, one Adam step (lr 1e-3, the κ = 0.5 robust loss at ε = 0.1551) between visits;
at each visit K(x) after 2 steps from the shared start, from lipbench's store and from the official float32
vectors (each fed by its own previous visit), against 300 steps from the official vectors.

    python benchmarks/local_lip_warm_start.py results/cifar10/local-lip/6c2f-relux/<hash>/seed-1 --points 64
    python benchmarks/local_lip_warm_start.py --arch 6c2f-relux --points 64      # an untrained net
    python benchmarks/local_lip_warm_start.py results/.../seed-1 --points 64 --dynamic 8
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.nn.families import local_lip as ll  # noqa: E402


def official_store_bytes(net, n_images: int, bytes_per_value: int = 4) -> int:
    """The official u_train: one input-sized vector per image and affine layer."""
    per_image = sum(math.prod(layer.operator_input_shape) for layer, _ in net.hidden)
    return per_image * n_images * bytes_per_value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="a Local-Lip-B run folder (default: a fresh --arch net)")
    p.add_argument("--arch", default="6c2f-relux")
    p.add_argument("--points", type=int, default=64)
    p.add_argument("--eps", type=float, default=36 / 255)
    p.add_argument("--steps", type=int, default=2, help="power-iteration steps per training step (official 2)")
    p.add_argument("--converge", type=int, default=500)
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-gb", type=float, default=2.0, help="lipbench's store budget (warm_start_gb)")
    p.add_argument("--train-size", type=int, default=50_000, help="training images the store is sized for")
    p.add_argument("--dynamic", type=int, default=0, help="visits with a training step between them (run only)")
    args = p.parse_args(argv)
    if args.dynamic:
        if not args.run:
            p.error("--dynamic needs a run folder")
        return dynamic(args)
    torch.manual_seed(args.seed)
    if args.run:
        from bench import load_run
        run = load_run(args.run)
        net = run.model
        x, _ = run.data("test")
        x = x[:args.points]
    else:
        from bench.registry import ARCHS
        net = ARCHS.get(args.arch)((3, 32, 32), 10)
        net.eval()
        net.converge(guaranteed=False)
        x = torch.rand(args.points, 3, 32, 32)
    net = net.double().eval()
    net.converge(guaranteed=False)
    x = x.double()
    with torch.no_grad():
        ib = ll.interval_bounds(net, x, args.eps, [layer.power_bound() for layer, _ in net.hidden])
        limit, vecs = ll.local_layer_norms(net, ib.masks, args.converge, tol=0.0)   # no early stop
        B = x.shape[0]
        shared = [layer.power_iterate.detach().double().reshape(1, *layer.operator_input_shape)
                  .expand(B, *layer.operator_input_shape) for layer, _ in net.hidden]
        shapes = [layer.operator_input_shape for layer, _ in net.hidden]
        layers, nbytes = ll.WarmStartStore.plan(shapes, args.train_size, int(args.budget_gb * 1e9))
        store = ll.WarmStartStore(shapes, B, 0, x.device, layers=layers)   # the training set's plan, B rows
        rows = torch.arange(B)
        store.save(rows, vecs)
        starts = {"random": None, "shared (global iterate)": shared, "per-image converged (official)": vecs,
                  f"lipbench store ({args.budget_gb:g} GB)": store.starts(rows, shared)}
        print(f"{B} test points, ε = {args.eps:.4f}, {args.steps} steps against {args.converge}")
        print(f"{'start':34s} " + " ".join(f"{'layer ' + str(i):>10s}" for i in range(limit.shape[1]))
              + f" {'K(x) mean':>10s} {'K(x) min':>10s}")
        for name, init in starts.items():
            norms, _ = ll.local_layer_norms(net, ib.masks, args.steps, init)
            ratio = norms / limit
            K = norms.prod(1) / limit.prod(1)
            print(f"{name:34s} " + " ".join(f"{float(ratio[:, i].mean()):10.4f}" for i in range(ratio.shape[1]))
                  + f" {float(K.mean()):10.4f} {float(K.min()):10.4f}")
    print(f"memory for {args.train_size} training images: official per-image store (float32) "
          f"{official_store_bytes(net, args.train_size) / 1e9:.2f} GB; lipbench's store "
          f"{nbytes / 1e9:.2f} GB (4 bits per value, layers {layers}), plus the layers' own "
          f"iterates {sum(math.prod(layer.operator_input_shape) for layer, _ in net.hidden) * 4 / 1e6:.2f} MB")
    return 0


def dynamic(args) -> int:
    """The three starts over `args.dynamic` visits of the same training images, the weights moving between them."""
    from bench import load_run
    torch.manual_seed(args.seed)
    run = load_run(args.run)
    net = run.model.train()
    x, y = run.data("train")
    x, y = x[:args.points].float(), y[:args.points]
    B, eps, rows = x.shape[0], 0.1551, torch.arange(x.shape[0])
    shapes = [layer.operator_input_shape for layer, _ in net.hidden]
    layers, nbytes = ll.WarmStartStore.plan(shapes, args.train_size, int(args.budget_gb * 1e9))
    store = ll.WarmStartStore(shapes, B, 0, x.device, layers=layers)
    official = None
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    print(f"{B} training images, ε = {eps}, K(x) after 2 steps / after 300 steps from the official vectors "
          f"(mean, min); lipbench's store: layers {layers}, {nbytes / 1e9:.2f} GB for {args.train_size} images")
    print(f"{'visit':>5s} {'shared start':>18s} {'lipbench store':>18s} {'official float32':>18s}")
    for visit in range(args.dynamic):
        with torch.no_grad():
            ib = ll.interval_bounds(net, x, eps, [layer.train_bound(2).detach() for layer, _ in net.hidden])
            shared = [layer.power_iterate.detach().reshape(1, *layer.operator_input_shape)
                      .expand(B, *layer.operator_input_shape) for layer, _ in net.hidden]
            ref, _ = ll.local_layer_norms(net, ib.masks, 300, official if official is not None else shared, tol=0.0)
            out = {}
            for name, init in (("shared", shared), ("store", store.starts(rows, shared)),
                               ("official", official if official is not None else shared)):
                norms, vecs = ll.local_layer_norms(net, ib.masks, 2, init)
                out[name] = (norms.prod(1) / ref.prod(1), vecs)
        store.save(rows, out["store"][1])
        official = [v.clone() for v in out["official"][1]]
        print(f"{visit:5d} " + " ".join(f"{float(r.mean()):8.4f} {float(r.min()):8.4f} " for r, _ in out.values()),
              flush=True)
        bound = net.bound(x, eps, n_iter=2)
        loss = ll.robust_loss(bound.logits, bound.worst_logits(y, 1), y, kappa=0.5)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.project_()
    return 0


if __name__ == "__main__":
    sys.exit(main())
