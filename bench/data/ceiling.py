"""What the data allow: the largest certified robust accuracy any classifier can reach on a labelled set.

For two classes and an ℓ2 radius ε, call two points of opposite labels *in conflict* when ‖x_a − x_b‖ ≤ 2ε.

*No classifier certifies both points of a conflicting pair.* A certificate at ε (lipbench's, strict) says that
the whole closed ball B(x, ε) takes the label of x. The midpoint m = (x_a + x_b)/2 lies in both closed balls
(‖m − x_a‖ = ‖x_a − x_b‖/2 ≤ ε), so it would take both labels.

*Any set S without conflicts is certified by some classifier.* Let d_c(x) be the distance from x to the points
of S labelled c and g(x) = d_1(x) − d_0(x), predicting class 0 where g > 0. Each d_c is 1-Lipschitz, so g is
2-Lipschitz, and for x ∈ S of class 0, g(x) = d_1(x) > 2ε: on B(x, ε), g ≥ g(x) − 2ε > 0 (the same for class 1).

So the best CRA is the largest conflict-free subset: a maximum independent set of the bipartite conflict
graph, whose size is n − ν (König's theorem; ν the size of a maximum matching, Hopcroft–Karp via scipy).
This holds for the points themselves; a held-out set's ceiling is computed on its own points.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree


def conflict_graph(x: np.ndarray, y: np.ndarray, eps: float) -> sp.csr_matrix:
    """Biadjacency [class-0 points × class-1 points] of the pairs at distance ≤ 2ε (coincident points too)."""
    a, b = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    if len(a) == 0 or len(b) == 0:
        return sp.csr_matrix((len(a), len(b)))
    # a hair above 2ε so that pairs at exactly 2ε are kept whatever the tree's rounding, then the exact test
    near = cKDTree(x[a]).sparse_distance_matrix(cKDTree(x[b]), 2.0 * eps * (1.0 + 1e-9), output_type="ndarray")
    rows, cols = near["i"].astype(np.int64), near["j"].astype(np.int64)   # the ndarray output keeps distance 0
    keep = np.linalg.norm(x[a][rows] - x[b][cols], axis=1) <= 2.0 * eps
    rows, cols = rows[keep], cols[keep]
    return sp.csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(a), len(b)))


def cra_ceiling(x, y, eps: float) -> float:
    """The largest fraction of the points (x [n, d], labels y ∈ {0, 1}) that any classifier classifies correctly
    and certifies at ℓ2 radius ε: 1 − ν/n (module docstring). Two classes only (for more, the conflict graph is
    not bipartite and the maximum independent set is NP-hard)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y)
    if len(y) == 0:
        return float("nan")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("the CRA ceiling is computed for two classes (labels 0 and 1)")
    graph = conflict_graph(x, y, float(eps))
    if graph.nnz == 0:
        return 1.0
    matched = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    return 1.0 - matched / len(y)
