"""Local-Lip-B (Huang, Zhang, Shi, Kolter, Anandkumar, "Training Certifiably Robust Neural Networks with Efficient
Local Lipschitz Bounds", NeurIPS 2021). Official code: yjhuangcd/local-lipschitz (`Local_bound.py`, `utils.py`),
reference/peer-methods.md §6. "B": certified with the BCP outer bound (Lee et al., NeurIPS 2020) at the last layer.

**Network.** Unconstrained conv/dense layers W_i (LipConv2d / LipLinear: their *global* guaranteed bounds keep
working) with the clipped ReLU of learnable per-entry thresholds θ (ReLU_θ here, official `ReLU_x`):

    ReLU_θ(z) = clamp(min(z, θ), 0),    θ ≥ 0 (projected after every optimizer step, `project_()`),

and a plain linear classifier z = W x + b. ReLU_θ is 1-Lipschitz and monotone, and *constant* on a unit whose
pre-activation stays ≤ 0 (dead: output 0) or > θ (saturated: output θ).

**Local bound (the paper's central idea).** For an input x and radius ε, interval bounds on every pre-activation
over the ball B(x, ε) classify each ReLU_θ unit as dead (ub ≤ 0), saturated (lb > θ) or varying. Let D_i be the
diagonal 0/1 indicator of the varying units after layer i (D_0 = I; the paper's indicator of varying outputs). For
x' in the ball, layer by layer a_i(x') − a_i(x) = Λ_i W_i (a_{i−1}(x') − a_{i−1}(x)) with Λ_i the diagonal
difference quotients of ReLU_θ: in [0, 1] (monotone, 1-Lipschitz) and 0 on the constant units, so Λ_i = D_i Λ_i
D_i and the difference is Λ_L (D_L W_L D_{L−1}) Λ_{L−1} ⋯ Λ_1 (D_1 W_1 D_0)(x' − x) (no differentiability needed):

    ‖h(x') − h(x)‖ ≤ K(x)·‖x' − x‖,   K(x) = ∏_i ‖D_i W_i D_{i−1}‖₂,   x' ∈ B(x, ε).         (local bound)

The penultimate features h(x') lie in the ball B(h(x), r), r = ε·K(x), and in the interval box [lo, hi].

**Interval bounds, exactly as the official `net_Local_Lip.forward`.** IBP (centre c, radius ρ: c' = W c + b,
ρ' = |W| ρ) intersected, unit by unit, with the box of a ball propagated by *global* norms and centred at the
clean activations m (not at the IBP centre): after affine layer i the unit o lies within m'_o ± r_{i−1}·‖W_{i,o}‖₂
(the row norm of the flattened weight / conv filter of output o), r_0 = ε, r_i = r_{i−1}·p_i with p_i the
global spectral norm of W_i (official: power iteration, stop at ‖u − u_prev‖ < 1e-4, from per-layer iterates
`u_list`; here the converged `power_bound()` or the official iteration from given vectors); after ReLU_θ the box
is intersected with ReLU_θ(m ± r_i). The box is stored as centre/radius after every intersection (ub + lb)/2,
(ub − lb)/2, and the masks read lb = c − ρ, ub = c + ρ back from it (`interval_bounds`).

**Local norms** (`local_layer_norms`, official `local_linear`): per sample, power iteration on u ↦ D_i W_i D_{i−1} u
(conv2d / conv_transpose2d with the output_padding that restores the input size), u, v normalised by
‖·‖ + 1e-12, σ = ⟨v, D_i W_i D_{i−1} u⟩, `n_iter` steps or until max_b ‖u_b − u_b,prev‖ < 1e-3 — a *batch-wide*
stop: every sample iterates until the slowest one converged, so a value depends (below the tolerance) on the
other samples of its batch, as in the official code. Norms of every layer but the classifier; r = ε·∏ σ_i.

**Worst-case logits (BCP, official `BCP_translation`).** For classes i, j with c = w_i − w_j, δ* maximises c·δ
over ‖δ‖ ≤ r, lo − m ≤ δ ≤ hi − m (the box shifted to the penultimate activations m and widened to contain 0):
start at δ = r·c/‖c‖; each round clips the coordinates outside the box and rescales the others so that ‖δ‖ stays
r; rounds continue while *any* coordinate of *any* pair of the batch is outside (again batch-wide) and at most
`opt_iter` rounds. Entry [b, i, j] = c·δ*; worst logit z_i + [b, i, y]. Reproduced arithmetic: the 1e-12 added
in every norm (‖c‖ via F.normalize, the clipped parts' norms with 1e-12 added to *every* coordinate, the radius
r + 1e-12 + 1e-12, `sqrt(· + 1e-12 + eye)`, the ratio's 1e-12): an extra round after convergence shrinks the free
coordinates by 1 − 1e-12/r, so values depend on the round count at ~1e-12·rounds; NaN entries are set to 0
(official `bcp_translation[bcp != bcp] = 0`) — which would *certify* a pair whose bound failed: the sound rule
maps NaN to +∞ instead. GloRo variant (`--gloro`): logits [z, max_{i≠y} worst_i] ([B, N + 1]).

**Loss** (official `robust_loss` and `train`): κ·CE(z, y) + (1 − κ)·CE(worst, y), κ: 1 → 0 (`robust_loss`); the
GloRo variant is CE([z, bottom], y) alone (`gloro_loss`); robust error = argmax(worst) ≠ y.

**Certificate rules** (`local_certificate`). Both compare worst-case logits w.r.t. the *predicted* class j and
certify iff z_j > worst_i for every i ≠ j (strict: ties never certify; the official rule is argmax(worst w.r.t.
y) = y, so certified ∧ correct is the same set up to ties).

* ``"published"`` (= ``"power"``): the official arithmetic above. Power-iterated from below, NOT guaranteed: the
  global norms p_i of the ball (power iteration), the local norms σ_i (2000 steps at test time, tol 1e-3), and
  BCP's NaN → 0. The masks, r and the worst logits inherit all three.
* ``"sound"``: every number the certificate rests on is a guaranteed bound on the real-arithmetic network with
  the stored (float64-upcast) weights. The argument, in four parts (u = 2⁻⁵³; all computation in float64):

  1. *Global ball.* p_i ← `layer.certified_bound()` (bench/nn/spectral.py, ≥ ‖W_i‖), row norms raised by
     2(n + 2)u, each product by 4u; so r_i ≥ the exact Lipschitz bound of the prefix times ε.
  2. *Boxes and masks.* The clean pass is propagated as a degenerate box (m, e): m the computed activations, e a
     rounding radius with the exact activation in [m ± e] (e_0 = 0 unless the input is normalised). An affine
     step sets ρ' = |W|ρ + γ·(|W|(|c| + ρ) + |b|), γ = 4(n + 8)u, n the fan-in: this covers the rounding of the
     centre W c + b (≤ γ_{n+1}(|W||c| + |b|)), of |W|ρ (≤ γ_n|W|ρ) and of ρ' itself, γ_k = 2(k + 4)u being the
     dot-product constant of bench/nn/spectral.py. The ball box is m' ± (r·‖W_o‖ + e'), and ReLU_θ's ball box
     ReLU_θ(m ± (r + e)) (exact activations of x lie in m ± e). After each intersection ρ += 8u·T, T = the sum of
     the magnitudes involved (|c'| + ρ' + |m'| + β, resp. |c| + ρ + |m| + r + e): every later rounding — the
     ± of the box ends, the intersection's mid/half-width, and lb = c − ρ read back for the masks — is ≤ u·T
     each, so [c ± ρ] contains the exact reachable set as real numbers and the masks are sound (a unit declared
     dead or saturated is constant on the whole ball). ReLU_θ is exact in floating point (min/max).
  3. *Local norms* (`local_norm_bounds`): each σ_i is replaced by the least of three guaranteed bounds on
     ‖D_i W_i D_{i−1}‖ (|D| ≤ 1 entrywise, so the masks only select rows and columns): (a) the layer's global
     `certified_bound()` ≥ ‖W_i‖ ≥ ‖D W D‖; (b) the Schur/Hölder bound ‖A‖² ≤ ‖A‖₁‖A‖_∞ of the masked operator
     (max column and row sums of |A|, by conv2d / conv_transpose2d of the masks with |W|; sums of n
     non-negative terms raised by 2(n + 8)u); (c) where the layer's matrix is small enough (`explicit_limit`:
     the dense layers of 6C2F/4C3F/8C2F on a GPU, every layer of a tiny net), Gram iteration on the explicit
     masked matrix D_i W_i D_{i−1} (bench/nn/spectral.py `gram_norm_bound`, with its rounding allowance; the
     matrix is exact: a conv entry is one kernel tap or 0, and masking multiplies by 0/±1). (c) converges to the
     masked norm itself; for large conv layers only (a) and (b) remain, and (b) beats (a) only where most units
     are constant, so the sound K is then the global conv bounds times the masked dense norms. The product is
     raised by 4u per factor; r = ε·∏ σ̄_i, and the penultimate ball has radius R = r + ‖e‖ around m.
  4. *Worst-case logits* (`bcp_upper_bound`). Weak duality: for δ in the box [l, h] with ‖δ‖ ≤ R and any μ > 0,
     c·δ ≤ c·δ + μ(R² − ‖δ‖²)/2 ≤ g(μ) = μR²/2 + Σ_k max_{d∈[l_k, h_k]} (c_k d − μd²/2), the inner maximum at
     d = clip(c_k/μ, l_k, h_k). g(μ) is an upper bound for EVERY μ, so no stopping rule matters; μ = 1/λ from
     the clipping iteration (the official one without its 1e-12 terms, which reaches the KKT multiplier, where g
     equals the maximum). U = min(g(μ), box bound Σ max(c_k l_k, c_k h_k), R‖c‖), each plus 8(h + 8)u times
     the sum of the magnitudes of its terms (this covers the rounding of c = w_i − w_j, of every product and
     sum, and the ≤ 2u²μm² lost by evaluating at the rounded clip point). The box edges are widened by
     4u(|c| + ρ + |m|) for the rounding of lo − m. Then f_i(x') − f_j(x') ≤ z_i − z_j + ez_i + ez_j + U_ij, where
     ez = 4(h + 8)u·(|W||m| + |b|) bounds the rounding of z = W m + b; NaN ↦ +∞.

  What stays outside the proof: nothing is power-iterated; the guarantee is for the network evaluated in real
  arithmetic with the stored weights (as every certificate of lipbench), and ties never certify.

**Architectures** (peer-methods.md §6, reference paper Table B2): 6C2F and 4C3F (padding 1; stride-2 convs k4 p1),
8C2F with *unpadded* stride-2 convs (64 → 31 → 14 → 6). Conv weights N(0, 2/(k²·c_out)), zero bias (official
init); dense layers keep PyTorch's default init, as the official code does. θ init: 2.0 for 6C2F (official
`c6f2_relux(init=args.init)`, run with --init 2.0); 1.0 for 4C3F (official `cifar_model_large_relux()` passes no
init, so `ReLU_x`'s default 1.0 applies whatever --init says) and for 8C2F (run with --init 1.0).
Parameters: 6C2F 2,250,378 + 111,104 θ; 4C3F 2,466,858 + 62,464 θ; 8C2F 4,342,984 + 916,544 θ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.nn.archs import register_spec_arch, spec_features
from bench.nn.bound import LipschitzNet, PairwiseBound, pairwise_distances
from bench.nn.lipschitz import LipConv2d, LipLinear
from bench.nn.spectral import UNIT_ROUNDOFF as U, gram_norm_bound

#: the official constants: the 1e-12 of every normalisation, the local (masked) and global power-iteration tolerances
EPS, LOCAL_TOL, GLOBAL_TOL = 1e-12, 1e-3, 1e-4
#: iterations between host reads of a loop's stop flag (the loops freeze once the flag is set, so the official
#: stopping iteration is reproduced exactly; this only bounds the wasted steps)
CHECK_EVERY = 16
#: seed of the published rule's random start at certification (the official code draws from the global RNG)
CERT_SEED = 0
_UP = 1.0 + 4.0 * U          # one rounded product or sum, raised
_TINY = 1e-290               # absolute allowance for underflow


class ReLUTheta(nn.Module):
    """ReLU_θ(z) = clamp(min(z, θ), 0) with a learnable threshold per activation entry (official `ReLU_x`).
    θ has shape [1, *shape] (`shape`: one sample's activation), as the official parameter."""

    lipschitz_one = True

    def __init__(self, shape: Sequence[int], init: float = 2.0):
        super().__init__()
        self.theta = nn.Parameter(torch.full((1, *shape), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.minimum(x, self.theta), min=0.0)

    @torch.no_grad()
    def project_(self) -> None:
        """θ ← max(θ, 0), after every optimizer step (official `train`)."""
        self.theta.clamp_(min=0.0)


def _relu_theta(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.minimum(x, theta), min=0.0)


class LocalLipNet(LipschitzNet):
    """classifier ∘ [affine → ReLU_θ]* ∘ normalize. Its global bounds (`converge`, `certified_bound`) are those of
    any LipschitzNet; `local_certificate(x, eps, rule)` is the input-aware certificate of bench/certify.py."""

    input_aware = True
    #: power-iteration steps and BCP rounds of the published rule (official final evaluation: 2000 / 1000)
    cert_n_iter = 2000
    cert_opt_iter = 1000
    #: bytes the per-image warm starts may use (`warm_start_gb`), and the training set's size; 0 / None: every
    #: image starts from its layer's global iterate
    warm_start_bytes = 0
    train_size: Optional[int] = None
    warm_starts: Optional["WarmStartStore"] = None

    def __init__(self, features: nn.Sequential, classifier: nn.Linear, input_shape, num_classes, normalize=None):
        super().__init__(features, classifier, input_shape, num_classes, normalize=normalize)
        self.hidden: List[Tuple[nn.Module, ReLUTheta]] = _hidden_pairs(features)

    def configure(self, cfg, data=None) -> None:
        """The published rule's iteration counts from the run's config (methods/local_lip.py `cert_sniter`,
        `cert_opt_iter`; a short run's `cert_sniter_short`) and the warm-start store's budget (`warm_start_gb`,
        sized for `data`'s training set); the engine calls this when it builds the network (train, audit,
        load_run alike; the store itself is allocated by the first training step that passes image indices)."""
        from bench.config import is_short_run
        self.cert_n_iter = int(cfg.get("cert_sniter", self.cert_n_iter))
        if is_short_run(cfg) and cfg.get("cert_sniter_short"):
            self.cert_n_iter = min(self.cert_n_iter, int(cfg["cert_sniter_short"]))
        self.cert_opt_iter = int(cfg.get("cert_opt_iter", self.cert_opt_iter))
        self.warm_start_bytes = int(float(cfg.get("warm_start_gb") or 0.0) * 1e9)
        self.train_size = None if data is None else len(data.y_train)
        self.warm_starts = None

    def project_(self) -> None:
        """θ ← max(θ, 0) in every ReLU_θ (after each optimizer step)."""
        for _, act in self.hidden:
            act.project_()

    def bound(self, x: Optional[torch.Tensor] = None, eps: Optional[float] = None, n_iter: int = 5,
              index: Optional[torch.Tensor] = None):
        """Without (x, eps): the global PairwiseBound. With both: the training-time local bound of the batch
        (`LocalBound`, differentiable, power-iterated as published): the ball's global norms from each layer's
        `train_bound(n_iter)`, the local norms from `n_iter` masked power-iteration steps. Each image's iteration
        starts where its own last one ended (`WarmStartStore`, for the layers its budget holds, found by `index`,
        the batch's rows in the training set) or else at its layer's global iterate."""
        if x is None or eps is None:
            return super().bound(n_iter=n_iter)
        ib = interval_bounds(self, x, eps, [layer.train_bound(n_iter) for layer, _ in self.hidden])
        init = [layer.power_iterate.detach().reshape(1, *layer.operator_input_shape)
                .expand(x.shape[0], *layer.operator_input_shape) for layer, _ in self.hidden]
        store = self._warm_start_store(index)
        if store is not None:
            init = store.starts(index, init)
        norms, vecs = local_layer_norms(self, ib.masks, n_iter, init)
        if store is not None:
            store.save(index, vecs)
        factor = 1.0 if self.norm_mean is None else self.input_factor
        return LocalBound(norms.prod(1) * factor, self.classifier.weight, ib.logits, ib.mu,
                          penultimate_radius(eps * factor, norms), ib.centre, ib.radius)

    def _warm_start_store(self, index: Optional[torch.Tensor]) -> Optional["WarmStartStore"]:
        if index is None or not self.warm_start_bytes or not self.train_size:
            return None
        if self.warm_starts is None or self.warm_starts.device != index.device:
            self.warm_starts = WarmStartStore([layer.operator_input_shape for layer, _ in self.hidden],
                                              self.train_size, self.warm_start_bytes, index.device)
        return self.warm_starts

    def local_certificate(self, x: torch.Tensor, eps: float, rule: str = "sound"):
        """(certified [B], K̄ [B], predicted class [B]) for bench/certify.py: K̄ = K(x)·max_ij ‖W_i − W_j‖
        (float64)."""
        cert = local_certificate(self, x, eps, rule, n_iter=self.cert_n_iter, opt_iter=self.cert_opt_iter)
        spread = pairwise_distances(self.classifier.weight.detach().double()).max().to(cert.K.device)
        return cert.certified, cert.K * spread, cert.predicted


@dataclass
class LocalBound(PairwiseBound):
    """The training-time bound of a batch: K_up = K(x) [B] (local, times the input factor), W the classifier rows,
    and what the worst-case logits need (logits z, penultimate m, its ball radius r and box)."""

    logits: Optional[torch.Tensor] = None
    mu: Optional[torch.Tensor] = None
    r: Optional[torch.Tensor] = None
    centre: Optional[torch.Tensor] = None
    radius: Optional[torch.Tensor] = None

    def worst_logits(self, y: torch.Tensor, opt_iter: int = 1) -> torch.Tensor:
        """BCP worst-case logits w.r.t. y (official `robust_loss` with `opt_iter` rounds; 1 in training)."""
        T = bcp_translation(self.W, self.mu, self.r, self.centre, self.radius, opt_iter, target=y)
        return worst_case_logits(self.logits, T, y)


def _hidden_pairs(features: nn.Sequential) -> List[Tuple[nn.Module, ReLUTheta]]:
    """[(affine, ReLU_θ)] in order; Flatten is allowed before a dense layer; anything else is refused."""
    pairs, pending = [], None
    for m in features:
        if isinstance(m, (LipConv2d, LipLinear)) and pending is None:
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or tuple(m.dilation) != (1, 1)):
                raise ValueError("Local-Lip-B supports plain convolutions (groups 1, dilation 1)")
            pending = m
        elif isinstance(m, ReLUTheta) and pending is not None:
            pairs.append((pending, m))
            pending = None
        elif not (isinstance(m, nn.Flatten) and pending is None):
            raise TypeError(f"Local-Lip-B features must alternate affine layers and ReLU_θ, got {type(m).__name__}")
    if pending is not None or not pairs:
        raise TypeError("every affine layer of the features must be followed by a ReLU_θ")
    return pairs


def _official_conv_init(conv: nn.Conv2d) -> None:
    k, out = conv.kernel_size[0], conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * k * out)))   # official: n = k²·c_out
    nn.init.zeros_(conv.bias)


