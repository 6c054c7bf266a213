"""The training loop: build data, network and method from a config, train, converge, evaluate, write.

Per step: slice a batch of the device-resident data, augment it there, forward, K = net.bound(x, ε)
(a few warm-started power-iteration steps, gradient through the estimate), method.loss, backward, step.
Per epoch: net.converge(), evaluation every `eval_every` epochs into metrics.csv, an atomic checkpoint.
At the end: converged bounds, clean accuracy and CRA per ε, K(f), K(h∘f), lower bound, tightness → result.json.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import torch

from bench import certify, store
from bench.config import budget_seconds, is_short_run
from bench.store import git_commit
from bench.optim import make_lr_scheduler, make_optimizer
from bench.data.base import DataBundle
from bench.nn.archs import count_parameters
from bench.registry import ARCHS, DATASETS, METHODS

__version__ = "0.1.0"


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or collapsed to chance (the run is recorded as `diverged`)."""

    def __init__(self, reason: str, train_seconds: Optional[float] = None):
        super().__init__(reason)
        self.train_seconds = train_seconds


class ChanceWatchdog:
    """Flags a run whose training accuracy stays at chance, ≤ 1/N + margin·(1 − 1/N), for `patience`
    consecutive epochs spanning at least `min_steps` optimizer steps (so a slow start on a tiny dataset is not
    a collapse). Collapsed runs otherwise end up in published tables at 10% on CIFAR-10."""

    def __init__(self, num_classes: int, patience: int, margin: float, min_steps: int):
        self.patience, self.min_steps = patience, min_steps  # min_steps: the larger of the step floor and a
        # fraction of the run (GloRo at large ε sits at chance for ~100 of 1,000 moons epochs, then recovers)
        self.threshold = 1.0 / num_classes + margin * (1.0 - 1.0 / num_classes)
        self.epochs = self.steps = 0

    def update(self, train_acc: float, steps: int) -> bool:
        at_chance = train_acc <= self.threshold
        self.epochs, self.steps = (self.epochs + 1, self.steps + steps) if at_chance else (0, 0)
        return self.patience > 0 and self.epochs >= self.patience and self.steps >= self.min_steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_data(cfg: Mapping[str, object]) -> DataBundle:
    seed = int(cfg["data_seed"] if cfg.get("data_seed") is not None else cfg["seed"])
    bundle = DATASETS.get(str(cfg["dataset"]))(cfg, seed=seed)
    if cfg.get("train_subset"):
        bundle = bundle.subset_train(int(cfg["train_subset"]), seed=seed)
    return bundle


def build_model(cfg: Mapping[str, object], data: DataBundle, device="cpu"):
    normalize = cfg.get("normalize")
    model = ARCHS.get(str(cfg["arch"]))(data.input_shape, data.num_classes,
                                        normalize=tuple(normalize) if normalize else None)
    if hasattr(model, "configure"):  # a network with options of its own (Local-Lip-B's iterations, warm starts)
        model.configure(cfg, data)
    return model.to(device)


def resolve_eps_names(cfg: Mapping[str, object]) -> Dict[str, float]:
    """cert_eps entries as written (\"eps\" stands for the training ε, written as its value)."""
    names = {}
    for entry in cfg["cert_eps"]:
        if entry == "eps":
            if cfg.get("eps") is None:
                raise ValueError("cert_eps names 'eps' but the method has no training ε")
            names[f"{float(cfg['eps']):g}"] = float(cfg["eps"])
        else:
            names[str(entry)] = certify.parse_eps(entry)
    return names


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluation_split(data: DataBundle, cfg: Mapping[str, object], split: str):
    """(x, y, {name: mask or None}, limited) of a split as evaluation certifies it: the split itself (mask None)
    and, for the test split, its named subsets (e.g. `test_lossless`). A short run with `eval_points_short` set
    (an expensive input-aware certificate) certifies the first N test points only (`limited`)."""
    x, y = data.split(split)
    limited = split == "test" and is_short_run(cfg) and bool(cfg.get("eval_points_short"))
    if limited:
        x, y = x[:int(cfg["eval_points_short"])], y[:int(cfg["eval_points_short"])]
    subsets = {split: None}
    if split == "test":
        subsets.update({f"test_{name}": mask.cpu()[:len(y)] for name, mask in data.test_subsets.items()})
    return x, y, subsets, limited


