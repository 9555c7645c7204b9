"""Mosaic GPU (``plgpu``, Hopper and newer) kernels of the sketched matmul: forward, dx and
the codebook gradient.

All three work in slot order (`pallas_kernels.slots`): a program owns 64 rows of ``W_hat``
(one warpgroup, the wgmma M side) and rebuilds them ``[64, chunk]`` word-lanes at a time
from a tile of codes in tiled, swizzled SMEM (read into registers in the WGMMA layout) and
the rows' codebook entries, one slot at a time, with shifts, masks and a tree of selects
(no gather, which Mosaic GPU cannot lower). A K step is ``chunk`` (16, 32 or 64) word-lanes
of one group, fitted to shared memory (`_fit`). ``W_hat`` never reaches HBM.

* `forward`: ``y^T [out, m] = W_hat @ x^T``. The slot's weight tile is the *register*
  operand of ``wgmma`` and the activations (slot order, transposed by XLA) the SMEM one;
  the K loop is a `plgpu.emit_pipeline` over chunks.
* `dx`: ``dx_s [m, lanes] = dy @ W_s`` for each slot ``s``, a grid axis. ``W_s`` is wgmma's
  B operand, which must sit in SMEM: the tile is rebuilt in registers and stored there.
  The N loop (rows of ``W_hat``, 64 a step) is pipelined; ``dx`` leaves in slot order.
* `dcodebook`: per slot, ``dW [64 rows, chunk] = dy^T x`` over all tokens (both operands
  pipelined through SMEM), summed into each row's ``2**bits`` buckets in registers.

Coverage: 2, 3 and 4 bits and any shape: rows are padded to 64, each group's word-lanes to
the chunk and the tokens to the tile (zero codes meet zero activations), so the codes are
copied once per call when a shape needs padding and for 3 bits (bit planes moved apart);
the codebook is transposed to ``f32 [groups, 2**bits, rows]``. Activations must be 16-bit
(wgmma takes bf16/f16): `supports` says so, and float32 goes to the Triton kernels.
`dequantize` has no Mosaic GPU kernel (``sketched_matmul`` takes Triton's).

The Mosaic GPU interpreter of jax 0.10.2 (`interpret_params`) runs all three kernels with
their pipelines and tiled, swizzled SMEM. Two constructs cannot run there, each isolated
in one helper that does the same arithmetic without it when interpreting:

* layout annotations (`_layout`): ``layout_cast_p`` has no CPU rule, and ``plgpu.load``
  (``load_p`` plus a cast) is not intercepted, so its abstract eval meets an allocation key
  instead of a ref. A layout only says which thread holds which element.
* ``wgmma`` with a register operand (`_mma_from_registers`): the interpreter reads both
  operands as SMEM allocations, so the forward's weight tile is stored to SMEM first there.

All three lower with ``jax.export(..., platforms=["cuda"])`` to ``mosaic_gpu_v2`` calls; none has
been compiled on a GPU yet (`bench/gpu_check.sh` does), so the automatic backend does not
pick them (`pallas_kernels.backends`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import triton
from pallas_kernels._common import pad2, round_up
from pallas_kernels.block_sizes import DcodebookBlockSizes, DxBlockSizes, ForwardBlockSizes
from pallas_kernels.slots import SlotLayout, select, slot_bits, slot_codes

_ROWS = 64  # rows of W_hat a program: one warpgroup, the wgmma M side
_STEP = 64  # tokens a step of dcodebook and a program of dx (wgmma K and M); rows a step of dx
_CHUNKS = (64, 32, 16)  # word-lanes a K step may take (wgmma K of the forward: >= 16)
_STAGE_BYTES = 88 * 1024  # SMEM per pipeline stage; two stages and the output tile fit in 227 KiB
_ITEMSIZE = 2  # bytes of an activation: wgmma takes 16-bit operands (`supports`)
_ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)


def interpret_params():
    """The Mosaic GPU interpreter's parameters. With `reset_interpreter`, the one import of a
    private jax module: jax 0.10.2 exports ``InterpretGPUParams`` nowhere public."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def reset_interpreter() -> None:
    """Clears the interpreter's simulated GPU, as it must be after a kernel raised in it."""
    from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()


