"""Pairwise Lipschitz bounds and the network that composes them.

The one idea (design.md): a network answers `bound(x=None, eps=None) → K`, the pairwise Lipschitz constants K_ij
of the logit differences f_i − f_j, and x is certified at radius ε iff f_j(x) − f_i(x) > ε·K_ji for every i ≠ j, j the
predicted class. For a network `classifier ∘ features`, with K_up a bound on the features' Lipschitz constant,
the classifier's pairwise constant is exact: K_ij = K_up·‖W_i − W_j‖₂ (biases cancel in f_i − f_j).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from bench.nn.lipschitz import MaxMin

#: Modules that are 1-Lipschitz in L2 and carry no bound of their own.
ONE_LIPSCHITZ_TYPES = (MaxMin, nn.Flatten, nn.Identity, nn.ReLU, nn.Unflatten)


def pairwise_distances(W: torch.Tensor) -> torch.Tensor:
    """‖W_i − W_j‖₂ for all rows, [N, N] (or [B, N, N] for a batch of weights). Zero gradient on the diagonal."""
    diff = W.unsqueeze(-2) - W.unsqueeze(-3)
    return torch.linalg.vector_norm(diff, dim=-1)


@dataclass
class PairwiseBound:
    """K_ij = K_up · D_ij, with D_ij = ‖W_i − W_j‖ (a last linear layer) or D_ij = √2 (a 1-Lipschitz last layer).

    K_up is a scalar (global bounds) or a [B] tensor (per-sample, local bounds); it may carry a gradient.
    """

    K_up: torch.Tensor
    W: Optional[torch.Tensor] = None

    def distances(self) -> torch.Tensor:
        if self.W is None:
            raise ValueError("a 1-Lipschitz last layer has no weight rows; use pairwise()")
        return pairwise_distances(self.W)

    def pairwise(self, num_classes: Optional[int] = None) -> torch.Tensor:
        """The full K matrix: [N, N], or [B, N, N] when K_up is per-sample. Zero on the diagonal."""
        if self.W is None:
            if num_classes is None:
                raise ValueError("num_classes is needed for a 1-Lipschitz last layer")
            D = math.sqrt(2.0) * (1 - torch.eye(num_classes, dtype=self.K_up.dtype, device=self.K_up.device))
        else:
            D = self.distances()
        K_up = self.K_up
        if K_up.dim() == 1:
            return K_up[:, None, None] * D
        return K_up * D

    def rows(self, j: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
        """K_{j_b, i} for each sample b and class i, [B, N] (zero at i = j_b)."""
        K = self.pairwise(num_classes)
        if K.dim() == 3:
            return K[torch.arange(j.shape[0], device=j.device), j]
        return K[j]

    def max(self, num_classes: Optional[int] = None) -> torch.Tensor:
        """K̄ = max_ij K_ij (a scalar, or [B] for per-sample bounds)."""
        K = self.pairwise(num_classes)
        return K.flatten(-2).amax(-1)

    def detach(self) -> "PairwiseBound":
        return PairwiseBound(self.K_up.detach(), None if self.W is None else self.W.detach())

    def to(self, dtype: torch.dtype) -> "PairwiseBound":
        return PairwiseBound(self.K_up.to(dtype), None if self.W is None else self.W.to(dtype))


def bounded_layers(module: nn.Module) -> Iterable[nn.Module]:
    """The modules of a feature extractor that carry a bound, in order; raises on any module of unknown
    Lipschitz constant, so an unsound composition is refused when the network is built."""
    for child in module.children():
        if hasattr(child, "certified_bound") and hasattr(child, "train_bound"):
            yield child
        elif isinstance(child, ONE_LIPSCHITZ_TYPES) or getattr(child, "lipschitz_one", False):
            continue
        elif isinstance(child, nn.Sequential):
            yield from bounded_layers(child)
        else:
            raise TypeError(f"{type(child).__name__} has no Lipschitz bound; wrap it or declare lipschitz_one")


class NormalizedLinear(nn.Linear):
    """Last-layer normalization (LLN; Singla et al. ICLR 2022, also CPL's `LinearNormalized`): logits
    z_i = ŵ_i·x + b_i with ŵ_i = W_i/‖W_i‖. Not 1-Lipschitz as a whole; `rows()` gives ŵ, so a LipschitzNet
    certifies pairwise with ‖ŵ_i − ŵ_j‖. Flattens its input."""

    def rows(self) -> torch.Tensor:
        return self.weight / torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.flatten(1), self.rows(), self.bias)


class LipschitzNet(nn.Module):
    """classifier ∘ features ∘ normalize, with a pairwise Lipschitz bound.

    features:   a module whose children are bounded layers (train_bound / converge / certified_bound) or
                1-Lipschitz maps (MaxMin, Flatten, ...). K_up is the product of their bounds.
    classifier: the last linear layer. Its pairwise constant ‖W_i − W_j‖ is exact. With
                `last_layer_one_lipschitz=True` the classifier is itself part of a 1-Lipschitz chain and
                D_ij = √2 (top-1 minus top-2 of a 1-Lipschitz map).
    normalize:  optional (mean, std) per channel, applied inside the model, so inputs are in data units
                ([0,1] pixels); its factor 1/min(std) enters K_up.
    """

    #: the family publishes certificates that take every layer as exactly 1-Lipschitz (SOC, CPL, SLL, Sandwich):
    #: result.json then records that rule's CRA as `cra_published` beside the sound one
    published_rule_nominal = False
    #: the certificate depends on the input: such a network also answers `local_certificate(x, eps, rule)` and
    #: `bound(x, eps)` holds only within the ε-balls around x (bench/certify.py `certify_split`)
    input_aware = False

    def __init__(self, features: nn.Module, classifier: nn.Module, input_shape: Sequence[int],
                 num_classes: int, normalize: Optional[tuple] = None, last_layer_one_lipschitz: bool = False):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.last_layer_one_lipschitz = last_layer_one_lipschitz
        self._layers = list(bounded_layers(features))
        self._projected = [m for m in self.modules() if m is not self and hasattr(m, "project_")]
        if normalize is not None:
            mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in normalize)
            shape = (1, -1) + (1,) * (len(self.input_shape) - 1)
            self.register_buffer("norm_mean", mean.reshape(shape))
            self.register_buffer("norm_std", std.reshape(shape))
            self.input_factor = 1.0 / float(std.min())
        else:
            self.norm_mean = self.norm_std = None
            self.input_factor = 1.0
        with torch.no_grad():  # record every layer's input shape (creates the power iterates)
            was_training = self.training
            self.eval()
            self(torch.zeros(1, *self.input_shape))
            self.train(was_training)

    def project_(self) -> None:
        """After each optimizer step: modules with constrained parameters (`project_()`) project back."""
        for module in self._projected:
            module.project_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_mean is not None:
            x = (x - self.norm_mean) / self.norm_std
        return self.classifier(self.features(x))

    def _classifier_rows(self) -> Optional[torch.Tensor]:
        """The rows W_i of the last layer's effective weight (a normalized last layer exposes `rows()`)."""
        if self.last_layer_one_lipschitz:
            return None
        return self.classifier.rows() if hasattr(self.classifier, "rows") else self.classifier.weight

    def bound(self, x: Optional[torch.Tensor] = None, eps: Optional[float] = None, n_iter: int = 5,
              index: Optional[torch.Tensor] = None) -> PairwiseBound:
        """Training-time pairwise bound: `n_iter` power-iteration steps per layer, gradient through σ. A global
        bound holds everywhere, so it ignores the batch `x`, the radius `eps` and the batch's training-set rows
        `index` (input-aware networks use them)."""
        # device and dtype from any parameter: a 1-Lipschitz last layer may have no `weight` (truncation, SOC)
        ref = next(self.parameters())
        K_up = torch.ones((), device=ref.device, dtype=ref.dtype)
        for layer in self._layers:
            K_up = K_up * layer.train_bound(n_iter)
        if self.last_layer_one_lipschitz:
            K_up = K_up * self.classifier.train_bound(n_iter)
        return PairwiseBound(K_up * self.input_factor, self._classifier_rows())

    def _bounded(self) -> list:
        return self._layers + ([self.classifier] if self.last_layer_one_lipschitz else [])

    def converge(self, tol: float = 1e-9, guaranteed: bool = True) -> None:
        """Converged power iterations and (unless `guaranteed=False`; then on the first certificate) guaranteed
        bounds of every layer, after each epoch and before any certificate; cached per layer until its weights
        change."""
        for layer in self._bounded():
            if hasattr(layer, "power_iterate"):
                layer.converge(tol=tol, guaranteed=guaranteed)
            else:
                layer.converge(tol=tol)

    def layer_bounds(self) -> list:
        """Each bounded layer's guaranteed Lipschitz constant (the certificate's factors), in order."""
        return [float(layer.certified_bound()) for layer in self._layers]

    def layer_bounds_power(self) -> list:
        """Each bounded layer's converged power-iteration constant (from below), in order."""
        return [float(layer.power_bound()) for layer in self._layers]

    def nominal_bound(self) -> PairwiseBound:
        """K with every layer taken as exactly 1-Lipschitz, only the input normalization counted: the rule that
        1-Lipschitz families publish (SOC, CPL, ...). Not a certificate: `certified_bound()` is."""
        rows = self._classifier_rows()
        return PairwiseBound(torch.tensor(self.input_factor, dtype=torch.float64),
                             None if rows is None else rows.detach().cpu().double())

    def _product_bound(self, per_layer) -> PairwiseBound:
        K_up = torch.ones((), dtype=torch.float64)
        for layer in self._bounded():
            K_up = K_up * per_layer(layer).detach().cpu().double()
        rows = self._classifier_rows()
        W = None if rows is None else rows.detach().cpu().double().clone()  # a bound never aliases live weights
        return PairwiseBound(K_up * self.input_factor, W)

    def certified_bound(self) -> PairwiseBound:
        """The certificate: the product of the layers' guaranteed float64 bounds, times 1/min(std), with the exact
        last-layer rows. K is inflated by 2(L + d + 8)·u for the rounding of the product of L + 1 float64 factors
        and of the float64 row distances ‖W_i − W_j‖ over d features.
        Raises UnconvergedBoundError if any layer is stale."""
        bound = self._product_bound(lambda layer: layer.certified_bound())
        width = 0 if bound.W is None else bound.W.shape[-1]
        allowance = 1.0 + 2.0 * (len(self._bounded()) + width + 8) * 2.0 ** -53
        return PairwiseBound(bound.K_up * allowance, bound.W)

    def power_bound(self) -> PairwiseBound:
        """The paper's K: the product of converged power-iteration norms (from below; not a certificate)."""
        return self._product_bound(lambda layer: layer.power_bound())