def local_lip_modules(input_shape: Sequence[int], num_classes: int, layers: Sequence[tuple], init: float):
    """(features, classifier) for a Table B2 spec, ReLU_θ after every layer; dense layers keep PyTorch's default
    init (official)."""
    if len(input_shape) != 3:
        raise ValueError(f"Local-Lip-B networks take images (C, H, W), got {tuple(input_shape)}")
    mods, flat = spec_features(layers, input_shape, lambda shape: ReLUTheta(shape, init), _official_conv_init)
    return nn.Sequential(*mods), nn.Linear(flat, num_classes)


def build_local_lip(input_shape, num_classes, normalize=None, layers=(), init: float = 2.0) -> LocalLipNet:
    features, classifier = local_lip_modules(input_shape, num_classes, layers, init)
    return LocalLipNet(features, classifier, input_shape, num_classes, normalize=normalize)


LOCAL_LIP_ARCHS = {  # name: (Table B2 spec, default dataset, θ init)
    "6c2f-relux": ([("c", 32, 3, 1, 1), ("c", 32, 3, 1, 1), ("c", 32, 4, 2, 1), ("c", 64, 3, 1, 1),
                    ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 1), ("d", 512)], "cifar10", 2.0),
    "4c3f-relux": ([("c", 32, 3, 1, 1), ("c", 32, 4, 2, 1), ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 1),
                    ("d", 512), ("d", 512)], "cifar10", 1.0),
    "8c2f-relux": ([("c", 64, 3, 1, 1), ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 0), ("c", 128, 3, 1, 1),
                    ("c", 128, 3, 1, 1), ("c", 128, 4, 2, 0), ("c", 256, 3, 1, 1), ("c", 256, 4, 2, 0),
                    ("d", 256)], "tinyimagenet", 1.0),
}
for _name, (_layers, _data, _init) in LOCAL_LIP_ARCHS.items():
    register_spec_arch(_name, build_local_lip, f"Local-Lip-B {_name[:4].upper()} with ReLU_θ (θ init {_init}), "
                       "Table B2", family="local_lip", data="image", default_dataset=_data, layers=_layers,
                       init=_init)


