"""Issue 15, part 3: `amp: bf16` and `compile: true` change only the training forward, are part of the config
hash, and train to the same place as eager float32 on a short CPU run."""
import pytest

from bench.config import ConfigError, config_hash, resolve
from bench.train import train_run


def _short(**extra):
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "epochs": 6, "n_train": 400, "n_test": 400,
                   "lower_bound_pairs": 4, "lower_bound_steps": 1, "eval_tail": None, **extra})
    cfg["seed"] = 1
    return cfg


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return train_run(_short(), tmp_path_factory.mktemp("eager"))


def test_options_enter_the_hash_and_are_checked():
    assert len({config_hash(_short()), config_hash(_short(amp="bf16")), config_hash(_short(compile=True))}) == 3
    with pytest.raises(ConfigError, match="amp must be bf16"):
        resolve({"method": "cll", "arch": "moons-mlp", "amp": "fp16"})


def test_bf16_autocast_trains_like_float32(eager, tmp_path):
    amp = train_run(_short(amp="bf16"), tmp_path)
    assert amp["eval"]["test"]["clean"] == pytest.approx(eager["eval"]["test"]["clean"], abs=0.03)
    assert amp["K_f"] == pytest.approx(eager["K_f"], rel=0.02)
    # certification stays float64 (moons) with the same guaranteed-bound path
    assert amp["K_f"] >= amp["K_f_power"] and amp["layer_bounds"] != eager["layer_bounds"]


def test_compiled_forward_matches_eager(eager, tmp_path):
    compiled = train_run(_short(compile=True), tmp_path)
    assert compiled["eval"]["test"]["clean"] == pytest.approx(eager["eval"]["test"]["clean"], abs=0.01)
    assert compiled["K_f"] == pytest.approx(eager["K_f"], rel=1e-4)