#: evaluate()'s timings (per split and rule, seconds per 1,000 points); result.json keeps them beside `eval`
SECONDS_KEY = "cert_seconds_per_1000"


def evaluate(model, method, data: DataBundle, cfg, splits=("test", "train")) -> Dict[str, object]:
    """Converged bounds → clean accuracy and CRA per ε on each split (and each named test subset), through
    `certify.certify_split`: `cra` under the guaranteed bounds (the certificate), `cra_power` under the converged
    power iteration (the paper's way), `cra_published` under the family's published rule where it has its own
    and it differs. Each split records its certification time per 1,000 points (`cert_seconds_per_1000`, the
    forward pass included) and, for an input-aware model, its per-point K̄ as mean and max (`K_local`)."""
    model.eval()
    model.converge(tol=float(cfg["converge_tol"]))
    eps = resolve_eps_names(cfg)
    dtype = certify.DTYPES[str(cfg["certify_dtype"])]
    local = bool(getattr(model, "input_aware", False))
    if local:  # a local certificate costs a bound per point and ε: the test split (and its subsets) only
        splits = tuple(s for s in splits if s != "train")
    out: Dict[str, object] = {}
    seconds: Dict[str, object] = {}
    for split in splits:
        x, y, subsets, limited = evaluation_split(data, cfg, split)
        sc = certify.certify_split(model, x, eps, dtype, int(cfg["eval_batch"]), to_input=data.inputs,
                                   rules=certify.RULES, converge_tol=float(cfg["converge_tol"]))
        for key, mask in subsets.items():
            out[key] = sc.summary(y, "sound", mask)
            if limited:
                out[key]["points"] = int(len(y) if mask is None else mask.sum())
            out[key]["cra_power"] = sc.summary(y, "power", mask)["cra"]
            if mask is None and "published" in sc.certified:
                published = sc.summary(y, "published")["cra"]
                if published != out[key]["cra"]:
                    out[key]["cra_published"] = published
            if local:
                out[key]["K_local"] = sc.K_stats("sound", mask)
                out[key]["K_local_power"] = sc.K_stats("power", mask)
        per_1000 = 1000.0 / max(1, len(y))
        seconds[split] = {r: round(t * per_1000, 4) for r, t in sc.seconds.items()}
    out[SECONDS_KEY] = seconds   # timings, moved out of `eval` by finish_run (eval stays deterministic)
    model.train()
    return out


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def process_rng() -> tuple:
    """The process-wide generators (torch, numpy, Python, CUDA) as they are, no conversion: a pack swaps each
    member's in and out at every epoch end, ~10× cheaper than `global_rng_state`."""
    return (torch.get_rng_state(), np.random.get_state(), random.getstate(),
            torch.cuda.get_rng_state_all() if _cuda_available() else None)


def restore_process_rng(state: tuple) -> None:
    torch_state, np_state, py_state, cuda_state = state
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda_state is not None and _cuda_available():
        torch.cuda.set_rng_state_all(cuda_state)


def global_rng_state() -> Dict[str, object]:
    """`process_rng` as tensors, the form a checkpoint stores."""
    torch_state, np_state, py_state, cuda_state = process_rng()
    state = {"torch": torch_state,
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "python": torch.tensor(list(py_state[1]), dtype=torch.int64)}
    if cuda_state is not None:
        state["cuda"] = cuda_state
    return state


def set_global_rng_state(state: Mapping[str, object]) -> None:
    restore_process_rng((state["torch"],
                         ("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0),
                         (3, tuple(state["python"].tolist()), None),   # tolist: iterating a tensor is ~100× slower
                         state.get("cuda")))


def _rng_state(gen: torch.Generator) -> Dict[str, object]:
    return {**global_rng_state(), "gen": gen.get_state()}


def _set_rng_state(gen: torch.Generator, state: Mapping[str, object]) -> None:
    set_global_rng_state(state)
    gen.set_state(state["gen"])


def training_forward(model, cfg: Mapping[str, object], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network's forward as training calls it: `compile: true` wraps it in torch.compile, `amp: bf16` runs it
    under bfloat16 autocast and hands float32 logits to the loss. Only this forward changes: the bound (power
    iteration, K), the loss, evaluation, convergence and certification run as without these options."""
    fn = torch.compile(model) if cfg.get("compile") else model
    if cfg.get("amp") != "bf16":
        return fn

    def autocast_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = fn(x)
        return out.float()
    return autocast_forward


class EpochTally:
    """What an epoch accumulates on the device (no host sync in the step): the loss sum, the correct count and
    the loss's tensor logs; Python-number logs (a schedule's value) keep the epoch's last."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.sums: Dict[str, torch.Tensor] = {}
        self.last: Dict[str, float] = {}

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, logs: Mapping[str, object]) -> None:
        self.loss += loss.detach()
        self.correct += (logits.detach().argmax(1) == y).sum()
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                self.sums[k] = self.sums[k] + v.detach().double() if k in self.sums else v.detach().double()
            elif isinstance(v, (int, float)):
                self.last[k] = v

    def row(self, steps: int) -> Dict[str, float]:
        """The epoch's log columns (read on the host once): tensor logs as means over the steps."""
        return {**self.last, **{k: float(v) / max(1, steps) for k, v in self.sums.items()}}


