"""Architectures, declared as data: each is a layer spec handed to one builder.

Spec syntax follows Table B2 of the reference paper: ("c", C, K, S, P) is a conv with C channels, a K×K
kernel, stride S and padding P; ("d", C) is a fully connected layer with C outputs. MaxMin follows every
layer except the last, and every weight gets kaiming-normal init (fan_in, gain √2) with zero bias, as in the
official CLL code (`util.init_weights`).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch.nn as nn

from bench.nn.bound import LipschitzNet
from bench.nn.lipschitz import LipConv2d, LipLinear, MaxMin
from bench.registry import register_arch


def _init(layer: nn.Module) -> None:
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def spec_features(spec: Sequence[tuple], input_shape: Sequence[int], activation: Callable[[tuple], nn.Module],
                  conv_init: Optional[Callable[[nn.Conv2d], None]] = None) -> Tuple[List[nn.Module], int]:
    """The feature modules of a Table B2 spec and their flattened width: convolutions first, then dense layers,
    each followed by `activation(its output shape)`; a Flatten before the first dense layer (or at the end). A
    conv gets `conv_init` as soon as it is built (so a family's RNG draws keep the official order)."""
    image = len(input_shape) == 3
    channels, h, w = input_shape if image else (None, None, None)
    flat = None if image else int(input_shape[0])
    layers: List[nn.Module] = []
    for kind, *args in spec:
        if kind == "c" and flat is None:
            out, k, s, p = args
            conv = LipConv2d(channels, out, k, stride=s, padding=p)
            if conv_init is not None:
                conv_init(conv)
            channels, h, w = out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            layers += [conv, activation((channels, h, w))]
        elif kind == "d":
            if flat is None:
                layers.append(nn.Flatten())
                flat = channels * h * w
            layers += [LipLinear(flat, args[0]), activation((args[0],))]
            flat = args[0]
        else:
            raise ValueError(f"bad layer {kind!r} in an architecture spec (convolutions first, then dense layers)")
    if flat is None:
        layers.append(nn.Flatten())
        flat = channels * h * w
    return layers, flat


def build_plain(spec: Sequence[tuple], input_shape: Sequence[int], num_classes: int,
                normalize: Optional[tuple] = None) -> LipschitzNet:
    """Unconstrained conv/dense layers with power-iterated bounds (GloRo, CLL on 4C3F/6C2F/8C2F, moons)."""
    layers, flat = spec_features(spec, input_shape, lambda shape: MaxMin())
    classifier = LipLinear(flat, num_classes)
    for layer in layers + [classifier]:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            _init(layer)
    return LipschitzNet(nn.Sequential(*layers), classifier, input_shape, num_classes, normalize=normalize)


def register_spec_arch(name: str, builder, doc: str, family: Optional[str] = None, data: str = "image",
                       default_dataset: str = "cifar10", **spec):
    """Register `builder(input_shape, num_classes, normalize, **spec)` as architecture `name`. The factory keeps
    its `spec` and `family` (method recipes may be keyed "<dataset>@<family>", e.g. "cifar10@lipconv"), the kind
    of data it takes (`data`: "image" or "vector", checked against the dataset when a config is resolved) and the
    dataset a run uses when none is named."""
    def factory(input_shape, num_classes, normalize=None):
        return builder(input_shape, num_classes, normalize, **spec)
    factory.__doc__ = doc
    factory.spec = dict(spec)
    factory.family = family
    factory.data = data
    factory.default_dataset = default_dataset
    register_arch(name)(factory)
    return factory


def _plain_arch(name: str, spec: Sequence[tuple], doc: str, default_dataset: str = "cifar10"):
    factory = register_spec_arch(name, lambda shape, classes, normalize: build_plain(spec, shape, classes, normalize),
                                 doc, data="image" if spec[0][0] == "c" else "vector",
                                 default_dataset=default_dataset)
    factory.spec = tuple(spec)
    return factory


# Two-moons MLP (supplement B, Table B1): 2-10-20-40-40-20-10-2 with MaxMin, 3,782 parameters.
_plain_arch("moons-mlp", [("d", 10), ("d", 20), ("d", 40), ("d", 40), ("d", 20), ("d", 10)],
            "Two-moons MLP 2-10-20-40-40-20-10-2 with MaxMin (supplement B).", default_dataset="moons")

# CIFAR 4C3F (Table B2; GloRo's cnn_4C3F): 4×4 stride-2 convs, 2,466,858 parameters.
_plain_arch("4c3f", [("c", 32, 3, 1, 1), ("c", 32, 4, 2, 1), ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 1),
                     ("d", 512), ("d", 512)],
            "4C3F as in Table B2 (4×4 stride-2 convs).")
# The official CLL 4C3F configs use 3×3 stride-2 convs instead (2,431,018 parameters).
_plain_arch("4c3f-k3", [("c", 32, 3, 1, 1), ("c", 32, 3, 2, 1), ("c", 64, 3, 1, 1), ("c", 64, 3, 2, 1),
                        ("d", 512), ("d", 512)],
            "4C3F as in the official CLL configs (3×3 stride-2 convs).")
# CIFAR 6C2F (Table B2), 2,250,378 parameters.
_plain_arch("6c2f", [("c", 32, 3, 1, 1), ("c", 32, 3, 1, 1), ("c", 32, 4, 2, 1), ("c", 64, 3, 1, 1),
                     ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 1), ("d", 512)],
            "6C2F as in Table B2.")
# Tiny-ImageNet 8C2F (Table B2, 64×64 inputs), 4,342,984 parameters.
_plain_arch("8c2f", [("c", 64, 3, 1, 1), ("c", 64, 3, 1, 1), ("c", 64, 4, 2, 0), ("c", 128, 3, 1, 1),
                     ("c", 128, 3, 1, 1), ("c", 128, 4, 2, 0), ("c", 256, 3, 1, 1), ("c", 256, 4, 2, 0),
                     ("d", 256)],
            "8C2F as in Table B2 (64×64 inputs).", default_dataset="tinyimagenet")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


