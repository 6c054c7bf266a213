"""Run a list of resolved configs locally: skip finished runs, one process per worker, a live rich view."""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import store


def run_label(cfg: Dict[str, object]) -> str:
    eps = f" ε={cfg['eps']:g}" if isinstance(cfg.get("eps"), (int, float)) else ""
    return f"{cfg['method']}/{cfg['arch']}/{cfg['dataset']}{eps} seed {cfg['seed']}"


def is_complete(folder: Path) -> bool:
    try:
        return store.result_or_none(folder) is not None
    except store.CorruptRunError:
        return False


def execute(cfg: Dict[str, object], results: str, queue=None) -> Dict[str, object]:
    """Train one run (in this process). A diverged run is recorded, not raised."""
    from bench.train import DivergedError, train_run

    folder = store.run_dir(results, cfg)

    def on_epoch(epoch, epochs, row):
        if queue is not None:
            queue.put((str(folder), epoch, epochs))

    try:
        return train_run(cfg, folder, on_epoch=on_epoch)
    except DivergedError as e:
        return store.write_diverged(folder, cfg, str(e))


def _worker(cfg, results, queue, threads):
    import torch

    torch.set_num_threads(threads)
    try:
        return execute(cfg, results, queue)
    except Exception:  # noqa: BLE001  (report the worker's traceback in the parent)
        raise RuntimeError(f"run {run_label(cfg)} failed:\n{traceback.format_exc()}") from None


def run_all(cfgs: List[Dict[str, object]], results: str, workers: int = 1, force: bool = False,
            quiet: bool = False) -> List[Dict[str, object]]:
    """Execute every run that is not complete; returns their results (finished ones included)."""
    todo, done = [], []
    for cfg in cfgs:
        folder = store.run_dir(results, cfg)
        if not force and is_complete(folder):
            done.append(store.read_result(folder))
        else:
            if force and (folder / store.RESULT).exists():
                (folder / store.RESULT).unlink()
                ckpt = folder / store.CHECKPOINT
                if ckpt.exists():
                    ckpt.unlink()
            todo.append(cfg)
    if not todo:
        return done
    workers = max(1, min(workers, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=quiet, transient=False) as progress:
        overall = progress.add_task(f"[bold]{len(todo)} runs ({len(done)} already complete)", total=len(todo))
        if workers == 1:
            for cfg in todo:
                task = progress.add_task(run_label(cfg), total=int(cfg["epochs"]))

                class _Q:
                    def put(self, item, task=task):
                        progress.update(task, completed=item[1])

                import torch

                torch.set_num_threads(int(cfg.get("threads") or threads))
                done.append(execute(cfg, results, _Q()))
                progress.advance(overall)
            return done
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            queue = manager.Queue()
            tasks = {}
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(_worker, cfg, results, queue, int(cfg.get("threads") or threads)): cfg
                           for cfg in todo}
                for cfg in todo:
                    tasks[str(store.run_dir(results, cfg))] = progress.add_task(run_label(cfg),
                                                                                total=int(cfg["epochs"]))
                pending = set(futures)
                while pending:
                    while not queue.empty():
                        folder, epoch, _ = queue.get()
                        progress.update(tasks[folder], completed=epoch)
                    finished = [f for f in pending if f.done()]
                    for f in finished:
                        pending.discard(f)
                        done.append(f.result())
                        progress.advance(overall)
                    if pending:
                        import time

                        time.sleep(0.2)
                for f in as_completed(futures):
                    pass
    return done
