"""CPL layers: conformance with the official code, the certificate when σ is under-estimated, the network's
1-Lipschitz glue, the hinge loss, the triangular lr, parameter counts. The layer contract (exact Jacobians and
their spectrum against the certificate before and after adversarial steps, stale bounds, state_dict round
trips) is tests/test_layer_contract.py."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.nn.lipschitz import UnconvergedBoundError
from bench.nn.verify import autograd_jacobians
from bench.optim import make_lr_scheduler, triangular_factor
from bench.nn.families import cpl
from methods import cpl as cpl_method
from tests import official
from tests.conftest import fixture, t64

@pytest.mark.parametrize("case", sorted(official.CPL_CASES))
def test_conformance_with_official_cpl(case):
    fixture(case)  # skips when tests/fixtures is absent
    layer, z = official.cpl_layer(case)
    kind = official.CPL_CASES[case][0]
    x = t64(z["x"])
    train = copy.deepcopy(layer).train()
    with torch.no_grad():  # one power step from the stored iterate, h from that σ
        np.testing.assert_allclose(train(x).numpy(), z["y_train_from_init"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(train.power_iterate.numpy(), z["pm_u_after_train_step"], atol=1e-12)
    layer.eval()
    with torch.no_grad():  # the first eval forward runs the official 100 steps and caches eval_sv_max
        y = layer(x)
    np.testing.assert_allclose(float(layer.eval_sv_max), float(z["eval_sv_max"][0]), rtol=1e-10)
    np.testing.assert_allclose(layer.power_iterate.numpy(), z["pm_u_after_eval"], atol=1e-10)
    np.testing.assert_allclose(y.numpy(), z["y_eval"], rtol=1e-12, atol=1e-12)
    # converge(): the engine's float64 power iteration reaches the exact σ_max from below and becomes eval's σ;
    # the certificate is max(1, h·ḡ² − 1) with ḡ ≥ σ_max the guaranteed bound of W
    exact = float(z["exact_weight_spectral_norm"])
    bound = layer.converge()
    sv = float(layer.eval_sv_max)
    assert exact * (1 - 1e-8) <= sv <= exact * (1 + 1e-12)
    h = 2.0 / (sv * sv + layer.epsilon)
    assert bound >= max(1.0, h * exact ** 2 - 1.0)
    assert bound == float(layer.certified_bound())
    assert float(layer.power_bound()) == 1.0
    assert exact <= layer.weight_norm_bound
    if kind == "conv":
        # the circular bound of W at 8×8 is 3.45 % above exact (measured), far more than the slack ε/(2σ²) =
        # 2.2e-5 that h leaves: the layer certifies 2·1.0345² − 1 ≈ 1.14, not 1
        assert layer.weight_norm_bound <= exact * 1.05
        assert 1.0 < bound <= 2 * 1.05 ** 2 - 1
    else:  # Gram iteration: within 1e-12 of exact (measured 8.5e-14), inside the slack: exactly 1
        assert layer.weight_norm_bound <= exact * (1 + 1e-9)
        assert bound == 1.0


def test_under_estimated_sigma_is_accounted_for():
    """If eval used a σ below σ_max, the layer is max(1, h·σ_max² − 1)-Lipschitz: the certificate's formula
    bounds the measured Jacobian, and the layer certifies 1 only with a σ from a converged iteration."""
    torch.manual_seed(12)
    layer = cpl.ConvexPotentialLinear(8, 16).double().eval()
    x = torch.randn(64, 8, dtype=torch.float64) * 3
    layer(x[:1])
    layer.converge()
    exact = float(torch.linalg.matrix_norm(layer.weights.detach(), 2))
    with torch.no_grad():
        layer.eval_sv_max.fill_(0.7 * exact)  # what one training-time power step can give (peer-methods §3)
    h = 2.0 / ((0.7 * exact) ** 2 + layer.epsilon)
    worst = max(float(torch.linalg.matrix_norm(J, 2)) for J in autograd_jacobians(layer, x))
    assert worst > 1.05                         # the layer is no longer 1-Lipschitz ...
    assert worst <= h * exact ** 2 - 1 + 1e-9   # ... and the formula bounds it
    with pytest.raises(UnconvergedBoundError):  # the certificate refuses a σ it did not converge
        layer.certified_bound()
    assert layer.converge() == 1.0              # dense: the Gram bound is within the slack of h
    assert float(layer.power_bound()) == 1.0


def test_glue_layers_are_one_lipschitz():
    x_shape = (3, 8, 8)
    n = int(np.prod(x_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *x_shape)
    pad = cpl.ChannelPad(5)(basis).reshape(n, -1)
    assert torch.allclose(torch.linalg.svdvals(pad), torch.ones(n, dtype=torch.float64))  # an isometry
    pool = cpl.SumPool()(basis).reshape(n, -1)
    assert float(torch.linalg.matrix_norm(pool, 2)) == pytest.approx(1.0, abs=1e-12)
    trunc = cpl.Truncate(10)(torch.eye(40, dtype=torch.float64))
    assert float(torch.linalg.matrix_norm(trunc, 2)) == pytest.approx(1.0, abs=1e-12)


def test_hinge_loss_is_the_official_margin_loss():
    torch.manual_seed(14)
    z, y = torch.randn(7, 10), torch.randint(0, 10, (7,))
    method = cpl_method.CPL({"margin": 0.7, "eps": 0.1}, 10)
    loss, _ = method.loss(z, y, None, 0.0)
    zy = z.gather(1, y[:, None])
    terms = F.relu(0.7 - zy + z).masked_fill(F.one_hot(y, 10).bool(), 0.0)
    assert float(loss) == pytest.approx(float(terms.sum(1).mean() / 10), rel=1e-6)


def test_triangular_schedule_matches_official():
    total = 1000
    for t in (1, 200, 400, 401, 600, 800, 900, 1000):  # TriangularLRScheduler.step(t): np.interp at 0, 2T/5, 4T/5, T
        expected = float(np.interp([t], [0, total * 2 // 5, total * 4 // 5, total], [0, 1.0, 1.0 / 20, 0])[0])
        assert triangular_factor(t, total) == expected
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    sched = make_lr_scheduler({"lr_schedule": "triangular", "epochs": 10}, opt, steps_per_epoch=100)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 400) and lrs[399] == pytest.approx(1e-3)
    assert lrs[799] == pytest.approx(1e-3 / 20) and lrs[999] == 0.0


# (depth, channels, depth_linear, n_features) with 5 inner conv channels, CIFAR 32×32, 10 classes. Reference
# counts (peer-methods.md §3): CPL-S 41.4 M, the fork's XL 472 M (LBDN's 120×70 XL: 276 M). The official dense
# layer also holds an unused `alpha` (one parameter per dense layer, left out here).
PARAMS = {"cpl-s": 41_342_616, "cpl-m": 78_744_830, "cpl-l": 118_238_970, "cpl-xl": 472_298_990,
          "cpl-s-lln": 41_371_426, "cpl-xl-lln": 472_375_800, "cpl-xl-linear": 472_375_800}


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_cpl_parameter_counts(arch):
    from bench.registry import ARCHS
    spec = ARCHS.get(arch).spec
    with torch.device("meta"):  # 472 M parameters would need 1.9 GB: count the modules without memory
        features, classifier, _ = cpl.cpl_modules((3, 32, 32), 10, **spec)
    assert sum(p.numel() for m in (features, classifier) for p in m.parameters()) == PARAMS[arch]


def test_xl_aliases_and_family_recipes():
    from bench.config import resolve
    assert resolve({"method": "cpl", "arch": "xl", "dataset": "cifar10"})["lr_schedule"] == "triangular"
    assert resolve({"method": "cpl", "arch": "xl", "dataset": "cifar10"})["arch"] == "cpl-xl"
    xl = resolve({"method": "cll", "arch": "xl", "dataset": "cifar10"})       # Table B4, (CPL-)XL
    assert xl["arch"] == "cpl-xl-linear"
    assert (xl["epochs"], xl["batch_size"], xl["lr_schedule"], xl["eps"], xl["p"], xl["lam"]) == \
        (200, 256, "triangular", 0.25, 0.1, 1e-3)
    lc = resolve({"method": "cll", "arch": "lipconv-20", "dataset": "cifar10"})  # Table B4, LipConv
    assert lc["arch"] == "lipconv-20-linear"
    assert (lc["epochs"], lc["optimizer"], lc["lr_milestones"], lc["eps"], lc["p"], lc["lam"]) == \
        (200, "adamw", [100, 150], 0.25, 0.05, 1e-3)
    assert resolve({"method": "cll", "arch": "lipconv-20", "dataset": "tinyimagenet"})["beta"] == 1.0
