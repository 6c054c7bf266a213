"""The `bench` command: run, suite, table, report, audit, list.

Every user error (unknown name, malformed YAML, unknown key, missing dataset, corrupt run) ends in one line
on stderr and exit status 2; nothing half-written is left behind (run files are written atomically).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from bench.config import ConfigError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="where run folders go (default: results/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set eps=0.5 --set p=0.01 (repeatable)")
    p.add_argument("--epochs", type=int, help="train for this many epochs (lr milestones scale along)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=1, help="packs of runs trained at once in separate processes")
    p.add_argument("--pack", type=int, help="runs that differ only in seed and method hyperparameters train in one "
                                            "process as one stacked network, up to this many (default 16; "
                                            "image nets on a CPU: 1, as stacking measured slower there; 1: one "
                                            "process per run)")
    p.add_argument("--force", action="store_true", help="redo runs that are already complete")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--data-root", help="where datasets live (also: BENCH_DATA)")
    p.add_argument("--download", action="store_true", help="fetch a missing CIFAR dataset through torchvision")
    p.add_argument("--train-subset", type=int, help="train on a fixed, seeded subset of N examples")
    p.add_argument("--budget", help="train for this wall-clock time instead of an epoch count (2h, 90m, 300s): "
                                    "epochs from the measured step time, schedules scaled to them")
    p.add_argument("--profile", help="a method's named set of config values, e.g. official (the official code's "
                                     "behaviour where lipbench differs on purpose; `bench list` names them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and certify seeds 1..N of one configuration")
    run.add_argument("--method", required=True, help="method name (`bench list`), e.g. cll, gloro, soc, cpl, sll, lbdn")
    run.add_argument("--arch", required=True,
                     help="architecture name (`bench list`); a method may alias short names (cll: xl = CPL-XL)")
    run.add_argument("--dataset", help="dataset (default: the architecture's, e.g. moons for moons-mlp, "
                                        "cifar10 for 4c3f and the CPL/SOC/SLL nets)")
    run.add_argument("--seeds", type=int, default=1, help="train seeds 1..N")
    _add_common(run)

    suite = sub.add_parser("suite", help="run a suite (suites/NAME.yaml), then print and write its table")
    suite.add_argument("name", help="suite name (suites/NAME.yaml) or a path to a YAML file")
    suite.add_argument("--seeds", type=int, help="override the suite's seed count")
    suite.add_argument("--launcher", choices=["local", "slurm"], default="local",
                       help="train here (default) or submit a Slurm array through submitit")
    suite.add_argument("--partition", help="Slurm partition")
    suite.add_argument("--time", default="6:00:00", help="Slurm time limit per run (requeued when exceeded)")
    suite.add_argument("--max-parallel", type=int, default=16, help="Slurm array tasks running at once")
    suite.add_argument("--gpus-per-task", type=int, default=1, help="Slurm: GPUs per array task (default 1)")
    suite.add_argument("--cpus-per-task", type=int, default=8, help="Slurm: CPUs per array task (default 8)")
    suite.add_argument("--mem-gb", type=int, default=32, help="Slurm: memory per array task in GiB (default 32)")
    suite.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    suite.add_argument("--runs-per-gpu", type=int, default=1, help="local: runs sharing one GPU")
    _add_common(suite)

    status = sub.add_parser("status", help="done, running, diverged, partial and missing runs of a suite")
    status.add_argument("name", help="suite name (suites/NAME.yaml) or a path to a YAML file")
    status.add_argument("--results", default="results", help="where the suite's runs are (default: results/)")
    status.add_argument("--seeds", type=int, help="override the suite's seed count")

    table = sub.add_parser("table", help="aggregate the result.json files below a folder")
    table.add_argument("results", nargs="?", default="results", help="folder searched for result.json files")
    table.add_argument("--suite", help="only the runs of this suite, with its layout")
    table.add_argument("--format", choices=["md", "tex", "csv"], default="md", help="Markdown, LaTeX or CSV")
    table.add_argument("--split", default=None, help="evaluation split (test, train, test_lossless, ...)")
    table.add_argument("--baseline", help="print (+x) deltas against this row: METHOD, METHOD/ARCH, or defaults "
                                          "(each method's own row at lipbench's defaults)")
    table.add_argument("--per-seed", action="store_true", help="add the per-seed appendix table (as Tables D6-D8)")
    table.add_argument("--power", action="store_true",
                       help="add CRA and K(f) under the converged power iteration (the paper's way; not certificates)")
    table.add_argument("--vs-paper", action="store_true",
                       help="paper, measured and difference side by side (numbers from the suites' `paper:` blocks)")

    report = sub.add_parser("report", help="write <results>/<suite>/report.md: tables, figures, paper vs measured")
    report.add_argument("name", help="suite name (suites/NAME.yaml) or a path to a YAML file")
    report.add_argument("--results", default="results", help="where the suite's runs are (default: results/)")
    report.add_argument("--seeds", type=int, help="override the suite's seed count")
    report.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the overrides the suite was run with, to find its runs")
    report.add_argument("--epochs", type=int, help="the --epochs the suite was run with (short runs)")
    report.add_argument("--train-subset", type=int, help="the --train-subset the suite was run with")
    report.add_argument("--no-figures", action="store_true", help="tables and report.md only")
    report.set_defaults(device=None, data_root=None, download=False)

    audit = sub.add_parser("audit", help="re-check a run's certificates: checkpoint hash, float64 re-certification, "
                                         "attacks at the certified radius, exact layer norms")
    audit.add_argument("target", metavar="RUN_OR_SUITE", help="a run folder, a folder of runs, or a suite name")
    audit.add_argument("--results", default="results", help="where a suite's runs are (default: results/)")
    audit.add_argument("--points", type=int, default=100,
                       help="certified test points attacked per run, a seeded sample (0: all; default 100)")
    audit.add_argument("--restarts", type=int, default=3, help="PGD restarts per point and target (default 3)")
    audit.add_argument("--steps", type=int, default=50, help="PGD steps per restart (default 50)")
    audit.add_argument("--targets", type=int, default=1,
                       help="runner-up classes attacked directly per point, beside the untargeted margin "
                            "(0: all; default 1)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the point sample and the restarts")
    audit.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's, as this machine allows)")
    audit.add_argument("--data-root", help="where datasets live (also: BENCH_DATA)")
    audit.add_argument("--max-layer-entries", type=float, default=2e7,
                       help="form a layer's operator explicitly (exact norm) up to in × out entries (default 2e7)")
    audit.add_argument("--batch", type=int, help="attack rows per batch (default: by input size and device)")
    audit.add_argument("--quiet", action="store_true", help="no progress lines (the float64 re-certification of a "
                                                            "large net can take hours on a CPU)")
    audit.add_argument("--train", action=argparse.BooleanOptionalAction, default=None,
                       help="re-certify the train split too (default: when it is small, e.g. moons)")

    sub.add_parser("list", help="show methods, architectures, datasets and suites")

    # its options are parsed by benchmarks/perf.py itself (no "-" prefix here, so they all pass through)
    perf = sub.add_parser("perf", add_help=False, prefix_chars="+",
                          help="benchmark: CLL vs CE step, CIFAR-10 epoch, augmentation")
    perf.add_argument("perf_args", nargs=argparse.REMAINDER, help="see `bench perf --help`")
    return parser


def _overrides(args) -> dict:
    from bench.config import parse_set

    over = parse_set(args.set)
    if args.epochs is not None:
        over["epochs"] = args.epochs
    if args.device:
        over["device"] = args.device
    if args.data_root:
        over["data_root"] = args.data_root
    if args.train_subset is not None:
        over["train_subset"] = args.train_subset
    if getattr(args, "budget", None):
        over["budget"] = args.budget
    if getattr(args, "profile", None):
        over["profile"] = args.profile
    if args.download:
        over["download"] = True
    return over


def cmd_run(args) -> int:
    from bench.config import resolve
    from bench.launch.local import run_all
    from bench.report.tables import print_results

    spec = {"method": args.method, "arch": args.arch, "dataset": args.dataset, **_overrides(args)}
    cfg = resolve(spec)
    cfgs = [{**cfg, "seed": s} for s in range(1, args.seeds + 1)]
    results = run_all(cfgs, args.results, workers=args.workers, force=args.force, quiet=args.quiet, pack=args.pack)
    print_results(results)
    return 0


def cmd_suite(args) -> int:
    from bench.config import load_suite, suite_runs
    from bench.launch.local import run_all
    from bench.report.suite import write_suite_outputs

    suite = load_suite(args.name)
    if args.seeds is not None:
        suite["seeds"] = args.seeds
    cfgs = suite_runs(suite, _overrides(args))
    if args.launcher == "slurm":
        from bench.launch.slurm import submit

        submit(cfgs, args.results, str(suite["name"]), args.partition, args.time, args.max_parallel,
               dry_run=args.dry_run, force=args.force, gpus_per_task=args.gpus_per_task,
               cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, pack=args.pack)
        return 0
    if args.dry_run:
        from bench.launch.local import partition

        todo, done = partition(cfgs, args.results, force=False)
        print(f"suite {suite['name']}: {len(done)} finished, {len(todo)} to train (dry run)")
        return 0
    run_all(cfgs, args.results, workers=args.workers, force=args.force, quiet=args.quiet,
            runs_per_gpu=args.runs_per_gpu, pack=args.pack)
    write_suite_outputs(suite, cfgs, Path(args.results))
    return 0


def cmd_status(args) -> int:
    from bench.config import load_suite, suite_runs
    from bench.launch.status import print_status

    suite = load_suite(args.name)
    if args.seeds is not None:
        suite["seeds"] = args.seeds
    print_status(str(suite["name"]), suite_runs(suite), args.results)
    return 0


def cmd_table(args) -> int:
    from bench.report.report import table_for_folder

    print(table_for_folder(Path(args.results), suite_name=args.suite, fmt=args.format, split=args.split,
                           baseline=args.baseline, per_seed=args.per_seed, vs_paper=args.vs_paper,
                           power=args.power))
    return 0


def cmd_report(args) -> int:
    from bench.config import load_suite, suite_runs
    from bench.report.report import write_report

    suite = load_suite(args.name)
    if args.seeds is not None:
        suite["seeds"] = args.seeds
    written = write_report(suite, suite_runs(suite, _overrides(args)), Path(args.results),
                           figures=not args.no_figures)
    print(f"report: {written['report.md']}")
    return 0


def cmd_audit(args) -> int:
    from bench.audit import AuditOptions, main as audit_main

    opts = AuditOptions(points=args.points, restarts=args.restarts, steps=args.steps, targets=args.targets,
                        seed=args.seed, device=args.device, data_root=args.data_root,
                        max_layer_entries=args.max_layer_entries, batch=args.batch, train=args.train)
    return audit_main(args.target, args.results, opts, quiet=args.quiet)


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.config import list_suites
    from bench.registry import ARCHS, DATASETS, METHODS

    t = Table(title="lipbench")
    t.add_column("kind")
    t.add_column("names")
    t.add_row("methods", ", ".join(METHODS.names()))
    t.add_row("architectures", ", ".join(ARCHS.names()))
    t.add_row("datasets", ", ".join(DATASETS.names()))
    t.add_row("suites", ", ".join(list_suites()))
    t.add_row("profiles", ", ".join(f"{m}: {', '.join(sorted(METHODS.get(m).profiles))}" for m in METHODS.names()
                                    if getattr(METHODS.get(m), "profiles", None)))
    Console().print(t)
    return 0


def cmd_perf(args) -> int:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "perf.py"
    if not path.is_file():
        raise FileNotFoundError(f"bench perf needs the repository's benchmarks/perf.py (not found at {path})")
    spec = importlib.util.spec_from_file_location("lipbench_perf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.perf_args)


COMMANDS = {"run": cmd_run, "suite": cmd_suite, "table": cmd_table, "list": cmd_list, "status": cmd_status,
            "perf": cmd_perf, "report": cmd_report, "audit": cmd_audit}


def main(argv: Optional[List[str]] = None) -> int:
    from bench.data.base import DatasetNotFoundError
    from bench.registry import UnknownNameError
    from bench.store import CorruptRunError, RunFailedError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UnknownNameError, DatasetNotFoundError, CorruptRunError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bench: error: {msg}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
