"""Sketching one weight matrix: Hessian, weighted k-means, column sweep (Algorithm 1).

Typical use, per linear layer::

    h, n = init_hessian(in_features)
    for x in calibration_inputs:              # [..., in_features]
        h, n = accumulate_hessian(h, n, x)
    result = sketch_weight(weight, h, bits=4, groups=4)   # or act_order=True
    relative_output_error(weight, result.w_hat, h)
"""

from sketchtune_jax.sketch.matrix.hessian import accumulate_hessian, check_finite, init_hessian, prepare_hessian
from sketchtune_jax.sketch.matrix.kmeans import assign_nearest, weighted_kmeans
from sketchtune_jax.sketch.matrix.sweep import (
    SketchResult,
    act_order_within_groups,
    importance_weights,
    relative_output_error,
    restore_column_order,
    sketch_matrix,
    sketch_weight,
)

__all__ = [
    "SketchResult",
    "accumulate_hessian",
    "act_order_within_groups",
    "check_finite",
    "assign_nearest",
    "importance_weights",
    "init_hessian",
    "prepare_hessian",
    "relative_output_error",
    "restore_column_order",
    "sketch_matrix",
    "sketch_weight",
    "weighted_kmeans",
]