def supports(x_dtype) -> bool:
    """Whether the Mosaic GPU kernels take activations of ``x_dtype`` (else Triton's run)."""
    return jnp.dtype(x_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ------------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class _GpuLayout(SlotLayout):
    """`SlotLayout` with each group's word-lanes padded to whole K steps of ``chunk``."""

    chunk: int = 64

    @property
    def lanes_pad(self) -> int:
        return round_up(self.lanes, self.chunk)

    @property
    def chunks_per_group(self) -> int:
        return self.lanes_pad // self.chunk

    @property
    def chunks(self) -> int:
        return self.groups * self.chunks_per_group

    def group_of(self, k):
        """The group of K step ``k`` (a program id: ``lax.div``, no sign handling)."""
        return lax.div(k, self.chunks_per_group)


def _fit(bits: int, groups: int, cols: int, want_cols: int | None, stage_bytes) -> _GpuLayout:
    """The layout with the widest chunk that is at most ``want_cols`` input features
    (``None``: no bound), leaves at most 15 lanes of padding a group and whose pipeline
    stage, ``stage_bytes(layout)``, fits `_STAGE_BYTES` (else the narrowest chunk)."""
    base = SlotLayout(bits, groups, cols)
    want = base.lanes * base.slots if want_cols is None else want_cols
    for chunk in _CHUNKS:
        layout = _GpuLayout(bits, groups, cols, chunk)
        fits = stage_bytes(layout) <= _STAGE_BYTES and layout.lanes_pad == round_up(base.lanes, 16)
        if fits and chunk * base.slots <= max(want, 16 * base.slots):
            return layout
    return _GpuLayout(bits, groups, cols, _CHUNKS[-1])


def _codebook(codebook: jax.Array, rows: int) -> jax.Array:
    """``[out, groups, 2**bits]`` -> ``f32 [groups, 2**bits, rows]``, zero rows past ``out``."""
    cb = codebook.astype(jnp.float32).transpose(1, 2, 0)
    return jnp.pad(cb, ((0, 0), (0, 0), (0, rows - cb.shape[2])))


def _swizzled(minor: int, dtype) -> tuple:
    """Tiling and swizzle of an SMEM tile whose minor dimension is a multiple of ``minor``
    elements: the widest swizzle (<= 128 bytes) that ``minor`` elements fill. Both operands
    of a wgmma must share it, and its width in elements must divide the contraction."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


# ------------------------------------------------------------------- in-kernel helpers


def _layout(x: jax.Array, layout, interpret: bool) -> jax.Array:
    """``x`` annotated with a register layout; unannotated when interpreting, where
    ``layout_cast_p`` has no rule (a layout places elements, it does not change them)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def _mma_from_registers(acc_ref, w: jax.Array, b_ref, stage_ref) -> None:
    """``acc += w @ b`` with ``w [64, K]`` in registers. ``stage_ref`` is ``None`` when
    compiled; interpreted, ``w`` goes through it (SMEM, shaped like ``w``), because the
    interpreter's wgmma reads its A operand as an SMEM allocation, never from registers."""
    if stage_ref is None:
        plgpu.wgmma(acc_ref, w, b_ref)
        return
    stage_ref[...] = w
    plgpu.commit_smem()
    plgpu.wgmma(acc_ref, stage_ref, b_ref)


def _tile_inputs(codes_ref, cb_ref, layout: SlotLayout, interpret: bool):
    """The packed words of a ``[planes, 64, chunk]`` codes tile (one ``[64, chunk]`` array a
    plane, WGMMA layout) and the 64 rows' codebook entries (``cb_ref [1, 2**bits, 64]``)
    broadcast to ``[64, chunk]``: what `select` takes, for any slot."""
    words = [codes_ref[p] for p in range(layout.planes)]
    entries = [
        lax.broadcast_in_dim(_layout(cb_ref[0, c], _ROW_LAYOUT, interpret), words[0].shape, (0,))
        for c in range(2**layout.bits)
    ]
    return words, entries


def _pipelined(step, steps: int, in_specs: list, *operands) -> None:
    """Runs ``step(index, *smem_refs)`` over ``steps`` blocks of ``operands`` (GMEM refs), the
    next step's blocks copied into the second of two SMEM stages while it computes."""
    plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=2)(*operands)


