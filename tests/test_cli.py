"""The command line: bad input gives one line on stderr and a non-zero exit; a short run works end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

REPO = Path(__file__).resolve().parent.parent


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["run", "--method", "nosuch", "--arch", "moons-mlp"], "unknown method 'nosuch'"),
    (["run", "--method", "cll", "--arch", "moons-mpl"], "did you mean 'moons-mlp'"),
    (["run", "--method", "cll", "--arch", "moons-mlp", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["run", "--method", "cll", "--arch", "moons-mlp", "--set", "lamda=1e-6"], "did you mean 'lam'"),
    (["suite", "no-such-suite"], "unknown suite"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle, capsys, tmp_path):
    code = main(args + ["--results", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and needle in err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_malformed_yaml_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncells: [ {method: cll\n")
    proc = bench("suite", str(bad), "--results", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "malformed YAML" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_suite_key_is_rejected(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: typo\nseed: 3\ndefaults: {method: cll, arch: moons-mlp, dataset: moons}\n")
    proc = bench("suite", str(bad), "--results", str(tmp_path / "r"))
    assert proc.returncode != 0 and "did you mean 'seeds'" in proc.stderr


def test_run_then_table_end_to_end(tmp_path):
    results = tmp_path / "results"
    common = ["--arch", "moons-mlp", "--dataset", "moons", "--epochs", "4", "--seeds", "2", "--quiet",
              "--results", str(results), "--set", "lower_bound_steps=10", "--set", "lower_bound_pairs=100",
              "--set", "n_train=400", "--set", "n_test=400"]
    for method in ("cll", "gloro"):
        proc = bench("run", "--method", method, *common)
        assert proc.returncode == 0, proc.stderr
    folders = sorted(results.glob("moons/*/moons-mlp/*/seed-*"))
    assert len(folders) == 4
    for f in folders:
        assert json.loads((f / "result.json").read_text())["status"] == "complete"
    # a second launch skips complete runs (nothing is retrained)
    mtimes = {f: (f / "result.json").stat().st_mtime for f in folders}
    assert bench("run", "--method", "cll", *common).returncode == 0
    assert all((f / "result.json").stat().st_mtime == m for f, m in mtimes.items())
    proc = bench("table", str(results))
    assert proc.returncode == 0, proc.stderr
    assert "| cll |" in proc.stdout and "| gloro |" in proc.stdout and "± " in proc.stdout
    tex = bench("table", str(results), "--format", "tex").stdout
    assert r"\toprule" in tex and r"\bottomrule" in tex


def test_list_shows_registries():
    proc = bench("list")
    assert proc.returncode == 0
    for name in ("cll", "gloro", "standard", "moons-mlp", "4c3f", "moons"):
        assert name in proc.stdout


def test_every_option_has_a_help_line():
    import argparse

    from bench.cli import build_parser
    missing = [f"{name} {a.option_strings or a.dest}"
               for name, sub in build_parser()._subparsers._group_actions[0].choices.items()
               for a in sub._actions if a.help is None and not isinstance(a, argparse._HelpAction)]
    assert not missing, missing


@pytest.mark.parametrize("pack", ["1", None])
def test_an_exception_inside_a_run_is_one_line_with_the_traceback_in_the_run_log(capsys, tmp_path, monkeypatch, pack):
    # both paths: two runs alone (`--pack 1`, each its own failure) and the same two runs as one pack (one failure,
    # the traceback in both members' logs)
    import bench.pack
    import bench.train

    def broken(cfg, folder, on_epoch=None):
        folder.mkdir(parents=True, exist_ok=True)
        raise ZeroDivisionError("the loss divided by zero\nsecond line")

    def broken_pack(*args, **kwargs):
        raise ZeroDivisionError("the loss divided by zero\nsecond line")

    monkeypatch.setattr(bench.train, "train_run", broken)
    monkeypatch.setattr(bench.pack, "train_run", broken)
    monkeypatch.setattr(bench.pack, "_train_stacked", broken_pack)
    code = main(["run", "--method", "cll", "--arch", "moons-mlp", "--seeds", "2", "--quiet",
                 "--results", str(tmp_path)] + (["--pack", pack] if pack else []))
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1
    assert "ZeroDivisionError: the loss divided by zero" in err
    assert ("and 1 more run(s) failed" if pack == "1" else "pack of 2 runs") in err
    logs = sorted(tmp_path.rglob("run.log"))
    assert len(logs) == 2 and all("Traceback" in p.read_text() and "broken" in p.read_text() for p in logs)
    assert not list(tmp_path.rglob("result.json"))
