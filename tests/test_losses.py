"""CLL and GloRo against their definitions and against the official code's outputs (tests/fixtures)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.certify import certified
from bench.nn.bound import PairwiseBound
from methods.cll import CLL, calibrated_sigma, cll_logits
from methods.gloro import GloRo, bottom_logit, gloro_log_probs
from tests.conftest import fixture, t64

CLL_CASES = [f"cll_{kind}_eps{e}_q{q}_{side}" for kind in ("pairwise", "perlogit_v2")
             for e, q in (("0.15", "0.3"), ("0.5", "0.01"), ("1.0", "0.025")) for side in ("twosided", "onesided")]


@pytest.mark.parametrize("eps,p,expected", [(0.15, 0.3, 11.56), (0.5, 0.01, 10.59), (1.0, 0.025, 4.37),
                                            (0.25, 0.05, 14.65), (1.0, 0.001, 7.60)])
def test_K_hf_is_one_over_sigma_as_in_the_paper_tables(eps, p, expected):
    assert round(1.0 / calibrated_sigma(eps, p), 2) == expected


def test_cll_with_two_classes_is_a_calibrated_logistic():
    """Supplement eq. 6–10: for N = 2, P(y) = sigmoid((u − 2δ)/σ) with u = (f_y − f_i)/K_iy."""
    torch.manual_seed(0)
    eps, p = 0.15, 0.01
    sigma = calibrated_sigma(eps, p)
    W = torch.randn(2, 5, dtype=torch.float64)
    bound = PairwiseBound(torch.tensor(3.0, dtype=torch.float64), W)
    f = torch.randn(64, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (64,))
    z = cll_logits(f, y, bound, eps, p, delta=eps)
    K = 3.0 * torch.linalg.vector_norm(W[0] - W[1])
    u = (f.gather(1, y[:, None]) - f.gather(1, (1 - y)[:, None])).squeeze(1) / K
    p_label = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(p_label, torch.sigmoid((u - 2 * eps) / sigma))
    # calibration: at u = ε the label's probability is p/2, at u = 3ε it is 1 − p/2
    sigmoid = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    assert math.isclose(sigmoid((eps - 2 * eps) / sigma), p / 2, rel_tol=1e-9)
    assert math.isclose(sigmoid((3 * eps - 2 * eps) / sigma), 1 - p / 2, rel_tol=1e-9)


@pytest.mark.parametrize("case", CLL_CASES)
def test_cll_matches_official_code(case):
    z = fixture(case)
    f = t64(z["logits"]).requires_grad_(True)
    W = t64(z["W"]).requires_grad_(True)
    y = torch.as_tensor(z["targets"])
    eps, q = float(z["epsilon"]), float(z["err_quantile"])
    cfg = {**CLL.hparams, "eps": eps, "p": q, "one_sided": bool(z["one_sided"]),
           "normalization": "pairwise" if "pairwise" in case else "per_logit", "lam": 0.0}
    method = CLL(cfg, num_classes=10)
    bound = PairwiseBound(t64(z["K_up_effective"]), W)
    calibrated = cll_logits(f, y, bound, eps, q, eps, cfg["one_sided"], cfg["normalization"])
    np.testing.assert_allclose(calibrated.detach().numpy(), z["calibrated_logits"], rtol=1e-12, atol=1e-12)
    loss, _ = method.loss(f, y, bound, progress=0.0)
    np.testing.assert_allclose(loss.item(), z["loss"], rtol=1e-12)
    per_sample = F.cross_entropy(calibrated, y, reduction="none")
    np.testing.assert_allclose(per_sample.detach().numpy(), z["loss_per_sample"], rtol=1e-12, atol=1e-12)
    loss.backward()
    np.testing.assert_allclose(f.grad.numpy(), z["grad_logits"], rtol=1e-12, atol=1e-12)
    assert W.grad is None or torch.count_nonzero(W.grad) == 0  # the normaliser is detached
    sigma = calibrated_sigma(eps, q)
    np.testing.assert_allclose(sigma, z["sigma"], rtol=1e-12)
    np.testing.assert_allclose(1 / sigma, z["K_hf"], rtol=1e-12)
    np.testing.assert_allclose(method.K_hf(bound), z["K_hf"], rtol=1e-12)
    # certificates: ours equal the official rule wherever the top logit is unique (no ties here)
    ours = certified(f.detach(), bound, eps, 10) & (f.detach().argmax(1) == y)
    assert torch.equal(ours, torch.as_tensor(z["robust_accuracy_certified"]))


GLORO_CASES = ["gloro_eps0.1412", "gloro_eps0.5000", "gloro_trades_lambda1.2_eps0.1412"]


@pytest.mark.parametrize("case", GLORO_CASES)
def test_gloro_matches_official_code(case):
    z = fixture(case)
    f = t64(z["logits"]).requires_grad_(True)
    W = t64(z["W"]).requires_grad_(True)
    y = torch.as_tensor(z["targets"])
    eps = float(z["epsilon"])
    lam_t = 1.2 if "trades" in case else 0.0
    method = GloRo({**GloRo.hparams, "eps": eps, "trades_lambda": lam_t}, num_classes=10)
    bound = PairwiseBound(t64(z["K_up_effective"]), W)
    y_bot = bottom_logit(f, bound, eps, 10)
    np.testing.assert_allclose(y_bot.detach().numpy(), z["logits_with_bottom"][:, -1], rtol=1e-12, atol=1e-12)
    assert torch.equal(f.detach().argmax(1), torch.as_tensor(z["pred_j"]))
    loss, _ = method.loss(f, y, bound, progress=1.0)
    np.testing.assert_allclose(loss.item(), z["loss"], rtol=1e-12)
    if "loss_per_sample" in z:
        per = F.nll_loss(gloro_log_probs(f, bound, eps, 10), y, reduction="none")
        np.testing.assert_allclose(per.detach().numpy(), z["loss_per_sample"], rtol=1e-12, atol=1e-12)
    loss.backward()
    np.testing.assert_allclose(f.grad.numpy(), z["grad_logits"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(W.grad.numpy(), z["grad_W"], rtol=1e-10, atol=1e-12)
    ours = certified(f.detach(), bound, eps, 10) & (f.detach().argmax(1) == y)
    assert torch.equal(ours, torch.as_tensor(z["robust_accuracy_certified"]))


def test_gloro_extremal_pair_grad_is_the_cll_ports_gradient():
    """`extremal_pair_grad` (the CLL repo's port, K_up·K̄_fc/stopgrad(K̄_fc)): the same y⊥, and with two classes
    exactly twice the gradient through ‖W_0 − W_1‖ (cll-official-code.md §8.7)."""
    g = torch.Generator().manual_seed(0)
    for n, expect_factor in ((2, 2.0), (10, None)):
        f = torch.randn(32, n, generator=g, dtype=torch.float64)
        W0 = torch.randn(n, 8, generator=g, dtype=torch.float64)
        grads, values = [], []
        for extra in (False, True):
            W = W0.clone().requires_grad_(True)
            y_bot = bottom_logit(f, PairwiseBound(torch.tensor(3.0, dtype=torch.float64), W), 0.25, n, extra)
            y_bot.sum().backward()
            grads.append(W.grad)
            values.append(y_bot.detach())
        assert torch.equal(values[0], values[1])
        if expect_factor is not None:
            torch.testing.assert_close(grads[1], expect_factor * grads[0], rtol=1e-13, atol=0)
        else:
            assert not torch.allclose(grads[1], grads[0])


def test_gloro_ties_are_never_certified():
    """The official rule masks every logit equal to the max and so certifies tied samples 0, 2, 4."""
    z = fixture("gloro_ties_eps0.1412")
    f, W, y = t64(z["logits"]), t64(z["W"]), torch.as_tensor(z["targets"])
    bound = PairwiseBound(t64(z["K_up_effective"]), W)
    official = torch.as_tensor(z["robust_accuracy_certified"])
    assert official[[0, 2, 4]].all()
    ours = certified(f, bound, float(z["epsilon"]), 10) & (f.argmax(1) == y)
    assert not ours[:5].any()
    assert ours[5] == official[5]
    # and the sound bottom logit stays finite where the official one is −∞
    assert torch.isfinite(bottom_logit(f, bound, float(z["epsilon"]), 10)).all()
    np.testing.assert_allclose(bottom_logit(f, bound, float(z["epsilon"]), 10)[5].item(),
                               z["logits_with_bottom"][5, -1], rtol=1e-12)


def test_gloro_bottom_logit_by_hand():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    bound = PairwiseBound(torch.tensor(2.0, dtype=torch.float64), W)
    f = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    # j = 0; K_01 = 2·√2, K_02 = 2·1; y⊥ = max(1 + 0.5·2√2, 2 + 0.5·2) = max(2.414…, 3.0) = 3.0
    assert bottom_logit(f, bound, 0.5, 3).item() == pytest.approx(3.0)
    assert bottom_logit(f, bound, 1.0, 3).item() == pytest.approx(max(1 + 2 * math.sqrt(2), 4.0))
    assert bottom_logit(f, bound, 2.0, 3).item() == pytest.approx(max(1 + 4 * math.sqrt(2), 6.0))
    # certified iff f_j > y⊥: 3 > 3.0 is false (a tie with the bound is not certified)
    assert not certified(f, bound, 0.5, 3).item()
    assert certified(f, bound, 0.49, 3).item()


def test_a_margin_exactly_equal_to_eps_K_is_not_certified():
    W = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # ‖W_0 − W_1‖ = 1
    bound = PairwiseBound(torch.tensor(4.0, dtype=torch.float64), W)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    eps = torch.tensor([0.25, 0.2499, 0.0])
    out = [certified(f[i:i + 1], bound, float(eps[i]), 2).item() for i in range(3)]
    assert out == [False, True, False]  # margin 1 = 0.25·4 exactly; just below; a tie at ε = 0