# -- operators -----------------------------------------------------------------------------------------------------

def _affine(layer: nn.Module, v: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(v, w, b, layer.stride, layer.padding)
    return F.linear(v, w, b)


def _adjoint(layer: nn.Module, u: torch.Tensor, w: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """Wᵀ u on the layer's input space (conv: the output_padding that restores the input size; the official code
    tries 0, then 1, which is the same for these stride-2 layers)."""
    if not isinstance(layer, nn.Conv2d):
        return F.linear(u, w.t())
    pad = tuple(n - ((o - 1) * s - 2 * p + k) for n, o, k, s, p in
                zip(in_shape[-2:], u.shape[-2:], layer.kernel_size, layer.stride, layer.padding))
    return F.conv_transpose2d(u, w, stride=layer.stride, padding=layer.padding, output_padding=pad)


def _bias(layer: nn.Module, dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if layer.bias is None else layer.bias.to(dtype)


def _sample_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t_b‖ broadcastable against t (official: view(B, −1).norm(dim=1).view(B, 1, 1, 1) / norm(dim=1, keepdim))."""
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (t.dim() - 1))


def _fan_in(layer: nn.Module) -> int:
    return int(layer.weight[0].numel())


def _model_input(net: LipschitzNet, x: torch.Tensor, sound: bool):
    """(m0, e0, box radius scale, ball factor): the features' input, its rounding radius (sound only), the per-
    coordinate factor 1/std of the ε-box and the ball's 1/min(std)."""
    if net.norm_mean is None:
        return x, torch.zeros_like(x) if sound else None, 1.0, 1.0
    mean, std = net.norm_mean.to(x.dtype), net.norm_std.to(x.dtype)
    m0 = (x - mean) / std
    e0 = 4.0 * U * m0.abs() + _TINY if sound else None        # two roundings of (x − mean)/std
    scale = (1.0 / std) * (_UP if sound else 1.0)
    return m0, e0, scale, net.input_factor * (_UP if sound else 1.0)


# -- global norms (the ball of the interval bounds) -----------------------------------------------------------------

def official_global_norms(net: LocalLipNet, n_iter: int, init_vectors: Sequence[torch.Tensor],
                          tol: float = GLOBAL_TOL) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The official per-layer power iteration (`power_iteration_conv_evl` / `power_iteration_evl`) from given
    iterates (conv: [1, C, H, W] input side, u/(‖u‖ + 1e-12); dense: [out, 1] output side, no 1e-12), stopping at
    ‖u − u_prev‖ < tol. Returns (σ per hidden layer, final iterates). From below: not a certificate."""
    norms, vecs = [], []
    for (layer, _), u in zip(net.hidden, init_vectors):
        w = layer.weight
        u = u.to(w)
        done, v = torch.zeros((), dtype=torch.bool, device=w.device), None
        conv = isinstance(layer, nn.Conv2d)
        zero = torch.zeros_like(layer.bias) if layer.bias is not None else None
        for it in range(n_iter):
            u_prev = u
            if conv:
                u1 = F.conv2d(u, w, zero, layer.stride, layer.padding)
                v_new = u1 / (u1.norm(2) + EPS)
                v1 = _adjoint(layer, v_new, w, u.shape)
                u_new = v1 / (v1.norm(2) + EPS)
            else:
                u1 = w.t().mm(u)
                v_new = u1 / u1.norm(2)
                v1 = w.mm(v_new)
                u_new = v1 / v1.norm(2)
            u, v = (u_new, v_new) if v is None else (torch.where(done, u, u_new), torch.where(done, v, v_new))
            done = done | ((u - u_prev).norm(2) < tol)
            if (it + 1) % CHECK_EVERY == 0 and bool(done):
                break
        if conv:
            sigma = (v * F.conv2d(u, w, zero, layer.stride, layer.padding)).reshape(v.shape[0], -1).sum(1)[0]
        else:
            sigma = u.t().mm(w).mm(v)[0][0]
        norms.append(sigma)
        vecs.append(u)
    return norms, vecs


# -- interval bounds ------------------------------------------------------------------------------------------------

@dataclass
class IntervalBounds:
    """Output of `interval_bounds`. masks[k]: 1 where the ReLU_θ unit after hidden layer k varies (official
    1 − [lb > θ] − [ub ≤ 0]), shaped like that layer's output [B, ...]. mu: penultimate clean activations [B, h];
    centre/radius: the penultimate box; logits: z = W mu + b; radii: the global ball radius after each hidden
    layer [B]. Sound rule only: err (rounding radius of mu), logit_err (of z)."""

    masks: List[torch.Tensor]
    mu: torch.Tensor
    centre: torch.Tensor
    radius: torch.Tensor
    logits: torch.Tensor
    radii: List[torch.Tensor]
    err: Optional[torch.Tensor] = None
    logit_err: Optional[torch.Tensor] = None


def _intersect(lo1, hi1, lo2, hi2, slack: Optional[torch.Tensor]):
    hi, lo = torch.minimum(hi1, hi2), torch.maximum(lo1, lo2)
    c, rho = (hi + lo) / 2, (hi - lo) / 2
    return c, (rho if slack is None else rho + 8.0 * U * slack + _TINY)


def interval_bounds(net: LocalLipNet, x: torch.Tensor, eps: float, global_norms=None,
                    sound: bool = False) -> IntervalBounds:
    """IBP ∩ global ball (module docstring), in the official arithmetic, or (`sound`) in float64 with guaranteed
    norms and rounding allowances. `global_norms`: one σ per hidden layer (default: `power_bound()`, or
    `certified_bound()` when sound; both need `net.converge()`)."""
    pairs = net.hidden
    if global_norms is None:
        global_norms = [(layer.certified_bound() if sound else layer.power_bound()) for layer, _ in pairs]
    dtype = torch.float64 if sound else net.classifier.weight.dtype
    x = x.to(dtype)
    m, e, scale, factor = _model_input(net, x, sound)
    B = x.shape[0]
    c, rho = m, eps * scale * torch.ones(x.shape, dtype=dtype, device=x.device)   # official: eps·ones
    r = (eps * factor) * torch.ones(B, dtype=dtype, device=x.device)
    masks, radii = [], []
    for (layer, act), p in zip(pairs, global_norms):
        if isinstance(layer, nn.Linear) and c.dim() > 2:                          # Flatten
            c, rho, m = c.flatten(1), rho.flatten(1), m.flatten(1)
            e = None if e is None else e.flatten(1)
        w, b = layer.weight.to(dtype), _bias(layer, dtype)
        view = (B, 1) + (1,) * (c.dim() - 2)
        c1, rho1, m1 = _affine(layer, c, w, b), _affine(layer, rho, w.abs()), _affine(layer, m, w, b)
        rows = w.flatten(1).norm(2, dim=-1).reshape(1, -1, *[1] * (c.dim() - 2))
        beta = r.view(view) * rows                                                # official: (r·1)·‖W_o‖
        slack = None
        if sound:
            gamma = 4.0 * (_fan_in(layer) + 8) * U
            b_abs = None if b is None else b.abs()
            rho1 = rho1 + gamma * _affine(layer, c.abs() + rho, w.abs(), b_abs)
            e = _affine(layer, e, w.abs()) + gamma * _affine(layer, m.abs() + e, w.abs(), b_abs)
            beta = (r.view(view) * (rows * (1.0 + 2.0 * (_fan_in(layer) + 2) * U)) + e) * _UP
            slack = c1.abs() + rho1 + m1.abs() + beta
        c, rho = _intersect(c1 - rho1, c1 + rho1, m1 - beta, m1 + beta, slack)
        m = m1
        theta = act.theta.to(dtype)
        masks.append(1.0 - ((c - rho > theta).to(dtype) + (c + rho <= 0).to(dtype)))
        r = r * p if not sound else r * float(p) * _UP
        radii.append(r)
        # ReLU_θ: the box through the monotone activation, intersected with ReLU_θ(m ± r)
        rb = r.view(view) if not sound else (r.view(view) + e) * _UP
        slack = None if not sound else c.abs() + rho + m.abs() + rb
        c, rho = _intersect(_relu_theta(c - rho, theta), _relu_theta(c + rho, theta),
                            _relu_theta(m - rb, theta), _relu_theta(m + rb, theta), slack)
        m = _relu_theta(m, theta)                                                 # e: ReLU_θ is 1-Lipschitz
    if c.dim() > 2:
        c, rho, m = c.flatten(1), rho.flatten(1), m.flatten(1)
        e = None if e is None else e.flatten(1)
    W, bias = net.classifier.weight.to(dtype), _bias(net.classifier, dtype)
    z = F.linear(m, W, bias)
    ez = None
    if sound:
        ez = 4.0 * (m.shape[1] + 8) * U * F.linear(m.abs(), W.abs(), None if bias is None else bias.abs()) + _TINY
    return IntervalBounds(masks, m, c, rho, z, radii, e, ez)


# -- local norms ----------------------------------------------------------------------------------------------------

def _input_mask(masks: Sequence[torch.Tensor], k: int, shape: Sequence[int]) -> Optional[torch.Tensor]:
    return None if k == 0 else masks[k - 1].reshape(masks[k - 1].shape[0], *shape)


def local_layer_norms(net: LocalLipNet, masks: Sequence[torch.Tensor], n_iter: int,
                      init_vectors: Optional[Sequence[torch.Tensor]] = None,
                      tol: float = LOCAL_TOL, generator: Optional[torch.Generator] = None
                      ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per-sample power iteration on D_k W_k D_{k−1} (official `local_linear`): (σ [B, L], final iterates u per
    layer, [B, *input shape], for warm starts). From below: not a certificate. Differentiable in the weights.
    Without `init_vectors` the start is Gaussian, drawn from `generator` (the global RNG when None)."""
    if n_iter < 1:
        raise ValueError("the official local power iteration needs at least one step")
    norms, vecs = [], []
    for k, (layer, _) in enumerate(net.hidden):
        w, shape = layer.weight, layer.operator_input_shape
        d_out = masks[k].to(w.dtype)
        d_in = _input_mask(masks, k, shape)
        d_in = None if d_in is None else d_in.to(w.dtype)
        B = d_out.shape[0]
        u = (init_vectors[k].to(w) if init_vectors is not None
             else torch.randn(B, *shape, dtype=w.dtype, device=w.device, generator=generator))
        v, done = None, torch.zeros((), dtype=torch.bool, device=w.device)
        for it in range(n_iter):
            u_prev = u
            uu = u if d_in is None else u * d_in
            out = _affine(layer, uu, w) * d_out
            v_new = out / (_sample_norm(out) + EPS)
            back = _adjoint(layer, v_new, w, shape)
            back = back if d_in is None else back * d_in
            u_new = back / (_sample_norm(back) + EPS)
            u, v = (u_new, v_new) if v is None else (torch.where(done, u, u_new), torch.where(done, v, v_new))
            done = done | ((u - u_prev).reshape(B, -1).norm(dim=1).max() < tol)   # batch-wide stop (official)
            if (it + 1) % CHECK_EVERY == 0 and bool(done):
                break
        uu = u if d_in is None else u * d_in
        norms.append((v * (_affine(layer, uu, w) * d_out)).reshape(B, -1).sum(1))
        vecs.append(u)
    return torch.stack(norms, 1), vecs


class WarmStartStore:
    """Per-image warm starts of the training-time masked power iteration, 4 bits per value.

    The official trainer keeps every training image's last iterate of every layer (`u_train`, float32: 23 GB of
    pinned host memory for CIFAR-10 6C2F) and restarts each image's iteration from it the next epoch. A start only
    has to lie close to the top singular vector: the iteration normalises it (its scale is irrelevant) and damps
    each error component by (σ_k/σ_1)² per step. So each stored iterate is kept as signed integers
    q = round(7·u/max|u|) in [−7, 7], two to a byte, 1/8 of float32.

    Layers are taken in network order, each if its codes for the whole training set still fit the budget. Earliest
    first because there a shared start loses most. CIFAR-10 6C2F under 2 GB stores its first four layers
    (1.92 GB). Measured on the 6C2F smoke model (benchmarks/local_lip_warm_start.py, 16 test points, 2 steps
    against 400): the global iterate reaches 0.92/0.88/0.95 of the masked norms of the three 32×32 layers and
    ≥ 0.9996 of the others, K(x) 0.77 on average; the converged per-image vector through this store ≥ 0.9987 of
    every layer, K(x) 0.997 (min 0.995), where the official float32 vector gives 1. A layer not stored, an image
    not yet seen, and an iterate that was zero start at the layer's global iterate.

    The store lives on the training device outside the state dict: it is not checkpointed (a resumed run starts
    afresh, as the official store, which is only in memory), and a deepcopy of the network gets none."""

    LEVELS = 7

    def __init__(self, shapes: Sequence[Sequence[int]], n_images: int, budget: int, device,
                 layers: Optional[Sequence[int]] = None):
        self.device = torch.device(device)
        self.shapes = [tuple(int(d) for d in shape) for shape in shapes]
        layers, self.nbytes = self.plan(self.shapes, n_images, budget) if layers is None else \
            (layers, n_images * (1 + sum(self._row(self.shapes[k]) for k in layers)))
        self.seen = torch.zeros(n_images, dtype=torch.bool, device=self.device)
        self.codes = {k: torch.zeros(n_images, self._row(self.shapes[k]), dtype=torch.uint8, device=self.device)
                      for k in layers}

    @staticmethod
    def _row(shape: Sequence[int]) -> int:
        return (math.prod(shape) + 1) // 2

    @classmethod
    def plan(cls, shapes: Sequence[Sequence[int]], n_images: int, budget: int) -> Tuple[List[int], int]:
        """(the layers stored, bytes in all) for `n_images` images: in network order, each that still fits."""
        layers, nbytes = [], n_images                      # one "seen" flag per image
        for k, shape in enumerate(shapes):
            if nbytes + n_images * cls._row(shape) <= budget:
                layers.append(k)
                nbytes += n_images * cls._row(shape)
        return layers, nbytes

    def __deepcopy__(self, memo):
        return None

    @classmethod
    def encode(cls, u: torch.Tensor) -> torch.Tensor:
        """[B, ...] → [B, ⌈n/2⌉] uint8: q + 8 in the low then the high nibble."""
        f = torch.nan_to_num(u.detach().reshape(u.shape[0], -1).float(), nan=0.0, posinf=0.0, neginf=0.0)
        scale = f.abs().amax(1, keepdim=True).clamp_min(1e-30)
        q = torch.round(f * (cls.LEVELS / scale)).to(torch.int16) + 8
        if q.shape[1] % 2:
            q = F.pad(q, (0, 1), value=8)
        q = q.reshape(q.shape[0], -1, 2)
        return (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)

    @staticmethod
    def decode(codes: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, ⌈n/2⌉] uint8 → [B, n] in `dtype` (integers in [−7, 7])."""
        lo, hi = (codes & 15).to(dtype) - 8, (codes >> 4).to(dtype) - 8
        return torch.stack([lo, hi], dim=-1).reshape(codes.shape[0], -1)[:, :n]

    def starts(self, index: torch.Tensor, shared: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Each layer's start for the training images `index`: the stored iterate, else `shared[k]`."""
        out, seen, B = list(shared), self.seen[index], index.shape[0]
        for k, codes in self.codes.items():
            shape = self.shapes[k]
            u = self.decode(codes[index], math.prod(shape), shared[k].dtype)
            ok = seen & (u.abs().amax(1) > 0)
            out[k] = torch.where(ok.reshape(B, *[1] * len(shape)), u.reshape(B, *shape), shared[k])
        return out

    def save(self, index: torch.Tensor, vectors: Sequence[torch.Tensor]) -> None:
        """Keep the final iterates of the images `index` (rows of a permutation: no repeats)."""
        for k, codes in self.codes.items():
            codes[index] = self.encode(vectors[k])
        self.seen[index] = True


def _explicit_matrix(layer: nn.Module, w: torch.Tensor, shape: Sequence[int], limit: int) -> Optional[torch.Tensor]:
    """The layer's linear operator as a float64 matrix [out, in], or None above `limit` entries. Exact: a conv
    entry is one kernel tap or 0 (unfold of the basis is a 0/1 selection with at most one 1 per tap and output
    position, so each sum has at most one non-zero term)."""
    if not isinstance(layer, nn.Conv2d):
        return w if w.numel() <= limit else None
    n = math.prod(shape)
    out_hw = [(size + 2 * p - k) // s + 1 for size, k, s, p in
              zip(shape[-2:], layer.kernel_size, layer.stride, layer.padding)]
    if w.shape[0] * math.prod(out_hw) * n > limit:
        return None
    basis = torch.eye(n, dtype=w.dtype, device=w.device).reshape(n, *shape)
    cols = F.unfold(basis, layer.kernel_size, padding=layer.padding, stride=layer.stride)   # [n, C·k², L]
    return torch.einsum("ok,nkl->oln", w.flatten(1), cols).reshape(-1, n)


def local_norm_bounds(net: LocalLipNet, masks: Sequence[torch.Tensor], explicit_limit: Optional[int] = None,
                      chunk: int = 1 << 24) -> torch.Tensor:
    """Guaranteed upper bounds on ‖D_k W_k D_{k−1}‖ per sample, float64 [B, L] (module docstring, part 3): the
    least of the layer's global `certified_bound()` (needs `net.converge()`), the Schur bound of the masked
    operator and, where the layer's matrix has at most `explicit_limit` entries (default 2²² on CUDA, 2¹⁶ on CPU:
    a 512 × 4096 layer costs ~10 GFlop per sample), Gram iteration on the explicit masked matrix, in chunks of at
    most `chunk` entries."""
    out = []
    for k, (layer, _) in enumerate(net.hidden):
        w = layer.weight.detach().double()
        shape = layer.operator_input_shape
        d_out = masks[k].detach().double().abs()
        d_in = _input_mask(masks, k, shape)
        B = d_out.shape[0]
        d_in = (torch.ones(1, *shape, dtype=torch.float64, device=w.device) if d_in is None
                else d_in.detach().double().abs())
        rows = (_affine(layer, d_in, w.abs()) * d_out).reshape(B, -1).amax(1)        # ‖A‖_∞ (row sums)
        cols = (_adjoint(layer, d_out, w.abs(), shape) * d_in).reshape(B, -1).amax(1)  # ‖A‖_1 (column sums)
        n = max(_fan_in(layer), int(w.shape[0] * math.prod(w.shape[2:])))
        bound = torch.sqrt(rows * cols) * (1.0 + 2.0 * (n + 8) * U)
        bound = torch.minimum(bound, float(layer.certified_bound()) * torch.ones_like(bound))
        limit = explicit_limit if explicit_limit is not None else (1 << 22 if w.is_cuda else 1 << 16)
        M = _explicit_matrix(layer, w, shape, limit)
        if M is not None:
            step = max(1, chunk // M.numel())
            grams = []
            for i in range(0, B, step):
                A = d_out[i:i + step].reshape(-1, M.shape[0], 1) * M * d_in[i:i + step].reshape(-1, 1, M.shape[1])
                grams.append(gram_norm_bound(A))
            bound = torch.minimum(bound, torch.cat(grams).to(bound.device))
        out.append(bound)
    return torch.stack(out, 1)


def penultimate_radius(eps: float, norms: torch.Tensor) -> torch.Tensor:
    """r = ε·∏_k σ_k [B], multiplied in the official order ((σ_1·σ_2)·…)·ε."""
    r = norms[:, 0]
    for k in range(1, norms.shape[1]):
        r = r * norms[:, k]
    return r * eps


# -- BCP worst-case logits ------------------------------------------------------------------------------------------

def _pairs(W: torch.Tensor, B: int, target: Optional[torch.Tensor]):
    """(c = w_i − w_j, off-diagonal 0/1, lead shape): all pairs [1, N, N, h] or the pairs (i, target_b) [B, N, h]."""
    N = W.shape[0]
    if target is None:
        diff = (W[:, None, :] - W[None, :, :])[None]
        off = (1.0 - torch.eye(N, dtype=W.dtype, device=W.device))[None, :, :, None]
        return diff, off, (B, 1, 1)
    diff = W[None, :, :] - W[target][:, None, :]
    off = (torch.arange(N, device=W.device)[None, :] != target[:, None]).to(W.dtype)[..., None]
    return diff, off, (B, 1)


def bcp_translation(W: torch.Tensor, mu: torch.Tensor, r: torch.Tensor, centre: torch.Tensor,
                    radius: torch.Tensor, opt_iter: int, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The official `BCP_translation` (NaN → 0 included): [B, N, N] with entry [b, i, j] = (w_i − w_j)·δ*, or,
    with `target` [B], the column j = target_b only, [B, N] (its batch-wide stop then sees only those pairs)."""
    B, h = mu.shape
    diff, off, lead = _pairs(W, B, target)
    eye = 1.0 - off
    r_rep = r.reshape(*lead, 1)
    step = r_rep * F.normalize(diff, p=2, dim=-1)
    norm = off * (r_rep + EPS) + EPS
    box = (*lead[:-1], 1, h) if target is None else (B, 1, h)
    # the official `if ub.min() < 0 or lb.max() > 0: ub[ub < 0] = 0; lb[lb > 0] = 0` is this clamp
    ub = ((centre + radius) - mu).clamp(min=0).reshape(box)
    lb = ((centre - radius) - mu).clamp(max=0).reshape(box)
    done, inner = torch.zeros((), dtype=torch.bool, device=mu.device), None
    for it in range(max(1, opt_iter)):
        if it:
            done = done | ~((off * step < lb) | (off * step > ub)).any()
        lo_hit, hi_hit = (step <= lb).to(mu.dtype), (step >= ub).to(mu.dtype)
        before = off * step * lo_hit + off * step * hi_hit
        after = off * lb * lo_hit + off * ub * hi_hit
        original = (off * (before + EPS)).norm(2, dim=-1, keepdim=True)
        clipped = (off * (after + EPS)).norm(2, dim=-1, keepdim=True)
        r_before = (torch.clamp(norm.abs() ** 2 - original.abs() ** 2, min=0) + EPS + eye).sqrt()
        r_after = (torch.clamp(norm.abs() ** 2 - clipped.abs() ** 2, min=0) + EPS + eye).sqrt()
        ratio = r_after / (r_before + EPS)
        inside = ((step > lb) & (step < ub)).to(mu.dtype)
        new = after + ratio * off * step * inside
        new_inner = (diff * new).sum(-1)
        step = new if inner is None else torch.where(done, step, new)
        inner = new_inner if inner is None else torch.where(done, inner, new_inner)
        if (it + 1) % CHECK_EVERY == 0 and bool(done):
            break
    return torch.nan_to_num(inner, nan=0.0, posinf=math.inf, neginf=-math.inf)


def bcp_upper_bound(W: torch.Tensor, mu: torch.Tensor, R: torch.Tensor, centre: torch.Tensor,
                    radius: torch.Tensor, target: torch.Tensor, max_rounds: Optional[int] = None) -> torch.Tensor:
    """Guaranteed U[b, i] ≥ max (w_i − w_t)·δ over ‖δ‖ ≤ R_b, δ + mu_b ∈ [centre ± radius] (float64 [B, N],
    t = target_b; module docstring part 4). NaN ↦ +∞."""
    W, mu, R = W.double(), mu.double(), R.double()
    centre, radius = centre.double(), radius.double()
    B, h = mu.shape
    c = W[None, :, :] - W[target][:, None, :]                                 # [B, N, h]
    widen = 4.0 * U * (centre.abs() + radius + mu.abs()) + _TINY
    lb = (((centre - radius) - mu) - widen).clamp(max=0)[:, None, :]
    ub = (((centre + radius) - mu) + widen).clamp(min=0)[:, None, :]
    R = R[:, None, None]
    mag = torch.maximum(lb.abs(), ub.abs())
    cm = (c.abs() * mag).sum(-1)
    alw = 8.0 * (h + 8) * U
    ball = R[..., 0] * c.norm(dim=-1) * (1.0 + alw)
    box = torch.maximum(c * lb, c * ub).sum(-1) + alw * cm
    # λ: the clipping iteration without the official 1e-12 terms (monotone; exact KKT point after ≤ h + 1 rounds)
    lam = R / c.norm(dim=-1, keepdim=True)
    clip_prev = None
    for it in range(h + 1 if max_rounds is None else max(1, min(max_rounds, h + 1))):
        t = lam * c
        clip = (t <= lb) | (t >= ub)
        s = torch.where(clip, torch.clamp(t, lb, ub) ** 2, 0.0).sum(-1, keepdim=True)
        f = torch.where(clip, 0.0, c * c).sum(-1, keepdim=True)
        lam = torch.sqrt(torch.clamp(R * R - s, min=0) / f)
        if (it + 1) % CHECK_EVERY == 0:
            if clip_prev is not None and bool((clip == clip_prev).all()):
                break
            clip_prev = clip
    lam = torch.nan_to_num(lam, nan=1e300, posinf=1e300).clamp(1e-300, 1e300)
    mu_ = 1.0 / lam
    d = torch.clamp(c * lam, lb, ub)
    g = (mu_ * R * R / 2)[..., 0] + (c * d - mu_ * d * d / 2).sum(-1)
    g = g + alw * ((mu_ * R * R / 2)[..., 0] + cm + (mu_ * mag * mag / 2).sum(-1)) + _TINY
    U_ = torch.minimum(torch.minimum(g, box + _TINY), ball + _TINY)
    return torch.nan_to_num(U_, nan=math.inf)


def worst_case_logits(logits: torch.Tensor, translation: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official `translation`: z_i + T[b, i, target_b] for i ≠ target, z_target unchanged. `translation` is the full
    [B, N, N] matrix or its target column [B, N]."""
    if translation.dim() == 3:
        idx = target[:, None, None].expand(-1, translation.shape[1], 1)
        translation = translation.gather(2, idx).squeeze(2)
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return logits + translation * (1 - onehot)


def gloro_logits(logits: torch.Tensor, worst: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official `gloro_translation`: [z, max_{i ≠ target} worst_i], [B, N + 1]."""
    is_t = F.one_hot(target, logits.shape[1]).bool()
    bottom = worst.masked_fill(is_t, -math.inf).amax(1, keepdim=True)
    return torch.cat([logits, bottom], dim=1)


def robust_loss(logits: torch.Tensor, worst: torch.Tensor, y: torch.Tensor, kappa: float = 0.0):
    """(κ·CE(z, y) + (1 − κ)·CE(worst, y), robust error = mean[argmax(worst) ≠ y]) (official `robust_loss` at
    κ = 0, `train` in general)."""
    loss = F.cross_entropy(worst, y)
    if kappa:
        loss = kappa * F.cross_entropy(logits, y) + (1 - kappa) * loss
    return loss, (worst.max(1)[1] != y).to(worst.dtype).sum() / y.shape[0]


def gloro_loss(glogits: torch.Tensor, y: torch.Tensor):
    """(CE([z, bottom], y), mean[argmax ≠ y]) (official `robust_loss(..., gloro=True)`)."""
    return F.cross_entropy(glogits, y), (glogits.max(1)[1] != y).to(glogits.dtype).sum() / y.shape[0]


# -- the certificate ------------------------------------------------------------------------------------------------

@dataclass
class LocalCertificate:
    """logits [B, N]; predicted j [B]; worst [B, N] (w.r.t. j; worst_j = z_j); certified [B] (z_j > worst_i ∀ i ≠ j);
    K [B] (∏ local norms × input factor, float64); r [B] (radius of the penultimate ball used); norms [B, L];
    vectors: final local power iterates (published rule) or None."""

    logits: torch.Tensor
    predicted: torch.Tensor
    worst: torch.Tensor
    certified: torch.Tensor
    K: torch.Tensor
    r: torch.Tensor
    norms: torch.Tensor
    vectors: Optional[List[torch.Tensor]] = None


def _strictly_top(worst: torch.Tensor, logits: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    is_j = F.one_hot(j, logits.shape[1]).bool()
    top = logits.gather(1, j[:, None])
    return ((top > worst) | is_j).all(dim=1)


def local_certificate(net: LocalLipNet, x: torch.Tensor, eps: float, rule: str = "sound", n_iter: int = 2000,
                      opt_iter: int = 1000, init_vectors=None, global_init=None,
                      explicit_limit: Optional[int] = None) -> LocalCertificate:
    """Local-Lip-B certificate of x at radius ε (data units). rule "published"/"power": the official arithmetic
    (global ball from `power_bound()`, or from the official iteration started at `global_init`; local norms from
    `init_vectors` or a Gaussian start seeded with `CERT_SEED`; `n_iter` steps, `opt_iter` BCP rounds). rule "sound": guaranteed bounds only
    (module docstring), float64; needs `net.converge()`."""
    with torch.no_grad():
        if rule in ("published", "power"):
            g = None if global_init is None else official_global_norms(net, n_iter, global_init)[0]
            ib = interval_bounds(net, x, eps, g)
            # a fixed seed per batch: the published CRA is reproducible and leaves the training RNG untouched
            start = None if init_vectors is not None else torch.Generator(x.device).manual_seed(CERT_SEED)
            norms, vecs = local_layer_norms(net, ib.masks, n_iter, init_vectors, generator=start)
            factor = 1.0 if net.norm_mean is None else net.input_factor
            r = penultimate_radius(eps * factor, norms)
            j = ib.logits.argmax(1)
            T = bcp_translation(net.classifier.weight.to(ib.mu.dtype), ib.mu, r, ib.centre, ib.radius, opt_iter, j)
            worst = worst_case_logits(ib.logits, T, j)
            K = norms.double().prod(1) * factor
        elif rule == "sound":
            ib = interval_bounds(net, x, eps, sound=True)
            norms, vecs = local_norm_bounds(net, ib.masks, explicit_limit), None
            factor = 1.0 if net.norm_mean is None else net.input_factor * _UP
            K = norms.prod(1) * _UP ** norms.shape[1]
            h = ib.mu.shape[1]
            r = (eps * factor * K * _UP + ib.err.norm(dim=1) * (1.0 + 2.0 * (h + 4) * U)) * _UP
            j = ib.logits.argmax(1)
            Ub = bcp_upper_bound(net.classifier.weight, ib.mu, r, ib.centre, ib.radius, j, opt_iter)
            ez = ib.logit_err
            t = (Ub + ez + ez.gather(1, j[:, None])) * (1.0 + 8.0 * U)
            worst = torch.where(F.one_hot(j, ib.logits.shape[1]).bool(), ib.logits,
                                ib.logits + t + 8.0 * U * (ib.logits.abs() + t))
            K = K * factor
        else:
            raise ValueError(f"unknown Local-Lip-B rule {rule!r}; use sound, published or power")
    return LocalCertificate(ib.logits, j, worst, _strictly_top(worst, ib.logits, j), K.double(), r, norms, vecs)


__all__ = ["ReLUTheta", "LocalLipNet", "LocalBound", "build_local_lip", "local_lip_modules", "LOCAL_LIP_ARCHS",
           "official_global_norms", "WarmStartStore", "IntervalBounds", "interval_bounds", "local_layer_norms",
           "local_norm_bounds",
           "penultimate_radius", "bcp_translation", "bcp_upper_bound", "worst_case_logits", "gloro_logits",
           "robust_loss", "gloro_loss", "LocalCertificate", "local_certificate"]
