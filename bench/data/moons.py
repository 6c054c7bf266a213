"""Two-moons with uniform-in-disk noise (reference paper §4.1, supplement B).

sklearn's make_moons with noise 0, then every point moves by r = 0.1·√U₁ in direction θ = 2πU₂, which is
uniform in a disk of radius 0.1. The moons' arcs are 0.5 apart at their closest, so the true margin is
2ε = 0.3 (official `lib/datasets.py` `Moons2D`). 2,000 training and 20,000 held-out points.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.data.base import DataBundle
from bench.registry import register_dataset

NOISE_RADIUS = 0.1


def sample_moons(n: int, rng: np.random.Generator) -> tuple:
    from sklearn.datasets import make_moons   # here: importing sklearn takes 1.5 s, which only moons runs need

    x, y = make_moons(n_samples=n, noise=0.0, shuffle=True, random_state=int(rng.integers(2**31 - 1)))
    r = NOISE_RADIUS * np.sqrt(rng.uniform(size=n))
    theta = 2 * np.pi * rng.uniform(size=n)
    x = x + np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    return x, y


@register_dataset("moons")
def load_moons(cfg, seed: int) -> DataBundle:
    """Seeded two-moons: the training and held-out sets are drawn from one generator seeded with `seed`."""
    n_train, n_test = int(cfg.get("n_train", 2000)), int(cfg.get("n_test", 20000))
    rng = np.random.default_rng(seed)
    x_tr, y_tr = sample_moons(n_train, rng)
    x_te, y_te = sample_moons(n_test, rng)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return DataBundle("moons", as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te), num_classes=2,
                      input_shape=(2,), domain=None, info={"noise_radius": NOISE_RADIUS, "seed": seed})


# The paper reports CRA at the training ε and certifies this tiny model in float64.
load_moons.input_shape = (2,)
# The last 10 epochs are each evaluated: the end state of a moons run can swing from epoch to epoch
# (official-moons.md), and result.json's `last_evals` shows by how much. A 1,000-epoch moons run takes about a
# minute: a checkpoint every 25 epochs (each is an fsync'd write) keeps the file system out of the run time.
load_moons.defaults = {"n_train": 2000, "n_test": 20000, "cert_eps": ["eps"], "certify_dtype": "float64",
                       "eval_every": 50, "eval_tail": 10, "checkpoint_every": 25}
