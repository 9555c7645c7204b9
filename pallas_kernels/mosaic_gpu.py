"""Mosaic GPU (``plgpu``, Hopper and newer) kernels of the sketched matmul.

The forward kernel computes ``y^T [out, m] = W_hat [out, in] @ x^T`` so that the rebuilt
weight tile is the *register* operand of ``wgmma`` (the activations are the SMEM operand):
the dense weight exists only in registers, a ``[64, 64]`` slot tile at a time. Codes are
read in slot order as on TPU (`pallas_kernels.mosaic_tpu`): slot ``s`` of word ``j`` is
column ``j * S + s`` of its group, decoded with one shift and mask and looked up with a
tree of ``2**bits - 1`` selects over the row's codebook entries (no gather, which Mosaic
GPU cannot lower). The K loop is an `plgpu.emit_pipeline` over 64-word chunks of one group.

The codebook-gradient kernel (`dcodebook`) accumulates ``dW = dy^T x`` for a ``[64 rows,
64 words]`` tile one slot at a time with ``wgmma`` (both operands staged in SMEM) and sums
each entry into its code's bucket in registers, with the same shift-and-mask decoding;
``dW`` never reaches HBM.

What they cover, and what falls back to the Triton kernels (same CUDA module):

* 2- and 4-bit codes, 16-bit activations (``wgmma`` takes bf16/f16), ``out`` a multiple
  of 64 and each group's words a multiple of 64 (`supports_forward`); anything else -> Triton;
* ``dx`` and `dequantize` -> Triton (not written for Mosaic GPU yet).

Verification on a CPU, with jax 0.10.2: both kernels lower with
`jax.export(..., platforms=["cuda"])` to ``mosaic_gpu_v2`` calls. The codebook gradient
also runs in the Mosaic GPU interpreter (`interpret_params`), which cannot take tiled or
swizzled SMEM nor `plgpu.load`: interpreted, it runs without those (they place bytes in
SMEM and registers; the values are the same) and matches the ``jnp`` twin in the tests.
The forward cannot run there (it asserts on a tiled/swizzled SMEM ref loaded inside
``emit_pipeline``, and on any BlockSpec with a non-trivial index map). Neither has been
compiled on a GPU yet (`bench/gpu_check.sh` does it), so the automatic backend does not
pick them (`pallas_kernels.backends`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import triton
from pallas_kernels._common import round_up
from pallas_kernels.block_sizes import DcodebookBlockSizes, ForwardBlockSizes

_ROWS = 64  # wgmma M: one warpgroup's rows of W_hat
_WORDS = 64  # words per K step (S * 64 columns)
_TOKENS = 16  # wgmma N: rows of x per program (padded)
_M_STEP = 64  # tokens per wgmma K step of the codebook gradient


def interpret_params():
    """The Mosaic GPU interpreter's parameters. The one import of a private jax module:
    jax 0.10.2 exports ``InterpretGPUParams`` nowhere public."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def supports_forward(x_dtype, out: int, cols: int, bits: int) -> bool:
    """Whether `forward` runs the Mosaic GPU kernel (else it calls the Triton one)."""
    slots = 32 // bits
    return (
        bits in (2, 4)
        and jnp.dtype(x_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and out % _ROWS == 0
        and cols % slots == 0
        and (cols // slots) % _WORDS == 0
    )


def _forward_call(xs, cbt, codes2, *, bits: int, groups: int, lanes: int, interpret: bool):
    slots, nc = 32 // bits, 2**bits
    mp = xs.shape[1]
    out = codes2.shape[0]
    dtype = xs.dtype
    chunks_per_group = lanes // _WORDS
    x_swizzle = plgpu.find_swizzle(_WORDS * 16, "rhs")
    x_transforms = (plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))
    # 64 uint32 words = 256 bytes a row: 128-byte swizzle, so the register load avoids bank conflicts.
    code_transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

    def body(x_gmem, cb_gmem, codes_gmem, o_gmem, o_smem):
        j = lax.axis_index("n")
        i = lax.axis_index("m")

        def with_acc(acc_ref):
            def step(_, x_ref, cb_ref, codes_ref):
                words = plgpu.load(codes_ref, (), layout=plgpu.Layout.WGMMA)
                row = plgpu.Layout.WGMMA.reduce(1)
                entries = [
                    lax.broadcast_in_dim(plgpu.load(cb_ref.at[0, c], (), layout=row), (_ROWS, _WORDS), (0,))
                    for c in range(nc)
                ]
                for s in range(slots):
                    values = entries
                    for b in range(bits):
                        bit = ((words >> jnp.uint32(s * bits + b)) & jnp.uint32(1)) == jnp.uint32(1)
                        values = [jnp.where(bit, values[2 * q + 1], values[2 * q]) for q in range(len(values) // 2)]
                    w = values[0].astype(dtype)
                    plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(x_ref.at[s], (1, 0)))
                # The SMEM slots are reused by the next steps: drain the MMAs first.
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step,
                grid=(groups * chunks_per_group,),
                in_specs=[
                    plgpu.BlockSpec((slots, _TOKENS, _WORDS), lambda k: (0, 0, k), transforms=x_transforms),
                    plgpu.BlockSpec((1, nc, _ROWS), lambda k: (lax.div(k, chunks_per_group), 0, 0)),
                    plgpu.BlockSpec((_ROWS, _WORDS), lambda k: (0, k), transforms=code_transforms),
                ],
                max_concurrent_steps=2,
            )(
                x_gmem.at[:, pl.ds(i * _TOKENS, _TOKENS), :],
                cb_gmem.at[:, :, pl.ds(j * _ROWS, _ROWS)],
                codes_gmem.at[pl.ds(j * _ROWS, _ROWS), :],
            )
            o_smem[...] = acc_ref[...]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(j * _ROWS, _ROWS), pl.ds(i * _TOKENS, _TOKENS)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(with_acc, plgpu.ACC((_ROWS, _TOKENS), jnp.float32))

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((out, mp), jnp.float32),
        grid=(out // _ROWS, mp // _TOKENS),
        grid_names=("n", "m"),
        scratch_types=dict(o_smem=plgpu.SMEM((_ROWS, _TOKENS), jnp.float32)),
        interpret=interpret_params() if interpret else False,
    )(xs, cbt, codes2)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def forward(x2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: ForwardBlockSizes):
    """``x2 [m, in] @ W_hat.T -> [m, out]`` in ``x2.dtype``; the Triton kernel where
    `supports_forward` says no (``blocks`` is used only there)."""
    out, groups, _ = codebook.shape
    if not supports_forward(x2.dtype, out, cols, bits):
        return triton.forward(x2, codebook, codes, bits, cols, interpret, blocks)
    m = x2.shape[0]
    slots = 32 // bits
    lanes = cols // slots
    mp = round_up(m, _TOKENS)
    # Activations in slot order: [slots, m, groups * lanes].
    xs = jnp.pad(x2, ((0, mp - m), (0, 0))).reshape(mp, groups, lanes, slots).transpose(3, 0, 1, 2)
    xs = xs.reshape(slots, mp, groups * lanes)
    cbt = codebook.astype(jnp.float32).transpose(1, 2, 0)  # [groups, 2**bits, out]
    yt = _forward_call(
        xs, cbt, codes.reshape(out, groups * lanes), bits=bits, groups=groups, lanes=lanes, interpret=interpret
    )
    return yt[:, :m].T.astype(x2.dtype)


def _dcodebook_call(dyt, xs, codes2, *, bits: int, interpret: bool):
    """Per-chunk codebook-gradient partials ``f32 [chunks, 2**bits, out]`` of ``dyt [out, m]``,
    ``xs [slots, m, lanes_total]`` (slot order) and ``codes2 uint32 [out, lanes_total]``."""
    slots, nc = 32 // bits, 2**bits
    out, mp = dyt.shape
    dtype = dyt.dtype
    chunks = codes2.shape[1] // _WORDS
    # The interpreter (jax 0.10.2) cannot run tiled/swizzled SMEM nor `plgpu.load`; both only
    # choose where bytes sit in SMEM and registers, not the values, so the interpreted kernel
    # is this one without them.
    operand_transforms = () if interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    code_transforms = () if interpret else (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

    def body(dyt_gmem, xs_gmem, codes_gmem, o_gmem, dy_smem, x_smem, codes_smem, o_smem, barrier):
        j = lax.axis_index("n")
        c = lax.axis_index("c")
        rows, words = pl.ds(j * _ROWS, _ROWS), pl.ds(c * _WORDS, _WORDS)
        plgpu.copy_gmem_to_smem(codes_gmem.at[rows, words], codes_smem, barrier)
        plgpu.barrier_wait(barrier)
        packed = codes_smem[...] if interpret else plgpu.load(codes_smem, (), layout=plgpu.Layout.WGMMA)
        sums = [None] * nc
        for s in range(slots):

            def slot_dw(acc_ref, s=s):
                # dW[rows, slot s of the chunk's words] = dy^T @ x over all tokens.
                def k_step(k, carry):
                    plgpu.copy_gmem_to_smem(dyt_gmem.at[rows, pl.ds(k * _M_STEP, _M_STEP)], dy_smem, barrier)
                    plgpu.barrier_wait(barrier)
                    plgpu.copy_gmem_to_smem(xs_gmem.at[s, pl.ds(k * _M_STEP, _M_STEP), words], x_smem, barrier)
                    plgpu.barrier_wait(barrier)
                    plgpu.wgmma(acc_ref, dy_smem, x_smem)
                    # Both SMEM tiles are overwritten by the next step: drain the MMA first.
                    plgpu.wgmma_wait(0)
                    return carry

                lax.fori_loop(0, mp // _M_STEP, k_step, None)
                return acc_ref[...]

            dw = pl.run_scoped(slot_dw, plgpu.ACC((_ROWS, _WORDS), jnp.float32))
            code = (packed >> jnp.uint32(s * bits)) & jnp.uint32(nc - 1)
            # Bucket sums per row: a select and a row reduction per code value (no scatter).
            for q in range(nc):
                part = jnp.sum(jnp.where(code == jnp.uint32(q), dw, 0.0), axis=1)
                sums[q] = part if sums[q] is None else sums[q] + part
        for q in range(nc):
            o_smem[q] = sums[q]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[c, :, rows])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((chunks, nc, out), jnp.float32),
        grid=(out // _ROWS, chunks),
        grid_names=("n", "c"),
        scratch_types=dict(
            dy_smem=plgpu.SMEM((_ROWS, _M_STEP), dtype, transforms=operand_transforms),
            x_smem=plgpu.SMEM((_M_STEP, _WORDS), dtype, transforms=operand_transforms),
            codes_smem=plgpu.SMEM((_ROWS, _WORDS), jnp.uint32, transforms=code_transforms),
            o_smem=plgpu.SMEM((nc, _ROWS), jnp.float32),
            barrier=plgpu.Barrier(num_arrivals=1),
        ),
        interpret=interpret_params() if interpret else False,
    )(dyt, xs, codes2)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dcodebook(x2, dy2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: DcodebookBlockSizes):
    """The codebook gradient ``[out, groups, 2**bits]`` (``codebook.dtype``) of ``x2 [m, in]``
    and ``dy2 [m, out]``; the Triton kernel where `supports_forward` says no (``blocks`` is
    used only there).

    Grid: (64 rows of ``out``, 64 words of one group). A program holds its codes tile in
    registers and, per slot, accumulates ``dW [64, 64] = dy^T x`` over all tokens with
    ``wgmma`` (both operands from SMEM, 64 tokens a step), then adds each entry to its
    code's bucket with ``2**bits`` selects and row sums: ``dW`` never leaves registers. XLA
    sums the partials of a group's chunks ([chunks, 2**bits, out] f32, small). The token
    loop is not pipelined yet (one copy in flight)."""
    out, groups, nc = codebook.shape
    if not supports_forward(x2.dtype, out, cols, bits):
        return triton.dcodebook(x2, dy2, codebook, codes, bits, cols, interpret, blocks)
    m = x2.shape[0]
    slots = 32 // bits
    lanes = cols // slots
    mp = round_up(m, _M_STEP)
    # Padded tokens are zero in both operands: they add nothing.
    xs = jnp.pad(x2, ((0, mp - m), (0, 0))).reshape(mp, groups, lanes, slots).transpose(3, 0, 1, 2)
    xs = xs.reshape(slots, mp, groups * lanes)
    dyt = jnp.pad(dy2.astype(x2.dtype), ((0, mp - m), (0, 0))).T
    partials = _dcodebook_call(dyt, xs, codes.reshape(out, groups * lanes), bits=bits, interpret=interpret)
    per_group = partials.reshape(groups, lanes // _WORDS, nc, out).sum(axis=1)
    return per_group.transpose(2, 0, 1).astype(codebook.dtype)
