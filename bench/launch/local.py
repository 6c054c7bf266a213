"""Run a list of resolved configs on this machine: skip finished runs, lock each run folder while training it,
pack runs that can share a process (bench/pack.py), train several packs at once in worker processes (one per GPU
slot when GPUs are present), live rich view."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import store


def run_label(cfg: Dict[str, object]) -> str:
    eps = f" ε={cfg['eps']:g}" if isinstance(cfg.get("eps"), (int, float)) else ""
    return f"{cfg['method']}/{cfg['arch']}/{cfg['dataset']}{eps} seed {cfg['seed']}"


def is_finished(folder: Path) -> bool:
    """A readable result.json (complete or diverged): the run is not trained again without --force."""
    try:
        return store.result_or_none(folder) is not None
    except store.CorruptRunError:
        return False


def _user_errors() -> tuple:
    from bench.config import ConfigError
    from bench.data.base import DatasetNotFoundError
    from bench.registry import UnknownNameError
    return ConfigError, UnknownNameError, DatasetNotFoundError, store.CorruptRunError


USER_ERRORS = _user_errors()


def execute(cfg: Dict[str, object], results: str, on_epoch=None) -> Tuple[str, Optional[Dict[str, object]]]:
    """Train one run in this process under its folder lock. Returns (outcome, result): outcome `trained`,
    `finished` (another launch finished it meanwhile) or `held` (another process is training it; no result)."""
    from bench.train import DivergedError, train_run

    folder = store.run_dir(results, cfg)
    lock = store.RunLock(folder)
    if not lock.acquire():
        return "held", None
    try:
        if is_finished(folder):  # finished by another launch between our check and the lock
            return "finished", store.read_result(folder)
        (folder / store.RUN_LOG).unlink(missing_ok=True)  # a failure log of an earlier attempt is history
        try:
            return "trained", train_run(cfg, folder, on_epoch=on_epoch)
        except DivergedError as e:
            return "trained", store.write_diverged(folder, cfg, str(e), e.train_seconds)
        except USER_ERRORS:
            raise  # bad input: the CLI's one-line error, exit 2
        except Exception as e:  # noqa: BLE001  (any bug or runtime failure: one line up, traceback to the log)
            log = folder / store.RUN_LOG
            store.atomic_write_text(log, f"{run_label(cfg)}\n{traceback.format_exc()}")
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise store.RunFailedError(f"run {run_label(cfg)} failed: {type(e).__name__}"
                                       f"{': ' + first if first else ''} (traceback in {log})") from None
    finally:
        lock.release()


def execute_pack(cfgs: List[Dict[str, object]], results: str, on_epoch=None,
                 ) -> List[Tuple[str, Optional[Dict[str, object]]]]:
    """Train the runs `cfgs` as one pack in this process (bench/pack.py), each under its own folder lock; one run
    is `execute`. Returns (outcome, result) per run, as `execute`; `on_epoch(i, epoch, epochs, row)` reports
    run i. A failure fails the whole pack: every member's folder gets the traceback (each member resumes from its
    own checkpoint)."""
    if len(cfgs) == 1:
        report = None if on_epoch is None else (lambda e, n, row: on_epoch(0, e, n, row))
        return [execute(cfgs[0], results, report)]
    from bench.pack import train_pack

    outcomes: List[Optional[Tuple[str, Optional[Dict[str, object]]]]] = [None] * len(cfgs)
    members, locks = [], []
    try:
        for i, cfg in enumerate(cfgs):
            folder = store.run_dir(results, cfg)
            lock = store.RunLock(folder)
            if not lock.acquire():
                outcomes[i] = ("held", None)
                continue
            locks.append(lock)
            if is_finished(folder):
                outcomes[i] = ("finished", store.read_result(folder))
                continue
            (folder / store.RUN_LOG).unlink(missing_ok=True)
            members.append(i)
        if members:
            report = None if on_epoch is None else (lambda k, e, n, row: on_epoch(members[k], e, n, row))
            try:
                trained = train_pack([cfgs[i] for i in members], [store.run_dir(results, cfgs[i]) for i in members],
                                     on_epoch=report)
            except USER_ERRORS:
                raise
            except Exception as e:  # noqa: BLE001  (as `execute`: one line up, the traceback to each member's log)
                text = traceback.format_exc()
                logs = []
                for i in members:
                    log = store.run_dir(results, cfgs[i]) / store.RUN_LOG
                    store.atomic_write_text(log, f"{run_label(cfgs[i])} (in a pack of {len(members)})\n{text}")
                    logs.append(log)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise store.RunFailedError(f"pack of {len(members)} runs ({run_label(cfgs[members[0]])}, ...) failed: "
                                           f"{type(e).__name__}{': ' + first if first else ''} (traceback in "
                                           f"{logs[0]})") from None
            for i, result in zip(members, trained):
                outcomes[i] = ("trained", result)
    finally:
        for lock in locks:
            lock.release()
    return outcomes


#: seconds between two progress messages of one run from a worker (its last epoch always goes out)
PROGRESS_INTERVAL = 2.0


def _throttled_progress(queue, folders: List[str]):
    """on_epoch for a worker: a message per epoch costs ~0.4 ms (pickle and pipe), seconds of a 12-member moons
    pack's 12,000 epochs, so each run reports at most every `PROGRESS_INTERVAL` seconds and at its last epoch."""
    last: Dict[int, float] = {}

    def report(i, epoch, epochs, row):
        now = time.monotonic()
        if epoch == epochs or now - last.get(i, -math.inf) >= PROGRESS_INTERVAL:
            last[i] = now
            queue.put((folders[i], epoch))
    return report


