"""Config hashes: keys left at None do not enter the hash (a new option that defaults to off keeps every existing
run's folder), execution keys never do, and a folder written under the earlier scheme still reads as intact."""
from bench import store
from bench.config import config_hash, config_hashes_accepted, resolve


def test_none_keys_and_execution_keys_do_not_change_the_hash():
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "dataset": "moons"})
    assert config_hash({**cfg, "some_new_option": None}) == config_hash(cfg)
    assert config_hash({**cfg, "device": "cuda:3", "eval_batch": 7}) == config_hash(cfg)
    assert config_hash({**cfg, "eps": 0.25}) != config_hash(cfg)


def test_a_folder_of_the_earlier_scheme_reads_as_intact(tmp_path):
    cfg = {**resolve({"method": "cll", "arch": "moons-mlp", "dataset": "moons"}), "seed": 1}
    accepted = config_hashes_accepted(cfg)
    legacy = (accepted - {config_hash(cfg)}).pop()        # the scheme that hashed None values too
    folder = tmp_path / "moons" / "cll" / "moons-mlp" / legacy / "seed-1"
    store.write_config(folder, cfg)
    result = {"method": "cll", "arch": "moons-mlp", "dataset": "moons", "seed": 1, "config_hash": legacy,
              "status": "complete", "epochs": 1, "K_f": 1.0, "K_hf": 1.0, "eval": {}, "lower_bound": 0.5,
              "tightness": 0.5, "train_seconds": 1.0, "device": "cpu", "torch": "x", "commit": "x"}
    store.write_result(folder, result)
    assert store.read_result(folder)["config_hash"] == legacy
    # a hash that is neither scheme's is still refused
    other = folder.parent.parent / "0123456789ab" / "seed-1"
    store.write_config(other, cfg)
    store.write_result(other, {**result, "config_hash": "0123456789ab"})
    try:
        store.read_result(other)
        raise AssertionError("a foreign hash was accepted")
    except store.CorruptRunError as e:
        assert "config hash mismatch" in str(e)


def test_exponent_numbers_are_floats_in_set_and_suites():
    """PyYAML (YAML 1.1) reads `1e-6` as a string; lipbench reads it as the float a user means, so `lam=1e-6` and
    `lam=1.0e-6` resolve to the same config and hash, in `--set` and in suite files."""
    from bench.config import parse_set, read_yaml, resolve

    a = resolve({"method": "cll", "arch": "moons-mlp", **parse_set(["lam=1e-6", "p={schedule: poly, start: 1e-3, "
                                                                    "end: 1e-15, power: 50}"])})
    b = resolve({"method": "cll", "arch": "moons-mlp", **parse_set(["lam=1.0e-6", "p={schedule: poly, start: 0.001,"
                                                                    " end: 1.0e-15, power: 50}"])})
    assert a["lam"] == 1e-6 and isinstance(a["p"]["end"], float)
    assert config_hash(a) == config_hash(b)
    assert read_yaml("x: [1e3, -2E-2, 36/255, abc, 7]")["x"] == [1000.0, -0.02, "36/255", "abc", 7]
