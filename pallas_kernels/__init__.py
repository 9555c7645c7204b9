"""Pallas kernels for sketched (codebook + packed codes) linear layers, with ``jnp`` twins.

Self-contained: nothing here imports ``sketchtune_jax``.
"""

from pallas_kernels.backends import KERNEL_BACKENDS, Backend, backend_for, default_backend, describe
from pallas_kernels.block_sizes import (
    BlockSizes,
    DcodebookBlockSizes,
    DequantizeBlockSizes,
    DxBlockSizes,
    ForwardBlockSizes,
)
from pallas_kernels.packing import (
    SUPPORTED_BITS,
    decode_codes,
    pack_codes,
    packed_words,
    unpack_codes,
)
from pallas_kernels.sharding import SketchSharding, sharded_sketched_matmul
from pallas_kernels.sketched_matmul import (
    dense_matmul_reference,
    dequantize,
    dequantize_reference,
    sketched_matmul,
    sketched_matmul_grads,
    sketched_matmul_grads_reference,
    sketched_matmul_reference,
)

__all__ = [
    "KERNEL_BACKENDS",
    "SUPPORTED_BITS",
    "Backend",
    "BlockSizes",
    "DcodebookBlockSizes",
    "DequantizeBlockSizes",
    "DxBlockSizes",
    "ForwardBlockSizes",
    "SketchSharding",
    "backend_for",
    "decode_codes",
    "dense_matmul_reference",
    "describe",
    "default_backend",
    "dequantize",
    "dequantize_reference",
    "pack_codes",
    "packed_words",
    "sharded_sketched_matmul",
    "sketched_matmul",
    "sketched_matmul_grads",
    "sketched_matmul_grads_reference",
    "sketched_matmul_reference",
    "unpack_codes",
]