def _worker(cfgs, results, queue, threads, slots):
    import torch

    torch.set_num_threads(threads)
    slot = slots.get() if slots is not None else None
    try:
        if slot is not None:
            cfgs = [{**cfg, "device": f"cuda:{slot}"} for cfg in cfgs]
        folders = [str(store.run_dir(results, cfg)) for cfg in cfgs]
        return execute_pack(cfgs, results, _throttled_progress(queue, folders))
    finally:
        if slot is not None:
            slots.put(slot)


def gpu_slots(runs_per_gpu: int) -> List[int]:
    """GPU indices, each repeated runs_per_gpu times: a worker takes a slot, trains on it, gives it back."""
    import torch

    return [g for g in range(torch.cuda.device_count()) for _ in range(max(1, runs_per_gpu))]


def partition(cfgs: List[Dict[str, object]], results: str, force: bool):
    """Split into (to train, finished results); with force, finished results are removed first."""
    todo, done = [], []
    for cfg in cfgs:
        folder = store.run_dir(results, cfg)
        if not force and is_finished(folder):
            done.append(store.read_result(folder))
            continue
        if force:
            for name in (store.RESULT, store.CHECKPOINT, store.METRICS):
                if (folder / name).exists() and not store.is_running(folder):
                    (folder / name).unlink()
        todo.append(cfg)
    return todo, done


def run_all(cfgs: List[Dict[str, object]], results: str, workers: int = 1, force: bool = False,
            quiet: bool = False, runs_per_gpu: int = 1, pack: Optional[int] = None) -> List[Dict[str, object]]:
    """Execute every run that is not finished; returns the results (finished ones included). Runs held by
    another process are left to it and reported as skipped. Runs that can share a process train in packs of at
    most `pack` members (None: `bench.pack.default_pack_limit`; 1: every run in its own process); workers take packs."""
    from bench.pack import default_pack_limit, make_packs

    todo, done = partition(cfgs, results, force)
    finished_before = len(done)
    if not todo:
        print(f"trained 0 runs, left 0 to another process, {finished_before} already finished")
        return done
    use_gpus = all(str(c.get("device", "auto")) == "auto" for c in todo) and gpu_slots(1)
    slots = gpu_slots(runs_per_gpu) if use_gpus else []
    workers = max(1, min(workers if not slots else max(workers, len(slots)), len(todo)))
    if slots:
        workers = min(workers, len(slots))
    threads = max(1, (os.cpu_count() or 1) // workers)
    packs = make_packs(todo, default_pack_limit(todo) if pack is None else pack, workers)
    workers = min(workers, len(packs))
    skipped, trained, failed = [], 0, []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=quiet) as progress:
        overall = progress.add_task(f"[bold]{len(todo)} runs to train ({len(done)} finished)", total=len(todo))
        tasks = {str(store.run_dir(results, c)): progress.add_task(run_label(c), total=int(c["epochs"]))
                 for c in todo}

        def collect(cfg, outcome):
            nonlocal trained
            status, result = outcome
            if status == "held":
                skipped.append(cfg)
            else:
                trained += status == "trained"
                done.append(result)
            progress.advance(overall)

        if workers == 1 and not slots:
            import torch

            for group in packs:
                torch.set_num_threads(int(group[0].get("threads") or threads))
                group_tasks = [tasks[str(store.run_dir(results, cfg))] for cfg in group]
                try:
                    outcomes = execute_pack(group, results, lambda i, e, n, row, ts=group_tasks:
                                            progress.update(ts[i], completed=e))
                    for cfg, outcome in zip(group, outcomes):
                        collect(cfg, outcome)
                except store.RunFailedError as e:
                    failed.append(str(e))
                    progress.advance(overall, len(group))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Manager() as manager:
                queue = manager.Queue()
                slot_queue = None
                if slots:
                    slot_queue = manager.Queue()
                    for s in slots:
                        slot_queue.put(s)
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    futures = {pool.submit(_worker, g, results, queue, int(g[0].get("threads") or threads),
                                           slot_queue): g for g in packs}
                    pending = set(futures)
                    while pending:
                        while not queue.empty():
                            folder, epoch = queue.get()
                            progress.update(tasks[folder], completed=epoch)
                        for f in [f for f in pending if f.done()]:
                            pending.discard(f)
                            try:
                                for cfg, outcome in zip(futures[f], f.result()):
                                    collect(cfg, outcome)
                            except store.RunFailedError as e:
                                failed.append(str(e))
                                progress.advance(overall, len(futures[f]))
                        if pending:
                            time.sleep(0.2)
    print(f"trained {trained} runs, left {len(skipped)} to another process, "
          f"{len(done) - trained} already finished" + (f", {len(failed)} failed" if failed else ""))
    if failed:  # the other runs went on; the first failure is the one-line error
        more = f" (and {len(failed) - 1} more run(s) failed)" if len(failed) > 1 else ""
        raise store.RunFailedError(failed[0] + more)
    return done
