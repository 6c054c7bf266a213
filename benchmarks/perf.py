"""`bench perf`: measured figures for the image pipeline (a benchmark: it prints numbers, it asserts nothing).

1. Step time of a CLL step on 4C3F (forward, 5 power-iteration steps per layer, the CLL loss, backward, Adam)
   against a plain cross-entropy step of the same network, batch and optimizer. Target: ratio ≤ 1.10.
2. Epoch time on CIFAR-10 through the engine's own loop (`bench.train.train_run`: device-resident data,
   on-device augmentation, the steps, the epoch-end convergence). On a CPU a subset is timed and scaled to
   the full 50,000 images (the convergence, timed on its own, is counted once).
3. Packed against unpacked training (bench/pack.py) for moons and CIFAR-10 4C3F at K = 1, 3, 9 members: step
   times, the epoch-end convergence, runs per hour over the protocol, and the projected wall time of the paper's
   CIFAR-10 4C3F protocol (9 seeds × 800 epochs).
4. Augmentation throughput in images/s: the batched on-device pipeline against torchvision's per-image
   transforms (the official configs' PIL pipeline, and torchvision.transforms.v2 on tensors) on the same
   images, per image as one DataLoader worker runs them (one process, one thread).

    bench perf [--device cuda] [--batch 128] [--steps 20] [--data-root DIR] [--epoch-subset N] [--skip-epoch]
               [--pack-sizes 1,3,9] [--only-pack] [--pack-compile]

Runnable as `python benchmarks/perf.py ...` too. On a CPU shared with other work (load above the core
count) pass `--threads 1`: the power iteration's batch-1 convolutions otherwise wait at every thread barrier
for a descheduled thread, which inflates the CLL step and the convergence many times over.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _images(data_root: Optional[str], n: int, seed: int = 0):
    """n CIFAR-10 training images (uint8 NCHW) and labels, or random ones when CIFAR-10 is not found."""
    from bench.data.base import DatasetNotFoundError
    from bench.registry import DATASETS

    try:
        bundle = DATASETS.get("cifar10")({"data_root": data_root}, seed)
        return bundle.x_train[:n], bundle.y_train[:n], "CIFAR-10"
    except DatasetNotFoundError:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return x, torch.randint(0, 10, (n,), generator=g), "random (CIFAR-10 not found)"


def step_times(arch: str, batch: int, steps: int, device: torch.device, data_root: Optional[str]) -> Dict:
    """Median seconds per CLL step and per plain CE step of the same net, batch and optimizer."""
    import methods  # noqa: F401  (registers the methods)
    from bench.config import resolve
    from bench.optim import make_optimizer
    from bench.registry import ARCHS, METHODS

    cfg = resolve({"method": "cll", "arch": arch, "dataset": "cifar10"})
    x8, y, source = _images(data_root, batch)
    x, y = (x8.float() / 255).to(device), y.to(device)
    torch.manual_seed(0)
    model = ARCHS.get(arch)((3, 32, 32), 10).to(device)
    method = METHODS.get("cll")(cfg, 10)
    opt = make_optimizer(cfg, model)
    power_iter = int(cfg["power_iter"])

    def cll_step():
        logits = model(x)
        loss, _ = method.loss(logits, y, model.bound(n_iter=power_iter), 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ce_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        cll_step()
        ce_step()
    times: Dict[str, List[float]] = {"cll": [], "ce": []}
    for _ in range(steps):  # alternating, so that load drift on a shared machine hits both alike
        for name, fn in (("ce", ce_step), ("cll", cll_step)):
            times[name].append(_timed(fn, device))
    t0 = time.perf_counter()
    model.converge(tol=float(cfg["converge_tol"]))
    converge = time.perf_counter() - t0
    cll, ce = statistics.median(times["cll"]), statistics.median(times["ce"])
    return {"cll": cll, "ce": ce, "ratio": cll / ce, "steps": len(times["cll"]), "source": source,
            "converge": converge}


def pack_throughput(arch: str, dataset: str, members: int, steps: int, device: torch.device,
                    data_root: Optional[str], compile: bool = False) -> Dict:
    """Packed against unpacked CLL training (bench/pack.py): seconds per step of `members` runs stacked in one
    step (`compile`: the compiled pack step, as `pack_compile` gives long packs; its compilation is left out of
    the timing, among the warm-up steps), and of one run alone (eager); the epoch-end convergence of all members
    at once and of one; and the runs per hour both give over the dataset's protocol (its epochs × steps per
    epoch of the full training set)."""
    import copy

    import methods  # noqa: F401
    from bench.config import resolve
    from bench.optim import make_optimizer
    from bench.pack import Pack, PackTally
    from bench.train import EpochTally, Run, train_step

    cfgs = [{**resolve({"method": "cll", "arch": arch, "dataset": dataset, "device": str(device),
                        "data_root": data_root}), "seed": s} for s in range(1, members + 1)]
    with tempfile.TemporaryDirectory(prefix="lipbench-perf-") as tmp:
        runs = [Run(c, Path(tmp) / str(i), device, budget_probe=False) for i, c in enumerate(cfgs)]
    cfg, power_iter, tol = runs[0].cfg, int(cfgs[0]["power_iter"]), float(cfgs[0]["converge_tol"])
    batches = [r.batch(0, r.epoch_order()) for r in runs]

    alone = copy.deepcopy(runs[0].model)
    opt = make_optimizer(cfg, alone)
    tally = EpochTally(device)
    xb, yb = batches[0]

    def unpacked_step():
        train_step(alone, alone, runs[0].method, opt, None, xb, yb, 0.5, power_iter, tally)

    pack = Pack(runs, power_iter, compile=compile)
    ptally = PackTally(members, device)
    x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])

    def packed_step():
        pack.step(x, y, 0.5, ptally)

    for _ in range(3):
        unpacked_step()
        packed_step()
    times: Dict[str, List[float]] = {"alone": [], "pack": []}
    for _ in range(steps):
        times["alone"].append(_timed(unpacked_step, device))
        times["pack"].append(_timed(packed_step, device))
    converge_alone = _timed(lambda: alone.converge(tol=tol, guaranteed=False), device)
    for m in range(members):
        pack.to_member(m)
    converge_pack = _timed(lambda: pack.converge(range(members), tol), device)
    alone_step, pack_step = statistics.median(times["alone"]), statistics.median(times["pack"])
    n_full = {"moons": int(cfg.get("n_train") or 2000), "cifar10": 50_000, "cifar100": 50_000,
              "tinyimagenet": 100_000}[dataset]
    epochs, spe = int(cfg["epochs"]), n_full // int(cfg["batch_size"])
    run_alone = epochs * (spe * alone_step + converge_alone)
    run_packed = epochs * (spe * pack_step + converge_pack) / members
    return {"members": members, "alone_step": alone_step, "pack_step": pack_step, "converge_alone": converge_alone,
            "converge_pack": converge_pack, "runs_per_hour_alone": 3600 / run_alone,
            "runs_per_hour_packed": 3600 / run_packed, "epochs": epochs, "steps_per_epoch": spe,
            "protocol_hours_packed": run_packed * members / 3600, "protocol_hours_alone": run_alone * members / 3600}


class _Stop(Exception):
    pass


def epoch_time(device: torch.device, data_root: Optional[str], subset: Optional[int], batch: int) -> Dict:
    """One epoch of CLL-4C3F on CIFAR-10 through `train_run` (stopped after the epoch, before evaluation)."""
    import methods  # noqa: F401
    from bench.config import resolve
    from bench.nn.bound import LipschitzNet
    from bench.train import train_run

    cfg = resolve({"method": "cll", "arch": "4c3f", "dataset": "cifar10", "epochs": 2, "eval_every": 10**6,
                   "batch_size": batch, "data_root": data_root, "device": str(device), "train_subset": subset})
    cfg["seed"] = 1
    converge_seconds: List[float] = []
    original = LipschitzNet.converge

    def timed_converge(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kw)
        finally:
            converge_seconds.append(time.perf_counter() - t0)

    row: Dict = {}

    def stop(epoch, epochs, r):
        row.update(r)
        raise _Stop

    LipschitzNet.converge = timed_converge
    try:
        with tempfile.TemporaryDirectory(prefix="lipbench-perf-") as tmp:
            try:
                train_run(cfg, Path(tmp), on_epoch=stop)
            except _Stop:
                pass
    finally:
        LipschitzNet.converge = original
    n_full = 50_000
    n = min(subset or n_full, n_full)
    total = float(row["train_seconds"])
    conv = sum(converge_seconds)
    steps_full, steps_here = n_full // batch, max(1, n // batch)
    return {"images": n, "measured": total, "converge": conv,
            "full_epoch": (total - conv) * steps_full / steps_here + conv}


def augment_throughput(device: torch.device, data_root: Optional[str], n_batched: int, n_per_image: int) -> Dict:
    """images/s of the batched pipeline and of torchvision's per-image pipelines on the same images."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import v2

    from bench.data.augment import ImageAugment

    x8, _, source = _images(data_root, max(n_batched, n_per_image))
    aug = ImageAugment(32, 4)
    gen = torch.Generator().manual_seed(0)
    xb = (x8[:n_batched].float() / 255).to(device)
    aug(xb[:256], gen)                                              # warm-up
    reps = [_timed(lambda: aug(xb, gen), device) for _ in range(3)]
    batched = n_batched / statistics.median(reps)

    # per-image pipelines run in DataLoader workers, one thread each: measured the same way
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    official = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(.25, .25, .25),
                          T.RandomRotation(2), T.ToTensor()])
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x8[:n_per_image]]
    t0 = time.perf_counter()
    for im in pil:
        official(im)
    per_image_pil = n_per_image / (time.perf_counter() - t0)

    tensor_v2 = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.ColorJitter(.25, .25, .25),
                            v2.RandomRotation(2)])
    xf = x8[:n_per_image].float() / 255
    t0 = time.perf_counter()
    for img in xf:
        tensor_v2(img)
    per_image_v2 = n_per_image / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {"batched": batched, "pil": per_image_pil, "v2": per_image_v2, "source": source,
            "n_batched": n_batched, "n_per_image": n_per_image}


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def pack_lines(sizes: List[int], steps: int, device: torch.device, data_root: Optional[str],
               compile: bool = False) -> List[str]:
    """Table rows of `pack_throughput` for moons and CIFAR-10 4C3F at each pack size, printed as measured; then
    the projected wall time of the paper's CIFAR-10 4C3F protocol (9 seeds × 800 epochs) at the largest size."""
    lines = []
    last = None
    for arch, dataset in (("moons-mlp", "moons"), ("4c3f", "cifar10")):
        for k in sizes:
            r = pack_throughput(arch, dataset, k, steps, device, data_root, compile)
            last = r if dataset == "cifar10" else last
            label = f"packed K = {k}{' (compiled)' if compile else ''}, CLL {arch} on {dataset}"
            lines.append(_row([label, f"{r['runs_per_hour_packed']:.2f} runs/h",
                               f"unpacked {r['runs_per_hour_alone']:.2f} runs/h "
                               f"(×{r['runs_per_hour_packed'] / r['runs_per_hour_alone']:.2f}); step "
                               f"{r['pack_step'] * 1e3:.1f} ms for {k} vs {r['alone_step'] * 1e3:.1f} ms for one; "
                               f"epoch-end convergence {r['converge_pack']:.2f} s vs {r['converge_alone']:.2f} s; "
                               f"protocol {r['epochs']} epochs × {r['steps_per_epoch']} steps"]))
            print(lines[-1], flush=True)
    if last is not None:
        k = last["members"]
        seeds = 9
        packs = -(-seeds // k)
        hours_packed = packs * last["protocol_hours_packed"]
        hours_alone = seeds * last["protocol_hours_alone"] / last["members"]
        lines.append(_row(["CIFAR-10 4C3F protocol, 9 seeds × 800 epochs (projected)",
                           f"{hours_packed:.1f} h packed", f"{packs} pack(s) of ≤ {k} one after another; "
                           f"{hours_alone:.1f} h as 9 runs one after another"]))
        print(lines[-1], flush=True)
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench perf", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--arch", default="4c3f")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per kind (median reported)")
    p.add_argument("--data-root", help="where CIFAR-10 lives (also: BENCH_DATA); random images if absent")
    p.add_argument("--epoch-subset", type=int,
                   help="time the epoch on this many images and scale (default: all on CUDA, 1280 on CPU)")
    p.add_argument("--skip-epoch", action="store_true", help="leave out the epoch measurement")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--pack-sizes", default="1,3,9",
                   help="members per pack timed against as many unpacked runs, for moons and 4C3F ('' to skip)")
    p.add_argument("--only-pack", action="store_true", help="only the packed-versus-unpacked measurements")
    p.add_argument("--pack-compile", action="store_true", help="time the compiled pack step (pack_compile: true)")
    args = p.parse_args(argv)

    from bench.train import device_name, pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    lines = [_row(["measurement", "value", "notes"]), _row(["---"] * 3)]
    sizes = [int(k) for k in args.pack_sizes.split(",") if k.strip()]
    if sizes:
        lines += pack_lines(sizes, args.steps, device, args.data_root, args.pack_compile)
    if args.only_pack:
        print("\n" + "\n".join(lines))
        return 0

    st = step_times(args.arch, args.batch, args.steps, device, args.data_root)
    lines += [
        _row([f"CE step, {args.arch}, batch {args.batch}", f"{st['ce'] * 1e3:.1f} ms", f"median of {st['steps']}"]),
        _row([f"CLL step, {args.arch}, batch {args.batch}", f"{st['cll'] * 1e3:.1f} ms",
              "5 power-iteration steps per layer + CLL loss"]),
        _row(["CLL / CE step ratio", f"{st['ratio']:.3f}", "target ≤ 1.10"]),
        _row(["epoch-end convergence (after the timed steps)", f"{st['converge']:.2f} s", "float64, tol 1e-9"]),
    ]
    print("\n".join(lines[-4:]), flush=True)
    if not args.skip_epoch:
        subset = args.epoch_subset if args.epoch_subset else (None if device.type == "cuda" else 1280)
        ep = epoch_time(device, args.data_root, subset, args.batch)
        note = ("measured" if ep["images"] >= 50_000 else
                f"{ep['measured']:.1f} s measured on {ep['images']} images (convergence {ep['converge']:.1f} s), "
                "scaled to 50,000")
        lines.append(_row(["CIFAR-10 epoch, CLL-4C3F (engine loop)", f"{ep['full_epoch']:.1f} s", note]))
        print(lines[-1], flush=True)
    n_batched = 10_000 if device.type == "cuda" else 2_048
    au = augment_throughput(device, args.data_root, n_batched, 1_000)
    lines += [
        _row(["augmentation, batched on device", f"{au['batched']:,.0f} img/s", f"{au['n_batched']} images at once"]),
        _row(["augmentation, torchvision per image (PIL, official)", f"{au['pil']:,.0f} img/s",
              "one worker process, 1 thread"]),
        _row(["augmentation, torchvision.transforms.v2 per image (tensor)", f"{au['v2']:,.0f} img/s",
              "one worker process, 1 thread"]),
        _row(["batched / PIL per image", f"{au['batched'] / au['pil']:.1f}×", f"images: {au['source']}"]),
    ]
    print("\n".join(lines[-4:]), flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
