"""Bounded building blocks: power-iterated layers, 1-Lipschitz activations, bound composition, architectures."""
from bench.nn.bound import LipschitzNet, PairwiseBound, pairwise_distances
from bench.nn.lipschitz import LipConv2d, LipLinear, MaxMin, UnconvergedBoundError

__all__ = ["LipschitzNet", "PairwiseBound", "pairwise_distances", "LipConv2d", "LipLinear", "MaxMin",
           "UnconvergedBoundError"]
