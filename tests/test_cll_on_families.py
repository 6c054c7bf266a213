"""CLL on the SLL and Sandwich backbones (Table B4, Table 2): aliases, recipes, and the families' shared pipelines."""
import math

import pytest

from bench.config import resolve
from bench.nn.families import sandwich, sll
from bench.registry import ARCHS, METHODS


@pytest.mark.parametrize("arch,expected", [
    ("sll-s", "sll-s-linear"), ("sll-xl", "sll-xl-linear"), ("sll-m-trunc", "sll-m-linear"),
    ("sll-xl-paper", "sll-xl-paper-linear"), ("sll-l-paper-trunc", "sll-l-paper-linear"),
    ("sandwich", "sandwich-linear"), ("sandwich-lin", "sandwich-linear"), ("xl", "cpl-xl-linear"),
])
def test_cll_means_the_unconstrained_last_layer(arch, expected):
    cfg = resolve({"method": "cll", "arch": arch, "dataset": "cifar10"})
    assert cfg["arch"] == expected
    assert ARCHS.get(expected).spec["head"] == "linear"


@pytest.mark.parametrize("dataset,p,K_hf", [("cifar10", 5e-5, 10.6), ("cifar100", 3e-3, 6.5)])
def test_cll_on_sll_xl_follows_table_b4(dataset, p, K_hf):
    cfg = resolve({"method": "cll", "arch": "sll-xl-paper", "dataset": dataset})
    assert cfg["arch"] == "sll-xl-paper-linear"
    # SLL's own pipeline (the fork trains in SLL's code base), CLL's loss
    for key, value in sll.SLL_PIPELINE.items():
        assert cfg[key] == value, key
    assert cfg["betas"] == [0.5, 0.9] and cfg["normalize"] == sll.sll_inputs(dataset)["normalize"]
    assert cfg["augment"] == sll.SLL_AUGMENT
    assert (cfg["eps"], cfg["p"], cfg["lam"], cfg["delta"]) == (1.0, p, 1e-3, None)
    method = METHODS.get("cll")(cfg, 100 if dataset == "cifar100" else 10)
    assert round(method.K_hf(None), 1) == K_hf   # Table 2's K(h∘f) column: 1/σ_ε(p)


def test_cll_on_sandwich_uses_lbdn_pipeline():
    cfg = resolve({"method": "cll", "arch": "sandwich", "dataset": "tinyimagenet"})
    for key, value in sandwich.LBDN_PIPELINE.items():
        assert cfg[key] == value, key
    assert cfg["betas"] is None and cfg["augment"] == sandwich.LBDN_AUGMENT
    assert cfg["normalize"] == [sandwich.LBDN_MEANS["tinyimagenet"], [1.0, 1.0, 1.0]]
    assert (cfg["eps"], cfg["p"], cfg["lam"]) == (1.0, 0.025, 1e-3)


def test_sll_and_lbdn_take_their_family_pipelines():
    s = resolve({"method": "sll", "arch": "sll-s", "dataset": "cifar100"})
    assert {k: s[k] for k in sll.SLL_PIPELINE} == sll.SLL_PIPELINE and s["augment"] == sll.SLL_AUGMENT
    b = resolve({"method": "lbdn", "arch": "sandwich", "dataset": "cifar10"})
    assert {k: b[k] for k in sandwich.LBDN_PIPELINE} == sandwich.LBDN_PIPELINE
    assert b["normalize"] == [sandwich.LBDN_MEANS["cifar10"], [1.0, 1.0, 1.0]]
    assert math.isclose(min(b["normalize"][1]), 1.0)   # std 1: L = 1
