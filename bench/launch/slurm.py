"""Slurm through submitit: one job array of the runs that are not finished, packed (bench/pack.py).

Each array task trains one pack of runs with `launch.local.execute_pack` (folder locks, each member resumed from
its checkpoint; a pack of one is an ordinary run). The task is
a submitit `Checkpointable`: when Slurm pre-empts it or its time limit is near, submitit calls `checkpoint()`,
which requeues the same task; the requeued task resumes from its runs' last per-epoch checkpoints, so at most
one epoch of work is lost.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import submitit

from bench.launch.local import execute_pack, partition, run_label
from bench.store import is_running, run_dir


def parse_time(text: str) -> int:
    """Slurm time ("6:00:00", "1-12:00:00", "90" minutes, "30:00" mm:ss) → minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ValueError(f"cannot read the time limit {text!r}; use e.g. 6:00:00 or 1-00:00:00")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if c is not None:          # [d-]hh:mm:ss
        minutes = a * 60 + b + (1 if c else 0)
    elif b is not None:        # [d-]hh:mm with days, mm:ss without
        minutes = a * 60 + b if days is not None else a + (1 if b else 0)
    else:
        minutes = a * 60 if days is not None else a
    return minutes + (days or 0) * 24 * 60


class RunTask(submitit.helpers.Checkpointable):
    """One array task: train (or resume) one pack of runs. Requeued as is on pre-emption or timeout."""

    def __init__(self, results: str):
        self.results = results

    def __call__(self, cfgs: List[Dict[str, object]]) -> List[Optional[Dict[str, object]]]:
        import torch

        if torch.cuda.is_available():
            cfgs = [{**cfg, "device": "cuda"} if str(cfg.get("device", "auto")) == "auto" else cfg for cfg in cfgs]
        return [result for _, result in execute_pack(cfgs, self.results)]


def make_executor(folder: Path, partition_name: Optional[str], time_limit: str, max_parallel: int,
                  gpus_per_task: int = 1, cpus_per_task: int = 8, mem_gb: int = 32, cluster: Optional[str] = None):
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": parse_time(time_limit), "slurm_array_parallelism": max_parallel,
              "gpus_per_node": gpus_per_task, "cpus_per_task": cpus_per_task, "mem_gb": mem_gb,
              "name": "lipbench"}
    if partition_name:
        params["slurm_partition"] = partition_name
    executor.update_parameters(**params)
    return executor, params


def submit(cfgs: List[Dict[str, object]], results: str, suite_name: str, partition_name: Optional[str],
           time_limit: str, max_parallel: int, dry_run: bool = False, executor=None, force: bool = False,
           gpus_per_task: int = 1, cpus_per_task: int = 8, mem_gb: int = 32, pack: Optional[int] = None) -> List:
    """Submit one job array of the unfinished runs, one task per pack (at most `pack` runs; None:
    `bench.pack.default_pack_limit`); with dry_run, print it instead. Returns the jobs."""
    from bench.pack import DEFAULT_PACK, default_pack_limit, make_packs

    todo, done = partition(cfgs, results, force)
    running = [c for c in todo if is_running(run_dir(results, c))]  # held by a live process: leave them be
    todo = [c for c in todo if c not in running]
    if pack is None:   # tasks with a GPU pack by default, wherever this submitting machine is
        pack = DEFAULT_PACK if gpus_per_task else default_pack_limit(todo)
    packs = make_packs(todo, pack)
    log_folder = Path(results) / "_slurm" / suite_name / "%j"
    params = {"partition": partition_name, "time": time_limit, "timeout_min": parse_time(time_limit),
              "array": f"0-{len(packs) - 1}%{max_parallel}" if packs else "-", "gpus_per_task": gpus_per_task,
              "cpus_per_task": cpus_per_task, "mem_gb": mem_gb, "logs": str(log_folder)}
    if dry_run or not todo:
        print(f"suite {suite_name}: {len(done)} finished, {len(running)} running, {len(todo)} to submit"
              + (f" in {len(packs)} packs" if todo else "") + (" (dry run: nothing submitted)" if dry_run else ""))
        if todo:
            print("sbatch " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in params.items()
                                       if k not in ("timeout_min", "logs") and v is not None))
            for i, group in enumerate(packs):
                for cfg in group:
                    print(f"  [{i}] {run_label(cfg)}  →  {run_dir(results, cfg)}")
        return []
    if executor is None:
        executor, _ = make_executor(log_folder, partition_name, time_limit, max_parallel, gpus_per_task,
                                    cpus_per_task, mem_gb)
    jobs = executor.map_array(RunTask(str(results)), packs)
    print(f"submitted {len(todo)} runs of suite {suite_name} in {len(jobs)} packs as job array "
          f"{jobs[0].job_id.split('_')[0]}")
    return jobs