def training_batch(data: DataBundle, cfg: Mapping[str, object], idx: torch.Tensor, gen: torch.Generator):
    """The inputs (data units, augmented when the config says so) and labels of one training batch."""
    xb = data.inputs(data.x_train[idx])
    if cfg["augment"] and data.augment is not None:
        xb = data.augment(xb, gen)
    return xb, data.y_train[idx]


def train_step(model, forward, method, opt, sched, xb, yb, progress: float, power_iter: int,
               tally: EpochTally, index: Optional[torch.Tensor] = None) -> None:
    """One optimizer step: forward, the bound at this batch and the method's ε (input-aware nets; global ones
    ignore both; `index`, the batch's rows in the training set, finds per-image warm starts), the loss, backward,
    the update, the constraint projection (Local-Lip-B's θ ≥ 0) and the lr (`sched` None: the caller steps it)."""
    logits = forward(xb)
    bound = model.bound(x=xb, eps=method.bound_eps(progress), n_iter=power_iter, index=index)
    loss, logs = method.loss(logits, yb, bound, progress)
    tally.add(loss, logits, yb, logs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    model.project_()
    if sched is not None:
        sched.step()


#: the budget's probe: steps run before timing, and the least steps and seconds it times
BUDGET_WARMUP_STEPS, BUDGET_MIN_STEPS, BUDGET_MIN_SECONDS = 3, 10, 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_budget(cfg: Mapping[str, object], data: DataBundle, model, device: torch.device,
                steps_per_epoch: int) -> Dict[str, object]:
    """Epochs that fill a wall-clock training budget (Prach et al., CVPR 2024: equal compute, not equal epochs).
    Training steps are timed on a copy of the network and optimizer (the run itself is untouched), after
    `BUDGET_WARMUP_STEPS`, over at least `BUDGET_MIN_STEPS` steps and `BUDGET_MIN_SECONDS`; then the epoch-end
    convergence, warm-started after a first one and `BUDGET_MIN_STEPS` more steps.
    epochs = round(budget / (steps per epoch × step time + convergence time)), at least 1: the first plan, which
    `Run.replan` corrects from the measured epochs as the run trains."""
    seconds = budget_seconds(cfg["budget"])
    probe = copy.deepcopy(model)
    probe.train()
    method = METHODS.get(str(cfg["method"]))(cfg, data.num_classes)
    opt = make_optimizer(cfg, probe)
    forward = training_forward(probe, cfg, device)
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 104729)
    bs = min(int(cfg["batch_size"]), len(data.y_train))
    sched = make_lr_scheduler(cfg, opt, steps_per_epoch)
    tally = EpochTally(device)
    power_iter = int(cfg["power_iter"])

    def step(k: int) -> None:
        idx = torch.randperm(len(data.y_train), generator=gen)[:bs].to(device)
        xb, yb = training_batch(data, cfg, idx, gen)
        train_step(probe, forward, method, opt, sched, xb, yb, 0.5, power_iter, tally, idx)
        if (k + 1) % max(1, int(cfg["sync_every"])) == 0:
            bool(torch.isfinite(tally.loss))

    for k in range(BUDGET_WARMUP_STEPS):
        step(k)
    _sync(device)
    timed, t0 = 0, time.perf_counter()
    while timed < BUDGET_MIN_STEPS or time.perf_counter() - t0 < BUDGET_MIN_SECONDS:
        step(timed)
        timed += 1
        if timed % 5 == 0:
            _sync(device)
    _sync(device)
    step_seconds = (time.perf_counter() - t0) / timed
    # the epoch-end convergence as a run meets it: warm-started from the last epoch's iterate. The first one,
    # from the initial iterate, takes several times longer (moons: it made 120 s budgets plan 14% too few epochs)
    probe.converge(tol=float(cfg["converge_tol"]), guaranteed=False)
    for k in range(BUDGET_MIN_STEPS):
        step(k)
    _sync(device)
    t0 = time.perf_counter()
    probe.converge(tol=float(cfg["converge_tol"]), guaranteed=False)
    converge_seconds = time.perf_counter() - t0
    per_epoch = steps_per_epoch * step_seconds + converge_seconds
    epochs = max(1, int(round(seconds / per_epoch)))
    del probe, opt
    return {"seconds": seconds, "epochs": epochs, "epochs_planned": epochs, "seconds_per_epoch_planned": per_epoch,
            "step_seconds": step_seconds, "probe_steps": timed, "replans": 0}


