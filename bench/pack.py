"""Packed training: several runs in one process, as one stacked network (torch.func).

A small Lipschitz net uses a few percent of a GPU, and on a CPU a two-moons run is mostly interpreter overhead;
a pack pays that overhead once for all its members. Runs pack together when they agree on everything but their
seed and their method's hyperparameters (`pack_key`): same method, dataset, architecture, batch size, epochs,
optimizer and schedule.

Per step, the members' parameters and buffers are stacked along a leading member axis. The network's forward and
its training bound (the warm-started power iteration, gradient through the Rayleigh estimate) run once for all
members under `torch.func.vmap` through `functional_call`; each power iterate is updated in place in its own
row of the stacked buffer. The members' losses are vmapped in loss groups: members whose methods differ only in
hyperparameters the loss computes with but never branches on (`Method.member_scalars`: CLL's ε and δ, GloRo's fixed
ε) share one group, those values per-member tensors; anything else (λ, a schedule) makes a group of its own.
One optimizer steps the stacked parameters: Adam, AdamW and SGD update every element on its own, so a member gets
the update it would get alone, up to floating-point reassociation in the batched products.

Each member is otherwise an ordinary run (`bench.train.Run`): its own seed (initialisation, the iterates' start,
data order, augmentation), its own data, run folder, config hash, metrics.csv, checkpoint and result.json. At
each epoch end its rows of the stack are copied into its own network, which converges, evaluates, checkpoints
and is watched exactly as an unpacked run; the converged iterates go back into the stack. Checkpoints are in
the unpacked format (the member's optimizer state is its rows of the stacked state), so a killed pack resumes
every member, and a member can resume unpacked or in another pack. A member whose loss turns non-finite, or
whose training accuracy sits at chance, is recorded as diverged and masked out of the summed loss (a member's
gradient never mixes with another's); the others go on.

A long pack compiles its step (`pack_compile`, `compile_pack`): forward, training bound and every member's loss
as one inductor graph, the progress a tensor input (bench/schedules.py takes tensors) so the graph serves every
step; the first step runs eagerly and names the logs that are Python numbers (kept at their last value).

Packing is for the networks whose layers vmap cleanly: the plain Table B2 nets (power-iterated linear and conv
layers, MaxMin, ReLU) with a global bound. Other families, input-aware networks, budgeted runs (each plans its
own epochs) and compiled runs train unpacked, one after another, in the same call.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from bench import certify, store
from bench.config import ENGINE_DEFAULTS, EXECUTION_KEYS
from bench.nn.bound import PairwiseBound
from bench.nn.lipschitz import LipConv2d, LipLinear
from bench.optim import make_lr_scheduler, make_optimizer
from bench.registry import ARCHS, METHODS
from bench.train import (DivergedError, Run, lower_bound_generator, lower_bound_plan, prepare_process,
                         process_rng, restore_process_rng, train_run)

#: the largest stacked lower-bound ascent (input elements of all members' pairs); larger packs bound per member
LOWER_BOUND_STACK_ELEMENTS = 2 ** 22

#: members per pack when `--pack` is not given: enough to amortise the step's overhead on a CPU or GPU, few
#: enough that a pack of CIFAR nets fits in memory
DEFAULT_PACK = 16


def default_pack_limit(cfgs: Sequence[Mapping[str, object]]) -> int:
    """`DEFAULT_PACK`, except for image networks trained on a CPU: there a step is compute-bound and the stacked
    convolutions run slower than the single ones (`bench perf`: CLL 4C3F, K = 3, 0.66× the runs per hour of three
    unpacked runs on 2 cores), so each run trains alone."""
    from bench.registry import DATASETS

    def on_cpu(cfg):
        device = str(cfg.get("device", "auto"))
        return device == "cpu" or (device == "auto" and not torch.cuda.is_available())

    images = any(len(tuple(getattr(DATASETS.get(str(c["dataset"])), "input_shape", ()) or ())) > 1 for c in cfgs)
    return 1 if images and any(on_cpu(c) for c in cfgs) else DEFAULT_PACK


def member_keys(cfg: Mapping[str, object]) -> set:
    """Config keys in which the members of one pack may differ: the seeds and the method's own hyperparameters
    (a method key the engine also reads, such as SLL's `betas`, is shared by the pack and must agree)."""
    return {"seed", "data_seed"} | (set(METHODS.get(str(cfg["method"])).hparams) - set(ENGINE_DEFAULTS))


def packable(cfg: Mapping[str, object]) -> bool:
    """Whether a config can join a pack at all: a plain Table B2 network (no layer family: `supports_packing`
    checks the built net too), not budgeted (each budgeted run plans its own epochs), not compiled."""
    return (getattr(ARCHS.get(str(cfg["arch"])), "family", None) is None and cfg.get("budget") is None
            and not cfg.get("compile"))


def pack_key(cfg: Mapping[str, object]) -> str:
    """Runs with equal keys train in one pack: the config without its member keys and execution keys."""
    if not packable(cfg):
        return json.dumps({"alone": store.config_hash(cfg), "seed": cfg.get("seed")})
    skip = member_keys(cfg) | EXECUTION_KEYS - {"device"}
    return json.dumps({k: v for k, v in cfg.items() if k not in skip}, sort_keys=True, default=str)


def make_packs(cfgs: Sequence[Dict[str, object]], limit: int, workers: int = 1) -> List[List[Dict[str, object]]]:
    """Group configs by `pack_key` and cut each group into packs of at most `limit` members, of near-equal
    size; groups are cut further while there are fewer packs than `workers` (idle workers cost more than
    smaller packs)."""
    groups: Dict[str, List[Dict[str, object]]] = {}
    for cfg in cfgs:
        groups.setdefault(pack_key(cfg), []).append(cfg)
    limit = max(1, int(limit))
    counts = {k: -(-len(g) // limit) for k, g in groups.items()}
    while sum(counts.values()) < workers:
        k = max(groups, key=lambda k: len(groups[k]) / counts[k])
        if len(groups[k]) <= counts[k]:
            break
        counts[k] += 1
    packs = []
    for k, group in groups.items():
        n = counts[k]
        sizes = [len(group) // n + (i < len(group) % n) for i in range(n)]
        start = 0
        for size in sizes:
            packs.append(group[start:start + size])
            start += size
    return packs


def supports_packing(model: nn.Module) -> bool:
    """The plain global-bound nets: every bounded layer a power-iterated linear or conv, nothing projected."""
    layers = getattr(model, "_bounded", lambda: None)()
    return (layers is not None and not getattr(model, "input_aware", False) and not getattr(model, "_projected", [])
            and all(isinstance(m, (LipLinear, LipConv2d)) for m in layers))


class _Step(nn.Module):
    """The network's training forward and training bound, as one call for functional_call under vmap."""

    def __init__(self, net: nn.Module, power_iter: int):
        super().__init__()
        self.net, self.power_iter = net, power_iter

    def forward(self, x: torch.Tensor):
        logits = self.net(x)
        bound = self.net.bound(n_iter=self.power_iter)
        return (logits, bound.K_up) + (() if bound.W is None else (bound.W,))


class Pack:
    """The stacked state of a pack's members: parameters (leaves the optimizer steps), buffers, the optimizer
    and lr schedule, and the copies between the stack and each member's own network."""

    def __init__(self, runs: List[Run], power_iter: int, compile: bool = False):
        self.runs = runs
        base = runs[0].model
        self.names = [n for n, _ in base.named_parameters()]
        self.buffer_names = [n for n, _ in base.named_buffers()]
        self.step_module = _Step(copy.deepcopy(base), power_iter)
        holder = self.step_module.net      # carries the stacked parameters, so make_optimizer sees the groups
        for name in self.names:
            stacked = torch.stack([dict(r.model.named_parameters())[name].detach() for r in runs])
            _set_by_path(holder, name, nn.Parameter(stacked.clone()))
        self.params = {f"net.{n}": p for n, p in holder.named_parameters()}
        self.buffers = {f"net.{n}": torch.stack([dict(r.model.named_buffers())[n].detach() for r in runs]).clone()
                        for n in self.buffer_names}
        bounded = set(holder._bounded())
        self.layers = [(name, mod) for name, mod in holder.named_modules() if mod in bounded]
        # each member's own tensors and bounded layers, looked up once: after `Run.resume` they change only in place
        self.member_params = [[dict(r.model.named_parameters())[n] for n in self.names] for r in runs]
        self.member_buffers = [[dict(r.model.named_buffers())[n] for n in self.buffer_names] for r in runs]
        self.member_layers = [[r.model.get_submodule(name) for name, _ in self.layers] for r in runs]
        cfg = runs[0].cfg
        self.opt = make_optimizer(cfg, holder)
        self.sched = make_lr_scheduler(cfg, self.opt, runs[0].steps_per_epoch)
        # members sorted by loss group (train_pack): each group is a contiguous slice
        self.groups, lo = [], 0
        keys = [_loss_group_key(r.cfg) for r in runs]
        for m in range(1, len(runs) + 1):
            if m == len(runs) or keys[m] != keys[lo]:
                self.groups.append(_LossGroup(lo, m, [r.method for r in runs[lo:m]], holder_device(holder)))
                lo = m
        self.alive = torch.ones(len(runs), dtype=torch.bool, device=holder_device(holder))
        self.float_keys: Optional[List[str]] = None
        self.last_floats: Dict[str, torch.Tensor] = {}
        self.compiled, self.compiled_steps = None, 0
        if compile:
            # inductor's CPU toolchain probe warns once per process that no CUDA runtime is found: not news here
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            torch._dynamo.reset()   # a worker's earlier pack: its graphs belong to another Pack
            # Only the tensor guards are kept (shapes, dtypes, strides of the arguments): everything else the graph
            # reads (the modules, the methods and their constants, the loss groups) is fixed for the pack's life.
            # Checking it cost ~0.5 ms of a ~3.5 ms moons step.
            self.compiled = torch.compile(self._losses, options={"guard_filter_fn": functools.partial(
                torch.compiler.keep_tensor_guards_unsafe, keep_parameters=True)})

    def step(self, x: torch.Tensor, y: torch.Tensor, progress: float, tally: "PackTally") -> None:
        """One optimizer step of every member on its own batch (x [M, B, ...], y [M, B]): the stacked forward
        and training bound, each member's loss, their sum over the live members, backward, the update, the lr.
        Compiled (`compile=True`), the step after the first runs as one graph with the progress as a tensor
        input; the first, eager, names the logs that are Python numbers (kept at their last value, not summed)."""
        if self.compiled is not None and self.float_keys is not None:
            # a [1] tensor, read as 0-d inside the graph: Dynamo takes a 0-d tensor input for a Python number,
            # which traces the whole step twice (~6 s of every compile)
            progress_t = torch.tensor([progress], dtype=torch.float64, device=x.device)
            # the graph updates the power iterates in place: a first call that fails at run time may have done so
            saved = None if self.compiled_steps else {k: v.clone() for k, v in self.buffers.items()}
            try:
                loss, logits, logs = self.compiled(self.params, self.buffers, x, y, progress_t)
            except Exception as e:  # noqa: BLE001  (no C++ compiler, an op inductor lacks: the eager step)
                if saved is None:
                    raise
                with torch.no_grad():
                    for k, v in saved.items():
                        self.buffers[k].copy_(v)
                print(f"lipbench: the pack's step did not compile ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it trains eagerly",
                      file=sys.stderr)
                self.compiled = None
                return self.step(x, y, progress, tally)
            self.compiled_steps += 1
            self.last_floats = {k: logs.pop(k).detach() for k in self.float_keys}
        else:
            loss, logits, logs = self._losses(self.params, self.buffers, x, y, progress)
            if self.float_keys is None:
                self.float_keys = sorted(next(iter(self.groups)).floats)
        tally.add(loss, logits, y, logs)
        self.opt.zero_grad(set_to_none=True)
        torch.where(self.alive, loss, torch.zeros_like(loss)).sum().backward()
        self.opt.step()
        self.sched.step()

    def _losses(self, params, buffers, x, y, progress):
        """(each member's loss [M], logits [M, B, N], tensor logs {name: [M]}): the stacked forward and training
        bound, then each loss group's vmapped losses. A tensor `progress` (the compiled step) returns the
        Python-number logs as tensors too."""
        if torch.is_tensor(progress):
            progress = progress.reshape(())
        logits, K_up, *W = vmap(self._call)(params, buffers, x)
        W = W[0] if W else None
        losses, logs = [], {}
        for g in self.groups:
            loss_g, logs_g = g(logits, y, K_up, W, progress)
            losses.append(loss_g)
            for k, v in logs_g.items():
                logs.setdefault(k, []).append(v)
        return torch.cat(losses), logits, {k: torch.cat([p.reshape(len(p), -1)[:, 0] for p in parts])
                                           for k, parts in logs.items()}

    def float_logs(self, m: int) -> Dict[str, float]:
        """Member m's Python-number logs (a schedule's value) of the last step, from its own loss group, and the
        member scalars its loss logs (their own values)."""
        group = next(g for g in self.groups if g.lo <= m < g.hi)
        scalars = {k: group.values[k][m - group.lo] for k in group.logged_scalars}
        if self.compiled is not None and self.compiled_steps:
            return {**{k: float(v[m]) for k, v in self.last_floats.items()}, **scalars}
        return {**group.floats, **scalars}

    def _call(self, params, buffers, x):
        return functional_call(self.step_module, (params, buffers), (x,))

    @torch.no_grad()
    def to_member(self, m: int) -> None:
        """Member m's rows of the stack → its own network (parameters and buffers)."""
        for name, own in zip(self.names, self.member_params[m]):
            own.copy_(self.params[f"net.{name}"][m])
        for name, own in zip(self.buffer_names, self.member_buffers[m]):
            own.copy_(self.buffers[f"net.{name}"][m])

    @torch.no_grad()
    def from_member(self, m: int) -> None:
        """Member m's buffers (its converged power iterates) → its rows of the stack."""
        for name, own in zip(self.buffer_names, self.member_buffers[m]):
            self.buffers[f"net.{name}"][m].copy_(own)

    @torch.no_grad()
    def converge(self, members: Sequence[int], tol: float, guaranteed: Sequence[int] = ()) -> None:
        """The epoch-end power iteration of every bounded layer, for `members` at once (each stopping by its own
        rule, `stacked_power_iteration`); each member's network adopts its result, so its own `converge()` finds
        the bound fresh. Members in `guaranteed` (those about to evaluate) also adopt their guaranteed bounds,
        computed for all of them at once where the layer can (`stacked_norm_bound`). The members' networks must
        hold their current rows (`to_member`)."""
        if not members:
            return
        device = next(iter(self.params.values())).device
        rows = torch.tensor(list(members), dtype=torch.long, device=device)
        certify_rows = torch.tensor(list(guaranteed), dtype=torch.long, device=device)
        for i, (name, layer) in enumerate(self.layers):
            weights = self.params[f"net.{name}.weight"].detach()
            V = self.buffers[f"net.{name}.power_iterate"][rows].double()
            sigma, X = layer.stacked_power_iteration(weights[rows].double(), V, tol=tol)
            for k, m in enumerate(members):
                self.member_layers[m][i].adopt_power(sigma[k], X[k])
            upper = layer.stacked_norm_bound(weights[certify_rows]) if len(guaranteed) else None
            if upper is not None:
                for k, m in enumerate(guaranteed):
                    self.member_layers[m][i].adopt_guaranteed(float(upper[k]))

    def lower_bounds(self, members: Sequence[int]) -> Dict[int, float]:
        """The empirical lower bound of each member's network (`certify.lower_bound`: its own pairs, drawn by its
        own generator) in one stacked ascent; empty when the members' pairs are too large to stack (each member
        then computes its own)."""
        run0 = self.runs[0]
        pairs, steps = lower_bound_plan(run0.cfg, run0.data)
        if not members:
            return {}
        if pairs <= 0 or steps < 0:
            return {m: 0.0 for m in members}
        if 2 * pairs * run0.data.x_train[0].numel() * len(members) > LOWER_BOUND_STACK_ELEMENTS:
            return {}
        starts = []
        for m in members:
            run = self.runs[m]
            starts.append(next(certify.lower_bound_pairs(run.data.x_train, pairs, lower_bound_generator(run.cfg),
                                                         pairs, run.data.inputs, run.device)))
        rows = torch.tensor(list(members), dtype=torch.long, device=run0.device)
        params = {k[len("net."):]: v.detach()[rows] for k, v in self.params.items()}
        buffers = {k[len("net."):]: v[rows] for k, v in self.buffers.items()}
        net = self.step_module.net
        forward = vmap(lambda p, b, x: functional_call(net, (p, b), (x,)))
        ascent = functools.partial(certify.pair_ascent, lambda x: forward(params, buffers, x),
                                   torch.stack([a for a, _ in starts]), torch.stack([b for _, b in starts]), steps,
                                   float(run0.cfg["lower_bound_lr"]), run0.data.domain)
        net.eval()
        try:
            try:
                best = ascent(compile=self.compiled is not None)
            except Exception:  # noqa: BLE001  (inductor failed on the ascent: the eager one, from the same start)
                if self.compiled is None:
                    raise
                best = ascent(compile=False)
        finally:
            net.train()
        return dict(zip(members, best.tolist()))

    def member_optimizer_state(self, m: int) -> Dict[str, object]:
        """Member m's optimizer state in the unpacked format: its rows of every per-parameter state tensor."""
        state = self.opt.state_dict()
        shapes = self._state_shapes()
        return {"state": {i: {k: (v[m].clone() if k != "step" and torch.is_tensor(v) and v.shape == shapes[i] else v)
                              for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": copy.deepcopy(state["param_groups"])}

    def _state_shapes(self) -> List[torch.Size]:
        """The stacked shape of each optimizer-state index (state_dict numbers parameters in param_groups order)."""
        return [p.shape for g in self.opt.param_groups for p in g["params"]]

    def load_member_states(self, states: Sequence[Mapping[str, object]], sched_state) -> None:
        """Stack the members' optimizer states (from their checkpoints) into the pack's optimizer."""
        shapes = self._state_shapes()
        first = states[0]
        stacked = {}
        for i, s in first["state"].items():
            entry = {}
            for k, v in s.items():
                if k != "step" and torch.is_tensor(v) and v.shape == shapes[int(i)][1:]:
                    entry[k] = torch.stack([st["state"][i][k] for st in states])
                else:
                    if any(not torch.equal(torch.as_tensor(st["state"][i][k]), torch.as_tensor(v)) for st in states):
                        raise ValueError(f"members disagree on optimizer state {k!r}; they cannot share a pack")
                    entry[k] = v
            stacked[i] = entry
        self.opt.load_state_dict({"state": stacked, "param_groups": first["param_groups"]})
        self.sched.load_state_dict(sched_state)


def _set_by_path(module: nn.Module, name: str, value: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, value)


def holder_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class PackTally:
    """EpochTally for a pack: per-member loss sums, correct counts and tensor logs, [M] on the device."""

    def __init__(self, members: int, device: torch.device):
        self.loss = torch.zeros(members, dtype=torch.float64, device=device)
        self.correct = torch.zeros(members, dtype=torch.int64, device=device)
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, logs: Mapping[str, torch.Tensor]):
        self.loss += loss.detach().double()
        self.correct += (logits.detach().argmax(-1) == y).sum(-1)
        for k, v in logs.items():
            v = v.detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v


class _LossGroup:
    """Members [lo, hi) whose methods differ at most in their `member_scalars` (ε, δ): their losses in one vmapped
    call of the first member's method, each member's scalars a float64 tensor row passed by keyword (one graph for
    all of them, not one per configuration; a number and its 0-d tensor promote alike against float32 tensors)."""

    def __init__(self, lo: int, hi: int, methods: Sequence, device: torch.device):
        self.lo, self.hi, self.method = lo, hi, methods[0]
        names = type(self.method).member_scalars(self.method.cfg)
        self.values = {k: [float(getattr(m, k)) for m in methods] for k in names}
        self.scalars = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in self.values.items()}
        self.floats: Dict[str, float] = {}
        self.logged_scalars: List[str] = []   # member scalars the loss logs: `Pack.float_logs` gives their values

    def __call__(self, logits, y, K_up, W, progress):
        def member(logits, y, K_up, scalars, W=None):
            loss, logs = self.method.loss(logits, y, PairwiseBound(K_up, W), progress, **scalars)
            if torch.is_tensor(progress):   # compiled: no side effects in the graph, every log an output
                return loss, {k: torch.as_tensor(v, dtype=torch.float64) for k, v in logs.items() if k not in scalars}
            self.logged_scalars = [k for k in logs if k in scalars]
            logs = {k: v for k, v in logs.items() if k not in scalars}
            self.floats.update({k: v for k, v in logs.items() if not torch.is_tensor(v)})
            return loss, {k: v for k, v in logs.items() if torch.is_tensor(v)}

        args = (logits[self.lo:self.hi], y[self.lo:self.hi], K_up[self.lo:self.hi], self.scalars)
        if W is not None:
            args += (W[self.lo:self.hi],)
        return vmap(member)(*args)


def _method_key(cfg: Mapping[str, object]) -> str:
    return json.dumps({k: cfg.get(k) for k in sorted(member_keys(cfg) - {"seed", "data_seed"})}, default=str)


def _loss_group_key(cfg: Mapping[str, object]) -> str:
    """Members with equal keys share a loss group: the method configuration without its member scalars."""
    scalars = set(METHODS.get(str(cfg["method"])).member_scalars(cfg))
    return json.dumps({k: cfg.get(k) for k in sorted(member_keys(cfg) - {"seed", "data_seed"} - scalars)},
                      default=str)


def train_pack(cfgs: Sequence[Dict[str, object]], folders: Sequence[Path],
               on_epoch: Optional[Callable[[int, int, int, dict], None]] = None) -> List[Dict[str, object]]:
    """Train the runs `cfgs` into `folders` as one pack (each resumed from its own checkpoint); returns each
    member's result.json (a diverged member's `diverged` record), in the order given. `on_epoch(i, epoch,
    epochs, row)` reports member i's epochs. Members a kill left one checkpoint ahead of the others (a pack killed
    while it wrote its members' checkpoints) roll back to their previous one; members at different epochs
    otherwise (runs first trained in other packs) train as one pack per epoch."""
    cfg0 = cfgs[0]
    if len({pack_key(c) for c in cfgs}) > 1:
        raise ValueError("runs of one pack must agree on everything but their seeds and method hyperparameters")
    device = prepare_process(cfg0)
    # members sorted by loss group: each group is a contiguous slice of the stack
    order = sorted(range(len(cfgs)), key=lambda i: (_loss_group_key(cfgs[i]), _method_key(cfgs[i]), i))
    results: List[Optional[Dict[str, object]]] = [None] * len(cfgs)

    def report(i):
        return None if on_epoch is None else (lambda e, n, row: on_epoch(i, e, n, row))

    if len(cfgs) == 1 or not packable(cfg0):
        for i in order:
            try:
                results[i] = train_run(cfgs[i], folders[i], on_epoch=report(i))
            except DivergedError as e:
                results[i] = store.write_diverged(folders[i], cfgs[i], str(e), e.train_seconds)
        return results
    at = {i: store.checkpoint_epoch(folders[i]) for i in order}
    common = min(at.values())
    for i in order:   # members a kill left one checkpoint ahead go back to the pack's common epoch
        if at[i] > common and store.checkpoint_epoch(folders[i], previous=True) == common:
            store.roll_back_checkpoint(folders[i])
            at[i] = common
    by_epoch: Dict[int, List[int]] = {}
    for i in order:
        by_epoch.setdefault(at[i], []).append(i)
    if len(by_epoch) > 1:
        for members in by_epoch.values():
            sub = train_pack([cfgs[i] for i in members], [folders[i] for i in members],
                             None if on_epoch is None else (lambda k, e, n, row, ms=members: on_epoch(ms[k], e, n, row)))
            for i, result in zip(members, sub):
                results[i] = result
        return results
    runs, rng = [], []
    for i in order:
        runs.append(Run(cfgs[i], folders[i], device))
        rng.append(process_rng())   # each member's process-wide generators, as its own process has them
    if not supports_packing(runs[0].model):
        raise ValueError(f"architecture {cfg0['arch']!r} has layers a pack cannot stack; train it with --pack 1")
    _train_stacked(runs, rng, order, device, results, report)
    return results


#: the most bytes of stored training data a pack gathers in epoch order at once (`epoch_batches`)
EPOCH_GATHER_BYTES = 2 ** 28


def epoch_batches(runs: Sequence[Run]):
    """Each step's stacked batches of one epoch, (x [M, B, ...] in data units, y [M, B]), every member's in its
    own data order (`Run.epoch_order`, drawn here for the epoch). Without augmentation the members' training sets
    are gathered in their epoch order once, and a step slices all of them at once (one copy instead of a gather
    per member and step: ~10 s of a 12-member moons pack); the values are those of `Run.batch`."""
    perms = [r.epoch_order() for r in runs]
    data, cfg = runs[0].data, runs[0].cfg
    augmented = any(r.cfg["augment"] and r.data.augment is not None for r in runs)
    size = sum(r.data.x_train.element_size() * r.data.x_train.numel() for r in runs)
    if augmented or size > EPOCH_GATHER_BYTES:
        for it in range(runs[0].steps_per_epoch):
            batches = [r.batch(it, p) for r, p in zip(runs, perms)]
            yield torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        return
    x = torch.stack([r.data.x_train[p] for r, p in zip(runs, perms)])
    y = torch.stack([r.data.y_train[p] for r, p in zip(runs, perms)])
    bs = int(cfg["batch_size"])
    for it in range(runs[0].steps_per_epoch):
        part = slice(it * bs, (it + 1) * bs)
        yield data.inputs(x[:, part].contiguous()), y[:, part].contiguous()


#: a pack compiles its step (`pack_compile: auto`) when it has at least this many steps to go: compiling takes
#: about a minute on one CPU core, and cuts a 12-member moons step from ~13 ms to ~3 ms (`bench perf`)
PACK_COMPILE_MIN_STEPS = 5_000


def compile_pack(cfg: Mapping[str, object], run: Run) -> bool:
    setting = cfg.get("pack_compile", "auto")
    if setting != "auto":
        return bool(setting)
    return (run.epochs - run.start_epoch) * run.steps_per_epoch >= PACK_COMPILE_MIN_STEPS


def _train_stacked(runs: List[Run], rng: List[tuple], index: List[int], device: torch.device,
                   results: List[Optional[Dict[str, object]]], report) -> None:
    """The packed loop: `runs` (in stack order; `index[m]` is member m's position in `results`) resumed, stacked,
    trained to their last epoch, finished. Each member's training time is its own history plus the pack's shared
    phases (the steps and the batched convergence), not the other members' evaluations."""
    cfg0, M = runs[0].cfg, len(runs)
    for m, r in enumerate(runs):
        restore_process_rng(rng[m])
        r.keep_previous_checkpoint = True
        r.resume(None, None)
        rng[m] = process_rng()
        r.model.train()
    pack = Pack(runs, int(cfg0["power_iter"]), compile=compile_pack(cfg0, runs[0]))
    pack.step_module.train()
    if runs[0].checkpoint is not None:
        pack.load_member_states([r.checkpoint["optimizer"] for r in runs], runs[0].checkpoint["scheduler"])
    for r in runs:
        r.checkpoint = None   # loaded: its tensors need not stay in memory
    alive, live = pack.alive, list(range(M))
    sync_every = max(1, int(cfg0["sync_every"]))
    info = {"members": M, "configs": [store.config_hash(r.hashed_cfg) for r in runs]}
    spe, total = runs[0].steps_per_epoch, runs[0].total_steps
    step = runs[0].step

    def diverge(m: int, reason: str, seconds: float) -> None:
        alive[m] = False
        live.remove(m)
        results[index[m]] = store.write_diverged(runs[m].folder, runs[m].hashed_cfg, reason, seconds)

    for epoch in range(runs[0].start_epoch, runs[0].epochs):
        if not live:
            break
        t0 = time.perf_counter()
        tally = PackTally(M, device)
        for x, y in epoch_batches(runs):
            pack.step(x, y, step / total, tally)
            if (step + 1) % sync_every == 0:
                for m in (~torch.isfinite(tally.loss) & alive).nonzero().flatten().tolist():
                    diverge(m, f"non-finite loss at epoch {epoch + 1}, step {step + 1}",
                            runs[m].train_seconds + time.perf_counter() - t0)
            step += 1
        lr = pack.opt.param_groups[0]["lr"]
        host_loss, host_correct = tally.loss.tolist(), tally.correct.tolist()
        host_sums = {k: v.tolist() for k, v in tally.sums.items()}
        for m in [m for m in live if not math.isfinite(host_loss[m])]:   # before the batched convergence
            diverge(m, f"non-finite loss at epoch {epoch + 1}", runs[m].train_seconds + time.perf_counter() - t0)
        if not live:
            break
        for m in live:
            pack.to_member(m)
        pack.converge(live, float(cfg0["converge_tol"]), [m for m in live if runs[m].evaluates_after(epoch)])
        shared = time.perf_counter() - t0
        for m in list(live):
            run = runs[m]
            run.step = step
            restore_process_rng(rng[m])
            logs_m = {**pack.float_logs(m), **{k: v[m] / max(1, spe) for k, v in host_sums.items()}}
            try:
                run.end_epoch(epoch, host_loss[m], int(host_correct[m]), logs_m, lr,
                              lambda before=run.train_seconds: before + shared,
                              lambda m=m: {"optimizer": pack.member_optimizer_state(m),
                                           "scheduler": pack.sched.state_dict()}, report(index[m]))
            except DivergedError as e:
                diverge(m, str(e), e.train_seconds)
                continue
            finally:
                rng[m] = process_rng()
            pack.from_member(m)
    lower = pack.lower_bounds(live)
    for m in live:
        restore_process_rng(rng[m])
        results[index[m]] = runs[m].finish(extra={"pack": {**info, "position": m}}, lower=lower.get(m))