def _weight_specs(layout: _GpuLayout, codebook_map, codes_map) -> list:
    """BlockSpecs of a step's codebook ``[1, 2**bits, 64]`` and codes ``[planes, 64, chunk]``
    blocks (the codes in tiled, swizzled SMEM: one WGMMA-layout load a plane)."""
    return [
        plgpu.BlockSpec((1, 2**layout.bits, _ROWS), codebook_map),
        plgpu.BlockSpec(
            (layout.planes, _ROWS, layout.chunk), codes_map, transforms=_swizzled(layout.chunk, jnp.uint32)
        ),
    ]


def _rows(j) -> pl.Slice:
    return pl.ds(j * _ROWS, _ROWS)


def _store(o_smem, value: jax.Array, o_gmem) -> None:
    """Writes ``value`` to ``o_gmem`` through ``o_smem`` (TMA) and waits for the copy."""
    o_smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)


def _kernel(body, out_type, grid, grid_names, scratch, interpret: bool):
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        scratch_types=scratch,
        interpret=interpret_params() if interpret else False,
    )


# ----------------------------------------------------------------------------- forward


def _forward_call(xs, cb, codes, *, layout: _GpuLayout, tokens: int, interpret: bool):
    """``y^T f32 [rows, mp]`` of ``xs [slots, groups * lanes_pad, mp]`` (slot order,
    transposed), ``cb [groups, 2**bits, rows]`` and ``codes [planes, rows, groups * lanes_pad]``."""
    rows, mp, dtype, chunk = codes.shape[1], xs.shape[2], xs.dtype, layout.chunk
    operand = _swizzled(min(tokens, chunk), dtype)

    def body(x_gmem, cb_gmem, codes_gmem, o_gmem, o_smem, w_smem):
        j, i = lax.axis_index("n"), lax.axis_index("m")

        def with_acc(acc_ref):
            def step(_, x_ref, cb_ref, codes_ref):
                words, entries = _tile_inputs(codes_ref, cb_ref, layout, interpret)
                for s in range(layout.slots):
                    w = select(slot_bits(words, s, layout.bits), entries).astype(dtype)
                    _mma_from_registers(acc_ref, w, x_ref.at[s], w_smem)
                # The SMEM stages are refilled by the next steps: drain the MMAs first.
                plgpu.wgmma_wait(0)

            _pipelined(
                step,
                layout.chunks,
                [
                    plgpu.BlockSpec((layout.slots, chunk, tokens), lambda k: (0, k, 0), transforms=operand),
                    *_weight_specs(layout, lambda k: (layout.group_of(k), 0, 0), lambda k: (0, 0, k)),
                ],
                x_gmem.at[:, :, pl.ds(i * tokens, tokens)],
                cb_gmem.at[:, :, _rows(j)],
                codes_gmem.at[:, _rows(j), :],
            )
            _store(o_smem, acc_ref[...], o_gmem.at[_rows(j), pl.ds(i * tokens, tokens)])

        pl.run_scoped(with_acc, plgpu.ACC((_ROWS, tokens), jnp.float32))

    scratch = dict(
        o_smem=plgpu.SMEM((_ROWS, tokens), jnp.float32, transforms=_swizzled(tokens, jnp.float32)),
        w_smem=plgpu.SMEM((_ROWS, chunk), dtype, transforms=operand) if interpret else None,
    )
    out_type = jax.ShapeDtypeStruct((rows, mp), jnp.float32)
    return _kernel(body, out_type, (rows // _ROWS, mp // tokens), ("n", "m"), scratch, interpret)(xs, cb, codes)


def _forward_stage_bytes(tokens: int):
    """SMEM of one forward pipeline stage (activations, codes, codebook) for ``tokens``."""

    def stage(layout: _GpuLayout) -> int:
        x = layout.slots * layout.chunk * tokens * _ITEMSIZE
        return x + 4 * _ROWS * (layout.planes * layout.chunk + 2**layout.bits)

    return stage


def _fit_forward(bits: int, groups: int, cols: int, m: int, blocks: ForwardBlockSizes) -> tuple[_GpuLayout, int]:
    """The forward's layout and tokens per program: ``blocks.mosaic_gpu(m)``, the tokens
    halved (down to 16) until a pipeline stage fits `_STAGE_BYTES`."""
    tokens, want_cols = blocks.mosaic_gpu(m)
    while True:
        stage = _forward_stage_bytes(tokens)
        layout = _fit(bits, groups, cols, want_cols, stage)
        if tokens == 16 or stage(layout) <= _STAGE_BYTES:
            return layout, tokens
        tokens //= 2


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def forward(x2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: ForwardBlockSizes):
    """``x2 [m, in] @ W_hat.T -> [m, out]`` in ``x2.dtype`` (fp32 accumulation); Triton's
    kernel where `supports` says no. Tokens per program and the K step from ``blocks``
    (`ForwardBlockSizes.mosaic_gpu`), narrowed until a pipeline stage fits SMEM."""
    if not supports(x2.dtype):
        return triton.forward(x2, codebook, codes, bits, cols, interpret, blocks)
    m = x2.shape[0]
    out, groups, _ = codebook.shape
    layout, tokens = _fit_forward(bits, groups, cols, m, blocks)
    rows, mp = round_up(out, _ROWS), round_up(m, tokens)
    xs = layout.to_slots(x2, mp, layout.lanes_pad).transpose(0, 2, 1)
    yt = _forward_call(
        xs,
        _codebook(codebook, rows),
        layout.codes(codes, rows, layout.lanes_pad),
        layout=layout,
        tokens=tokens,
        interpret=interpret,
    )
    return yt[:out, :m].T.astype(x2.dtype)


# ---------------------------------------------------------------------------------- dx


def _dx_call(dy, cb, codes, *, layout: _GpuLayout, interpret: bool):
    """``dx f32-accumulated, dy.dtype [slots, mp, groups * lanes_pad]`` (slot order) of
    ``dy [mp, rows]``, ``cb [groups, 2**bits, rows]`` and ``codes [planes, rows, ...]``."""
    mp, rows = dy.shape
    dtype, chunk = dy.dtype, layout.chunk

    def body(dy_gmem, cb_gmem, codes_gmem, o_gmem, w_smem, o_smem):
        i, k, s = lax.axis_index("m"), lax.axis_index("k"), lax.axis_index("s")

        def with_acc(acc_ref):
            def step(_, dy_ref, cb_ref, codes_ref):
                words, entries = _tile_inputs(codes_ref, cb_ref, layout, interpret)
                w_smem[...] = select(slot_bits(words, s, layout.bits), entries).astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, dy_ref, w_smem)
                # w_smem and the SMEM stages are rewritten by the next step.
                plgpu.wgmma_wait(0)

            _pipelined(
                step,
                rows // _ROWS,
                [
                    plgpu.BlockSpec((_STEP, _ROWS), lambda r: (0, r), transforms=_swizzled(chunk, dtype)),
                    *_weight_specs(layout, lambda r: (0, 0, r), lambda r: (0, r, 0)),
                ],
                dy_gmem.at[pl.ds(i * _STEP, _STEP), :],
                cb_gmem.at[pl.ds(layout.group_of(k), 1), :, :],
                codes_gmem.at[:, :, pl.ds(k * chunk, chunk)],
            )
            _store(o_smem, acc_ref[...].astype(dtype), o_gmem.at[s, pl.ds(i * _STEP, _STEP), pl.ds(k * chunk, chunk)])

        pl.run_scoped(with_acc, plgpu.ACC((_STEP, chunk), jnp.float32))

    tile = dict(transforms=_swizzled(chunk, dtype))
    scratch = dict(w_smem=plgpu.SMEM((_STEP, chunk), dtype, **tile), o_smem=plgpu.SMEM((_STEP, chunk), dtype, **tile))
    out_type = jax.ShapeDtypeStruct((layout.slots, mp, layout.groups * layout.lanes_pad), dtype)
    grid = (mp // _STEP, layout.chunks, layout.slots)
    return _kernel(body, out_type, grid, ("m", "k", "s"), scratch, interpret)(dy, cb, codes)


def _dx_stage_bytes(layout: _GpuLayout) -> int:
    """SMEM of one dx pipeline stage: ``dy``, codes and codebook blocks."""
    return _STEP * _STEP * _ITEMSIZE + 4 * _STEP * (layout.planes * layout.chunk + 2**layout.bits)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dx(dy2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: DxBlockSizes):
    """``dy2 [m, out] @ W_hat -> [m, in]`` in ``dy2.dtype`` (fp32 accumulation); Triton's
    kernel where `supports` says no.

    Grid: (64 tokens, K chunk, slot). A program rebuilds its slot's ``[64 rows, chunk]``
    weight tile for every 64 rows of ``W_hat`` and multiplies ``dy`` by it (``wgmma``, both
    operands in SMEM); XLA turns the slot-order result back into columns."""
    if not supports(dy2.dtype):
        return triton.dx(dy2, codebook, codes, bits, cols, interpret, blocks)
    m = dy2.shape[0]
    out, groups, _ = codebook.shape
    layout = _fit(bits, groups, cols, blocks.mosaic_gpu(), _dx_stage_bytes)
    rows, mp = round_up(out, _ROWS), round_up(m, _STEP)
    # dy's padded rows and columns are zero; so are the codebook rows the columns meet.
    dxs = _dx_call(
        pad2(dy2, mp, rows),
        _codebook(codebook, rows),
        layout.codes(codes, rows, layout.lanes_pad),
        layout=layout,
        interpret=interpret,
    )
    return layout.from_slots(dxs, m, layout.lanes_pad)


# --------------------------------------------------------------------------- dcodebook


def _dcodebook_call(dyt, xs, codes, *, layout: _GpuLayout, interpret: bool):
    """Per-chunk codebook-gradient partials ``f32 [chunks, 2**bits, rows]`` of ``dyt [rows,
    mp]``, ``xs [slots, mp, groups * lanes_pad]`` (slot order) and ``codes [planes, rows, ...]``."""
    rows, mp = dyt.shape
    dtype, chunk, nc = dyt.dtype, layout.chunk, 2**layout.bits

    def body(dyt_gmem, xs_gmem, codes_gmem, o_gmem, codes_smem, o_smem, barrier):
        j, k = lax.axis_index("n"), lax.axis_index("k")
        lanes = pl.ds(k * chunk, chunk)
        plgpu.copy_gmem_to_smem(codes_gmem.at[:, _rows(j), lanes], codes_smem, barrier)
        plgpu.barrier_wait(barrier)
        words = [codes_smem[p] for p in range(layout.planes)]

        def slot(s, sums):
            def slot_dw(acc_ref):
                def step(_, dy_ref, x_ref):
                    plgpu.wgmma(acc_ref, dy_ref, x_ref)
                    # The SMEM stages are refilled by the next steps: drain the MMA first.
                    plgpu.wgmma_wait(0)

                _pipelined(
                    step,
                    mp // _STEP,
                    [
                        plgpu.BlockSpec((_ROWS, _STEP), lambda t: (0, t), transforms=_swizzled(chunk, dtype)),
                        plgpu.BlockSpec((_STEP, chunk), lambda t: (t, 0), transforms=_swizzled(chunk, dtype)),
                    ],
                    dyt_gmem.at[_rows(j), :],
                    xs_gmem.at[s, :, lanes],
                )
                return acc_ref[...]

            dw = pl.run_scoped(slot_dw, plgpu.ACC((_ROWS, chunk), jnp.float32))
            code = slot_codes(words, s, layout.bits)
            # Bucket sums per row: a select and a row reduction per code value (no scatter).
            return tuple(sums[q] + jnp.sum(jnp.where(code == jnp.uint32(q), dw, 0.0), axis=1) for q in range(nc))

        zero = _layout(jnp.zeros((_ROWS,), jnp.float32), _ROW_LAYOUT, interpret)
        sums = lax.fori_loop(0, layout.slots, slot, (zero,) * nc)
        for q in range(nc):
            o_smem[q] = sums[q]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[k, :, _rows(j)])
        plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        codes_smem=plgpu.SMEM((layout.planes, _ROWS, chunk), jnp.uint32, transforms=_swizzled(chunk, jnp.uint32)),
        o_smem=plgpu.SMEM((nc, _ROWS), jnp.float32),
        barrier=plgpu.Barrier(num_arrivals=1),
    )
    out_type = jax.ShapeDtypeStruct((layout.chunks, nc, rows), jnp.float32)
    return _kernel(body, out_type, (rows // _ROWS, layout.chunks), ("n", "k"), scratch, interpret)(dyt, xs, codes)


def _dcodebook_stage_bytes(layout: _GpuLayout) -> int:
    """SMEM of one dcodebook pipeline stage (``dy^T`` and ``x`` blocks) and the codes tile."""
    return _STEP * (_ROWS + layout.chunk) * _ITEMSIZE + 4 * _ROWS * layout.planes * layout.chunk


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dcodebook(x2, dy2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: DcodebookBlockSizes):
    """The codebook gradient ``[out, groups, 2**bits]`` (``codebook.dtype``) of ``x2 [m, in]``
    and ``dy2 [m, out]``; Triton's kernel where `supports` says no.

    Grid: (64 rows, K chunk). A program holds its codes tile in registers and, per slot,
    accumulates ``dW [64, chunk] = dy^T x`` over all tokens with ``wgmma`` (both operands
    pipelined through SMEM), then adds each entry to its code's bucket with ``2**bits``
    selects and row sums: ``dW`` never leaves registers. XLA sums a group's chunks."""
    if not supports(x2.dtype):
        return triton.dcodebook(x2, dy2, codebook, codes, bits, cols, interpret, blocks)
    m = x2.shape[0]
    out, groups, nc = codebook.shape
    layout = _fit(bits, groups, cols, blocks.mosaic_gpu(), _dcodebook_stage_bytes)
    rows, mp = round_up(out, _ROWS), round_up(m, _STEP)
    # Padded tokens are zero in both operands, padded rows in dy: they add nothing.
    partials = _dcodebook_call(
        pad2(dy2.astype(x2.dtype), mp, rows).T,
        layout.to_slots(x2, mp, layout.lanes_pad),
        layout.codes(codes, rows, layout.lanes_pad),
        layout=layout,
        interpret=interpret,
    )
    per_group = partials.reshape(groups, layout.chunks_per_group, nc, rows).sum(axis=1)
    return per_group[:, :, :out].transpose(2, 0, 1).astype(codebook.dtype)