#: a budgeted run re-plans its remaining epochs from the measured seconds of (at most) its last this many epochs
REPLAN_WINDOW = 5


def replanned_epochs(epoch: int, budget_seconds_: float, rows, train_seconds: float) -> int:
    """The epoch count that fills the budget, re-planned before epoch `epoch` (0-based; `rows` the metrics of the
    epochs before it, with their cumulative training seconds): the epochs done, plus the rest of the budget over
    the measured seconds per epoch of the last `REPLAN_WINDOW` epochs, rounded, and at least one more (the schedules
    reach their end only with a last epoch)."""
    done = [float(r["train_seconds"]) for r in rows[-(REPLAN_WINDOW + 1):]]
    if len(rows) > REPLAN_WINDOW:
        per_epoch = (done[-1] - done[0]) / REPLAN_WINDOW
    else:
        per_epoch = done[-1] / len(rows)
    left = (budget_seconds_ - train_seconds) / per_epoch if per_epoch > 0 else 1.0
    return epoch + max(1, int(round(left)))


def steps_per_epoch(cfg: Mapping[str, object], n: int) -> int:
    bs = int(cfg["batch_size"])
    return n // bs if cfg["drop_last"] and n >= bs else math.ceil(n / bs)


class Run:
    """One run's training state outside the optimizer: its config, folder, data, network, method, data-order
    generator, watchdog and metrics rows. `train_run` drives one; a pack (bench/pack.py) drives several through
    the same epoch end (`end_epoch`), so a packed member converges, evaluates, checkpoints and stops as an
    unpacked run does."""

    def __init__(self, cfg: Dict[str, object], folder: Path, device: torch.device, budget_probe: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hashed_cfg, self.budget = cfg, None   # config.yaml and the hash keep the run's config as given
        seed_everything(int(cfg["seed"]))
        self.device = device
        self.data = build_data(cfg).to(device)
        self.model = build_model(cfg, self.data, device)
        n = len(self.data.y_train)
        self.steps_per_epoch = steps_per_epoch(cfg, n)
        self.checkpoint = store.load_checkpoint(self.folder / store.CHECKPOINT, map_location=device) \
            if (self.folder / store.CHECKPOINT).exists() else None
        # the config the schedules follow: a budgeted run's is its first plan, whose fractions of training they keep
        self.schedule_cfg = cfg
        if cfg.get("budget") is not None and budget_probe:
            # a budgeted run trains for the epochs its budget buys: planned from timed steps, re-planned before
            # every epoch from the measured ones (`replan`), the plan kept in the checkpoint
            self.budget = dict((self.checkpoint or {}).get("budget") or plan_budget(
                cfg, self.data, self.model, device, self.steps_per_epoch))
            self.schedule_cfg = {**cfg, "epochs": int(self.budget.get("epochs_planned", self.budget["epochs"]))}
            cfg = {**cfg, "epochs": int(self.budget["epochs"])}
        self.cfg = cfg
        self.method = METHODS.get(str(cfg["method"]))(self.schedule_cfg, self.data.num_classes)
        self.epochs = int(cfg["epochs"])
        self.total_steps = max(1, self.epochs * self.steps_per_epoch)
        self.gen = torch.Generator().manual_seed(int(cfg["seed"]))
        self.start_epoch, self.step, self.rows, self.train_seconds, self.resumed_at = 0, 0, [], 0.0, []
        self.metrics_text = store.MetricsText()
        self._progress = 0.0   # a budgeted run's training progress (`progress`)
        self.final_eval = None  # stays None when resuming a run whose last epoch was already checkpointed
        self.keep_previous_checkpoint = False   # a pack keeps its members' previous checkpoints (store.save_checkpoint)
        store.write_config(self.folder, self.hashed_cfg)

    def resume(self, opt, sched) -> None:
        """Load the run's checkpoint (if any) into the network, `opt`/`sched` (None: the caller loads its own)
        and the generators; the watchdog then replays the recorded epochs."""
        state = self.checkpoint
        if state is not None:
            self.model.load_state_dict(state["model"])
            if opt is not None:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
            _set_rng_state(self.gen, state["rng"])
            self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
            self._progress = float(state.get("progress", self.step / self.total_steps))
            self.train_seconds = float(state["train_seconds"])
            self.resumed_at = [int(e) for e in state.get("resumed_at", [])] + [self.start_epoch]
            self.rows = store.read_metrics(self.folder)[:self.start_epoch]
        cfg = self.cfg
        self.watchdog = ChanceWatchdog(self.data.num_classes, int(cfg["chance_patience"]), float(cfg["chance_margin"]),
                                       max(int(cfg["chance_min_steps"]),
                                           int(float(cfg["chance_min_fraction"]) * self.total_steps)))
        for row in self.rows:
            self.watchdog.update(float(row.get("train_acc", 1.0)), self.steps_per_epoch)

    @property
    def progress(self) -> float:
        """Training progress t/T ∈ [0, 1] at the next step, which the schedules read. A budgeted run's epoch count
        can change as it trains: its progress advances by (1 − t/T)/(steps left) per step, which is step/total
        while the plan holds and still ends at 1 when it changes."""
        return self._progress if self.budget is not None else self.step / self.total_steps

    def advance(self) -> None:
        """One step done."""
        if self.budget is not None:
            self._progress += (1.0 - self._progress) / max(1, self.total_steps - self.step)
        self.step += 1

    def lr_scheduler(self, opt):
        """The lr schedule; a budgeted run's follows its progress through the schedule of its first plan."""
        virtual = None
        if self.budget is not None:
            steps = int(self.schedule_cfg["epochs"]) * self.steps_per_epoch
            virtual = lambda: self._progress * steps   # noqa: E731
        return make_lr_scheduler(self.schedule_cfg, opt, self.steps_per_epoch, virtual)

    def replan(self, epoch: int) -> None:
        """Before epoch `epoch` of a budgeted run: the epochs that fill the rest of its budget at the measured
        pace (`replanned_epochs`). A step time drifts over a run (caches, other load, the epoch ends' work), which a
        plan from a few timed steps cannot know."""
        if self.budget is None or epoch == 0 or not self.rows:
            return
        epochs = replanned_epochs(epoch, float(self.budget["seconds"]), self.rows, self.train_seconds)
        if epochs != self.epochs:
            self.epochs, self.total_steps = epochs, max(1, epochs * self.steps_per_epoch)
            self.cfg = {**self.cfg, "epochs": epochs}
            self.budget.update(epochs=epochs, replans=int(self.budget.get("replans", 0)) + 1)

    def batch_rows(self, it: int, perm: torch.Tensor) -> torch.Tensor:
        """The training-set rows of step `it` of the epoch ordered by `perm`."""
        bs = int(self.cfg["batch_size"])
        return perm[it * bs:(it + 1) * bs]

    def batch(self, it: int, perm: torch.Tensor):
        return training_batch(self.data, self.cfg, self.batch_rows(it, perm), self.gen)

    def epoch_order(self) -> torch.Tensor:
        return torch.randperm(len(self.data.y_train), generator=self.gen).to(self.device)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) ends with an evaluation: the last, every `eval_every`-th and the
        `eval_tail` last ones."""
        cfg = self.cfg
        return (epoch + 1 == self.epochs or (epoch + 1) % int(cfg["eval_every"]) == 0
                or epoch + 1 > self.epochs - int(cfg.get("eval_tail") or 0))

    def end_epoch(self, epoch: int, loss_sum: float, correct: int, logs: Dict[str, float], lr: float,
                  clock: Callable[[], float], checkpoint_state: Callable[[], Dict[str, object]],
                  on_epoch=None) -> None:
        """After the epoch's steps: the non-finite check, the power iteration (it warm-starts training's
        iterates; the guaranteed bounds only where an evaluation certifies), the metrics row, the evaluation
        when due, metrics.csv and the checkpoint when due, and the chance watchdog. `clock()` is the run's
        training seconds so far (the convergence counts as training)."""
        cfg, model, epochs, spe = self.cfg, self.model, self.epochs, self.steps_per_epoch
        if not math.isfinite(loss_sum):
            raise DivergedError(f"non-finite loss at epoch {epoch + 1}", clock())
        model.converge(tol=float(cfg["converge_tol"]), guaranteed=False)
        self.train_seconds = train_seconds = clock()
        n = len(self.data.y_train)
        train_acc = correct / max(1, spe * int(cfg["batch_size"]) if cfg["drop_last"] else n)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(1, spe), "train_acc": train_acc, "lr": lr,
               "K_f_power": float(model.power_bound().max(self.data.num_classes)),
               "train_seconds": round(train_seconds, 3)}
        row.update(logs)
        if epoch + 1 == epochs:  # the final evaluation, once: its test split also fills the last metrics row
            self.final_eval = evaluate(model, self.method, self.data, cfg)
            ev = self.final_eval["test"]
        elif self.evaluates_after(epoch):
            ev = evaluate(model, self.method, self.data, cfg, splits=("test",))["test"]
        else:
            ev = None
        if ev is not None:
            row["K_f"] = float(model.certified_bound().max(self.data.num_classes))
            row["test_clean"] = ev["clean"]
            row.update({f"test_cra@{k}": v for k, v in ev["cra"].items()})
        self.rows.append(row)
        # metrics.csv and the checkpoint are written together (each atomically; a resume drops metric rows
        # beyond the checkpoint's epoch), every `checkpoint_every` epochs and at the end
        if (epoch + 1) % int(cfg["checkpoint_every"]) == 0 or epoch + 1 == epochs:
            store.write_metrics(self.folder, self.rows, self.metrics_text)
            store.save_checkpoint(self.folder, {
                "model": model.state_dict(), **checkpoint_state(), "rng": _rng_state(self.gen),
                "epoch": epoch + 1, "step": self.step, "progress": self._progress, "train_seconds": train_seconds,
                "resumed_at": self.resumed_at, "budget": self.budget}, keep_previous=self.keep_previous_checkpoint)
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, row)
        if self.watchdog.update(train_acc, spe):
            raise DivergedError(f"training accuracy at chance ({train_acc:.3f} ≤ {self.watchdog.threshold:.3f}) "
                                f"for {self.watchdog.epochs} epochs ({self.watchdog.steps} steps), up to epoch "
                                f"{epoch + 1}", train_seconds)

    def finish(self, extra: Optional[Dict[str, object]] = None, lower: Optional[float] = None) -> Dict[str, object]:
        budget = self.budget
        if budget is not None:
            budget = {**budget, "seconds_per_epoch_measured": self.train_seconds / max(1, self.epochs),
                      "train_seconds": self.train_seconds,
                      "measured_over_budget": round(self.train_seconds / float(budget["seconds"]), 4)}
        result = finish_run(self.cfg, self.folder, self.model, self.method, self.data, self.train_seconds,
                            self.device, self.resumed_at, self.final_eval, hashed_cfg=self.hashed_cfg, budget=budget,
                            extra=extra, lower=lower)
        (self.folder / store.PREVIOUS_CHECKPOINT).unlink(missing_ok=True)
        return result


def prepare_process(cfg: Mapping[str, object]) -> torch.device:
    """The process settings a training needs (threads, deterministic CPU kernels); returns the device."""
    git_commit()  # read now, while the checkout still holds the code this process loaded
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = pick_device(str(cfg["device"]))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def train_run(cfg: Dict[str, object], folder: Path, on_epoch: Optional[Callable[[int, int, dict], None]] = None,
              ) -> Dict[str, object]:
    """Train one run into `folder` (resuming from its checkpoint if there is one); returns result.json."""
    run = Run(cfg, folder, prepare_process(cfg))
    device = run.device
    cfg, model, method = run.cfg, run.model, run.method
    opt = make_optimizer(cfg, model)
    sched = run.lr_scheduler(opt)
    forward = training_forward(model, cfg, device)
    power_iter = int(cfg["power_iter"])
    sync_every = max(1, int(cfg["sync_every"]))
    run.resume(opt, sched)
    model.train()
    epoch = run.start_epoch
    while epoch < run.epochs:   # a budgeted run's epoch count can change before each epoch (`Run.replan`)
        run.replan(epoch)
        t0, before = time.perf_counter(), run.train_seconds
        perm = run.epoch_order()
        tally = EpochTally(device)
        for it in range(run.steps_per_epoch):
            xb, yb = run.batch(it, perm)
            train_step(model, forward, method, opt, None, xb, yb, run.progress, power_iter, tally,
                       run.batch_rows(it, perm))
            run.advance()
            sched.step()
            # a host sync every `sync_every` steps (and at epoch end) instead of one per step
            if run.step % sync_every == 0 and not torch.isfinite(tally.loss):
                raise DivergedError(f"non-finite loss at epoch {epoch + 1}, step {run.step}",
                                    run.train_seconds + time.perf_counter() - t0)
        run.end_epoch(epoch, float(tally.loss), int(tally.correct), tally.row(run.steps_per_epoch),
                      opt.param_groups[0]["lr"], lambda: before + time.perf_counter() - t0,
                      lambda: {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, on_epoch)
        epoch += 1
    return run.finish()


def lower_bound_budget(cfg: Mapping[str, object]) -> tuple:
    """(pairs, Adam steps) of the empirical lower bound. A full run uses `lower_bound_pairs`/`_steps`
    (supplement C: 4000 × 1000); a short run (fewer epochs than its protocol, or a train subset) uses at most
    `lower_bound_pairs_short`/`_steps_short` where the dataset sets them. result.json records what was used."""
    pairs, steps = int(cfg["lower_bound_pairs"]), int(cfg["lower_bound_steps"])
    if is_short_run(cfg):
        if cfg.get("lower_bound_pairs_short") is not None:
            pairs = min(pairs, int(cfg["lower_bound_pairs_short"]))
        if cfg.get("lower_bound_steps_short") is not None:
            steps = min(steps, int(cfg["lower_bound_steps_short"]))
    return pairs, steps


def lower_bound_plan(cfg: Mapping[str, object], data: DataBundle) -> tuple:
    """(pairs, steps) the run's lower bound uses: `lower_bound_budget`, with as many pairs as the training pool
    holds (no bound at all when either is zero or negative)."""
    pairs, steps = lower_bound_budget(cfg)
    return min(pairs, len(data.y_train) // 2), steps


def lower_bound_generator(cfg: Mapping[str, object]) -> torch.Generator:
    """The generator that draws a run's lower-bound pairs (its own stream: evaluation leaves training's alone)."""
    return torch.Generator().manual_seed(int(cfg["seed"]) + 7919)


def local_K(model, ev: Dict[str, object]) -> Dict[str, object]:
    """An input-aware model's K as the tables report it: the per-point K̄ of the test split, mean and max, at the
    first certified ε, under the certificate (`K_f_local`) and the power-iterated published rule; empty for a
    global model, whose K_f (the global bound) is the whole story."""
    if not getattr(model, "input_aware", False):
        return {}
    test = ev["test"]
    name = next(iter(test["K_local"]))
    return {"K_kind": f"local: over the test split at ε = {name}",
            "K_f_local": test["K_local"][name], "K_f_local_power": test["K_local_power"][name]}


#: how many of a run's final evaluations `last_evals` summarises
LAST_EVALS = 10


def last_evals(rows, n: int = LAST_EVALS) -> Dict[str, object]:
    """The spread of the run's last `n` test evaluations (metrics.csv rows with test metrics): per metric its
    min, max and sample std, with the epochs they come from. A run's end state can swing from one evaluation to
    the next (GloRo on two-moons, official-moons.md); the tables compare this spread with the seed spread where
    the evaluations are consecutive epochs in the run's last tenth (`eval_tail`), so a schedule's drift is not
    read as noise."""
    evaluated = [r for r in rows if str(r.get("test_clean", "")).strip() not in ("", "nan")]
    tail = evaluated[-n:]
    if not tail:
        return {}
    out: Dict[str, object] = {"n": len(tail), "epochs": [int(float(r["epoch"])) for r in tail]}
    for key in [k for k in tail[-1] if k == "test_clean" or k.startswith("test_cra@") or k == "K_f"]:
        vals = np.array([float(r[key]) for r in tail if str(r.get(key, "")).strip() not in ("", "nan")])
        if len(vals):
            out[key] = {"min": float(vals.min()), "max": float(vals.max()),
                        "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def add_cra_ceiling(ev: Dict[str, object], data: DataBundle, cfg) -> None:
    """For two-class vector data (two-moons), each evaluated split's CRA ceiling at every named ε: the best CRA any
    classifier can reach on those points (bench/data/ceiling.py), in `eval[split]["cra_ceiling"]`."""
    if data.num_classes != 2 or len(tuple(data.input_shape)) != 1:
        return
    from bench.data.ceiling import cra_ceiling

    eps = resolve_eps_names(cfg)
    for split in ("train", "test"):
        if isinstance(ev.get(split), dict):
            x, y, _, _ = evaluation_split(data, cfg, split)
            x, y = data.inputs(x, torch.float64).detach().cpu().numpy(), y.cpu().numpy()   # data units, as ε
            ev[split]["cra_ceiling"] = {name: cra_ceiling(x, y, e) for name, e in eps.items()}


def finish_run(cfg, folder: Path, model, method, data: DataBundle, train_seconds: float, device,
               resumed_at=(), ev: Optional[Dict[str, object]] = None, hashed_cfg=None,
               budget: Optional[Dict[str, object]] = None, extra: Optional[Dict[str, object]] = None,
               lower: Optional[float] = None) -> Dict[str, object]:
    """Evaluate (unless the last epoch already did, `ev`), bound from below, and write result.json. `cfg` is the
    config trained (a budgeted run's with its planned epochs), `hashed_cfg` the one its folder is keyed by;
    `extra` adds entries (a packed member's `pack`); `lower`, the empirical lower bound when the caller computed it
    (a pack, for all its members at once, from the pairs `certify.lower_bound_pairs` draws)."""
    ev = evaluate(model, method, data, cfg) if ev is None else ev
    ev = dict(ev)
    cert_seconds = ev.pop(SECONDS_KEY, None)
    add_cra_ceiling(ev, data, cfg)
    bound, power = model.certified_bound(), model.power_bound()
    K_f = float(bound.max(data.num_classes))
    lb_pairs, lb_steps = lower_bound_plan(cfg, data)
    lobo = lower
    if lobo is None:
        lobo = 0.0
        if lb_pairs > 0 and lb_steps >= 0:
            lobo = certify.lower_bound(model, data.x_train, lb_pairs, lb_steps, float(cfg["lower_bound_lr"]),
                                       data.domain, lower_bound_generator(cfg), to_input=data.inputs)
    result = {
        "method": cfg["method"], "arch": cfg["arch"], "dataset": cfg["dataset"], "seed": int(cfg["seed"]),
        "config_hash": store.config_hash(hashed_cfg or cfg), "status": "complete", "epochs": int(cfg["epochs"]),
        "train_subset": cfg.get("train_subset"),
        "eval": ev,
        "K_f": K_f, "K_up": float(bound.K_up), "K_hf": float(method.K_hf(bound)),
        "K_f_power": float(power.max(data.num_classes)), "K_up_power": float(power.K_up),
        "K_hf_power": float(method.K_hf(power)),
        **local_K(model, ev),
        "layer_bounds": model.layer_bounds(), "layer_bounds_power": model.layer_bounds_power(),
        "lower_bound": lobo, "tightness": lobo / K_f if K_f > 0 else float("nan"),
        SECONDS_KEY: cert_seconds,
        "last_evals": last_evals(store.read_metrics(folder)),
        **({"budget": budget} if budget is not None else {}),
        **(extra or {}),
        "lower_bound_pairs": lb_pairs, "lower_bound_steps": lb_steps,
        "params": count_parameters(model),
        "certificate": method.certificate,
        "train_seconds": round(train_seconds, 3), "resumed_at_epochs": list(resumed_at),
        "device": device_name(device), "torch": torch.__version__, "lipbench": __version__,
        "commit": git_commit(), "host": platform.node(), "pid": os.getpid(),
        "checkpoint_sha256": store.file_sha256(folder / store.CHECKPOINT),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return store.write_result(folder, result)
