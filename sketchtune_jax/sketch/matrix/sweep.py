"""Sketch one weight matrix: weighted k-means codebooks plus the GPTQ-style column
sweep with error feedback (paper Algorithm 1, Section 2.3, Appendix D).

Choice of k-means weights. Eq. 15 weights parameter ``i`` by ``(1/[H⁻¹]_ii)^s``,
where (eq. 13, the Lagrangian solution of Frantar & Alistarh) ``[H⁻¹]_ii`` is the
inverse-Hessian diagonal over the weights not yet mapped when the sweep reaches
column ``i``. In the Cholesky form used here, ``H⁻¹ = Uᵀ U`` with ``U`` upper
triangular, that quantity is exactly ``d_i² = U_ii²``, and the sweep's error step is
``(w_i − q_i)/d_i``. The reference implementation (LeanQuant, on which SketchTune is
built, and where ``s = 3`` was tuned) uses ``d_i^(−s)``. We follow the reference:
``weight_i = (1/d_i)^s = (1/[H⁻¹]_ii)^(s/2)``, so the paper's ``s = 3`` means what it
meant in the released sketches; the literal reading of eq. 15 is ``s = 6`` here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sketchtune_jax.sketch.matrix.hessian import check_finite, prepare_hessian
from sketchtune_jax.sketch.matrix.kmeans import CHUNK_ELEMENTS, INITS, assign_nearest, kmeans_batched

_HIGHEST = lax.Precision.HIGHEST
BITS = (2, 3, 4)


class SketchResult(NamedTuple):
    """One sketched matrix.

    codebook: float32 ``[out, groups, 2**bits]``, each row-group's centers, ascending.
    codes: uint8 ``[out, groups, in // groups]``, index into that row-group's codebook.
    w_hat: float32 ``[out, in]``, exactly ``codebook[codes]`` laid back out as rows.
    """

    codebook: jax.Array
    codes: jax.Array
    w_hat: jax.Array


def importance_weights(hinv_upper: jax.Array, s: float) -> jax.Array:
    """k-means weights ``(1/d_i)^s`` with ``d = diag(hinv_upper)``, float32 ``[in]``.

    Computed in the log domain and scaled so the largest is 1: a large ``s`` or a tiny
    ``d_i`` would otherwise overflow float32. Only ratios matter to k-means.
    """
    logw = -s * jnp.log(jnp.diagonal(hinv_upper))
    return jnp.exp(logw - jnp.max(logw))


def group_weights(hinv_upper: jax.Array, s: jax.Array, groups: int) -> jax.Array:
    """Column weights of the Hessian-weighted k-means, ``diag(H^-1)^-s`` scaled to a maximum of 1 in
    each group: ``[groups, in / groups]`` float32 from ``hinv_upper [in, in]``."""
    d = jnp.diagonal(hinv_upper).reshape(groups, -1)
    logw = -s * jnp.log(d)
    return jnp.exp(logw - jnp.max(logw, axis=1, keepdims=True))


def problem_ids(groups: int, out: int) -> jax.Array:
    """k-means problem id of row-group ``(r, g)`` at ``[g, r]``: ``g·out + r`` (uint32).

    The same ids in both sweep modes, in any chunking and on any mesh (a device's rows
    take their columns of this), so a seed means one thing.
    """
    return jnp.arange(groups * out, dtype=jnp.uint32).reshape(groups, out)


def act_order_within_groups(h: jax.Array, groups: int) -> jax.Array:
    """Sweep order for ``act_order``: inside each contiguous column group, columns by
    descending ``H_ii`` (ties by index), as int32 ``[in]`` indices into the columns.

    Groups keep their columns, so the codebooks cover the same weights and the sketch
    keeps its size; only the order in which the sweep maps them (and so where the error
    feedback lands) changes: the columns that matter most are mapped first, while the
    most columns are left to absorb their error.
    """
    d = jnp.diagonal(jnp.asarray(h, jnp.float32)).reshape(groups, -1)
    local = jnp.argsort(-d, axis=1, stable=True)
    return (local + d.shape[1] * jnp.arange(groups)[:, None]).reshape(-1).astype(jnp.int32)


def restore_column_order(result: SketchResult, order: jax.Array) -> SketchResult:
    """Undo the column permutation ``order`` (from `act_order_within_groups`) on a
    `SketchResult` computed on ``w[:, order]``: codes and ``w_hat`` back in ``w``'s order."""
    inv = jnp.argsort(order)
    codes = result.codes.reshape(result.codes.shape[0], -1)[:, inv].reshape(result.codes.shape)
    return SketchResult(result.codebook, codes, result.w_hat[:, inv])


@functools.partial(jax.jit, static_argnames=("k", "groups", "block", "iters", "init", "chunk", "restarts"))
def _sketch_feedback(w, u, ids, seed, s, tol, *, k, groups, block, iters, init, chunk, restarts):
    out, inp = w.shape
    cpg = inp // groups
    bsz = min(block, cpg)
    n_blocks = -(-cpg // bsz)
    # Padding lets every block be a fixed-size [out, bsz] slice even when the last
    # block of the last group is short; the identity keeps d = 1 on the pad.
    wc = jnp.pad(w, ((0, 0), (0, bsz)))
    pad_idx = jnp.arange(inp, inp + bsz)
    up = jnp.pad(u, ((0, bsz), (0, bsz))).at[pad_idx, pad_idx].set(1.0)
    gw = group_weights(u, s, groups)
    codes = jnp.zeros((out, inp + bsz), jnp.int32)
    books = jnp.zeros((out, groups, k), jnp.float32)

    def group_body(g, carry):
        wc, codes, books = carry
        g0 = g * cpg
        # Every error from earlier columns has reached these columns by now: blocks
        # start at group boundaries and each block is flushed before the next.
        vals = lax.dynamic_slice_in_dim(wc, g0, cpg, axis=1)
        weights = jnp.broadcast_to(gw[g], (out, cpg))
        centers = kmeans_batched(
            vals,
            weights,
            ids[g],
            seed,
            tol,
            k=k,
            iters=iters,
            init=init,
            chunk_size=chunk,
            restarts=restarts,
        )
        books = lax.dynamic_update_slice(books, centers[:, None, :], (0, g, 0))

        def block_body(b, carry):
            wc, codes = carry
            a = g0 + b * bsz
            length = jnp.minimum(bsz, cpg - b * bsz)
            w1 = lax.dynamic_slice(wc, (0, a), (out, bsz))
            u1 = lax.dynamic_slice(up, (a, a), (bsz, bsz))
            c1 = lax.dynamic_slice(codes, (0, a), (out, bsz))

            def col_body(t, carry):
                w1, e1, c1 = carry
                col = lax.dynamic_slice_in_dim(w1, t, 1, axis=1)
                code = assign_nearest(col, centers)
                q = jnp.take_along_axis(centers, code, axis=1)
                urow = lax.dynamic_slice_in_dim(u1, t, 1, axis=0)
                err = (col - q) / urow[:, t]
                # U is upper triangular, so this touches column t and later ones only.
                w1 = w1 - err * urow
                e1 = lax.dynamic_update_slice_in_dim(e1, err, t, axis=1)
                c1 = lax.dynamic_update_slice_in_dim(c1, code, t, axis=1)
                return w1, e1, c1

            e1 = jnp.zeros((out, bsz), jnp.float32)
            w1, e1, c1 = lax.fori_loop(0, length, col_body, (w1, e1, c1))
            codes = lax.dynamic_update_slice(codes, c1, (0, a))
            # Flush the block's errors to every later column. Columns up to a+length
            # are already mapped, so updating them too is harmless and saves a mask.
            rows = lax.dynamic_slice_in_dim(up, a, bsz, axis=0)
            wc = wc - jnp.matmul(e1, rows, precision=_HIGHEST)
            return wc, codes

        wc, codes = lax.fori_loop(0, n_blocks, block_body, (wc, codes))
        return wc, codes, books

    _, codes, books = lax.fori_loop(0, groups, group_body, (wc, codes, books))
    codes = codes[:, :inp].reshape(out, groups, cpg)
    return books, codes


@functools.partial(jax.jit, static_argnames=("k", "groups", "iters", "init", "chunk", "restarts"))
def _sketch_plain(w, u, ids, seed, s, tol, *, k, groups, iters, init, chunk, restarts):
    out, inp = w.shape
    cpg = inp // groups
    vals = w.reshape(out * groups, cpg)
    weights = jnp.broadcast_to(group_weights(u, s, groups)[None], (out, groups, cpg))
    ids = ids.T.reshape(-1)
    centers = kmeans_batched(
        vals,
        weights.reshape(out * groups, cpg),
        ids,
        seed,
        tol,
        k=k,
        iters=iters,
        init=init,
        chunk_size=chunk,
        restarts=restarts,
    )
    codes = assign_nearest(vals, centers)
    return centers.reshape(out, groups, k), codes.reshape(out, groups, cpg)


@functools.partial(jax.jit, static_argnames=("groups", "passes", "chunk"))
def _refit(w, u, books, codes, *, groups, passes, chunk):
    out, inp = w.shape
    k = books.shape[-1]
    cpg = inp // groups
    # The damped H the sweep worked with, rebuilt from its factor: H = U⁻¹ U⁻ᵀ.
    uinv = jax.scipy.linalg.solve_triangular(u, jnp.eye(inp, dtype=u.dtype), lower=False)
    h = jnp.matmul(uinv, uinv.T, precision=_HIGHEST)
    hgg = h.reshape(groups, cpg, groups, cpg)[jnp.arange(groups), :, jnp.arange(groups), :]
    eye = jnp.eye(k, dtype=jnp.float32)

    def rows(args):
        w, books, codes = args
        onehots = (codes[..., None] == jnp.arange(k, dtype=codes.dtype)).astype(jnp.float32)

        def step(i, books):
            # Exact minimisation over group g's codebook with the others held: the
            # objective is quadratic in it, so one Newton step solves it.
            g = i % groups
            what = jnp.take_along_axis(books, codes, axis=2).reshape(w.shape)
            hcol = lax.dynamic_slice_in_dim(h, g * cpg, cpg, axis=1)
            grad = jnp.matmul(w - what, hcol, precision=_HIGHEST)
            o = lax.dynamic_index_in_dim(onehots, g, axis=1, keepdims=False)
            t = jnp.einsum("ij,rjb->rib", hgg[g], o, precision=_HIGHEST)
            a = jnp.einsum("ria,rib->rab", o, t, precision=_HIGHEST)
            b = jnp.einsum("ria,ri->ra", o, grad, precision=_HIGHEST)
            # A center no column uses has a zero row in A; a unit pivot leaves it put.
            unused = jnp.sum(o, axis=1) == 0
            a = a + unused[:, :, None] * eye
            delta = jnp.linalg.solve(a, b[..., None])[..., 0]
            old = lax.dynamic_index_in_dim(books, g, axis=1, keepdims=False)
            return lax.dynamic_update_index_in_dim(books, old + delta, g, axis=1)

        return lax.fori_loop(0, passes * groups, step, books)

    n_chunks = -(-out // chunk)
    pad = n_chunks * chunk - out

    def split(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    books = lax.map(rows, (split(w), split(books), split(codes)))
    books = books.reshape(n_chunks * chunk, groups, k)[:out]
    # Keep every codebook ascending, renumbering the codes to match.
    order = jnp.argsort(books, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(books, order, axis=-1), jnp.take_along_axis(rank, codes, axis=-1)


def sketch_matrix(
    w: jax.Array,
    hinv_upper: jax.Array,
    *,
    bits: int,
    groups: int,
    s: float = 3.0,
    block_size: int = 128,
    kmeans_iters: int = 100,
    kmeans_tol: float = 1e-6,
    kmeans_init: str = "kmeans++",
    kmeans_restarts: int = 1,
    seed: int = 0,
    error_feedback: bool = True,
    refit_codebook: bool = False,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> SketchResult:
    """Sketch ``w`` into per-row-group codebooks and codes (Algorithm 1).

    Args:
      w: ``[out, in]`` weight (cast to float32), dead columns already zeroed by
        `prepare_hessian`.
      hinv_upper: ``[in, in]`` upper Cholesky factor of the damped ``H⁻¹`` from
        `prepare_hessian`.
      bits: 2, 3 or 4; each codebook has ``2**bits`` entries.
      groups: contiguous column groups per row (any divisor of ``in``); each gets its
        own codebook, fitted when the sweep reaches its first column, on the weights
        as updated by the errors of all earlier columns.
      s: exponent of the k-means importance weights ``(1/U_ii)^s`` (see the module
        docstring for why ``U_ii`` and not its square); ``0`` gives unweighted k-means.
      block_size: columns whose error feedback is applied lazily as one matmul; blocks
        restart at every group boundary, so groups need not align with it.
      kmeans_iters, kmeans_tol, kmeans_init, kmeans_restarts: see `weighted_kmeans`
        (``iters``, ``tol``, ``init``, ``restarts``).
      seed: seeds the k-means++ init; the result is deterministic given it.
      error_feedback: ``False`` maps every original weight to its nearest center with
        no compensating updates (an ablation; centers then come from the original ``w``).
      refit_codebook: after the sweep, hold the codes and re-solve every row's
        codebooks for the least ``(w − ŵ) H (w − ŵ)ᵀ`` with the damped ``H`` (block
        coordinate descent over groups, each step exact); the codebook is re-sorted
        and the codes renumbered to match.
      chunk_size: row-groups solved together by k-means (bounds memory); default as
        in `weighted_kmeans`.
      mesh: split the rows over all the devices of this mesh (``out`` must be a multiple
        of their number), each device sketching its own rows under `jax.shard_map`, with
        no communication; the result comes back split by rows over the mesh. Each row
        goes through the one device's arithmetic, so the result is the one device's bit
        for bit, but for one thing: the compiler may pick another matmul kernel for the
        error-feedback flush when a device holds fewer rows (seen on CPU with
        ``block_size`` below the group width: codebooks within 1e-6, codes the same).

    Returns:
      `SketchResult` with ``codebook [out, groups, 2**bits]`` float32,
      ``codes [out, groups, in // groups]`` uint8 and ``w_hat [out, in]`` float32.

    Raises:
      ValueError: bad ``bits``/``groups``/shapes/options, or NaN/Inf in ``w`` or
        ``hinv_upper`` (the message says which).
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    w = jnp.asarray(w, jnp.float32)
    hinv_upper = jnp.asarray(hinv_upper, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"W must be [out, in], got shape {w.shape}")
    out, inp = w.shape
    if hinv_upper.shape != (inp, inp):
        raise ValueError(f"Hinv_upper must be [{inp}, {inp}] to match W, got {hinv_upper.shape}")
    if not isinstance(groups, int) or groups < 1 or inp % groups:
        raise ValueError(f"groups must be a positive divisor of in_features={inp}, got {groups}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if s < 0:
        raise ValueError(f"s must be non-negative, got {s}")
    if kmeans_init not in INITS:
        raise ValueError(f"kmeans_init must be one of {INITS}, got {kmeans_init!r}")
    check_finite(w, "W")
    check_finite(hinv_upper, "Hinv_upper")
    if kmeans_restarts < 1:
        raise ValueError(f"kmeans_restarts must be at least 1, got {kmeans_restarts}")
    opts = _RowOptions(
        k=2**bits,
        groups=groups,
        iters=kmeans_iters,
        init=kmeans_init,
        restarts=kmeans_restarts,
        block=block_size,
        chunk=chunk_size,
        error_feedback=error_feedback,
        refit=refit_codebook,
    )
    args = (jnp.uint32(seed % (1 << 32)), jnp.float32(s), jnp.float32(kmeans_tol))
    if mesh is None:
        return SketchResult(*_sketch_rows(w, hinv_upper, problem_ids(groups, out), *args, opts=opts))
    if out % mesh.size:
        raise ValueError(
            f"W's {out} rows do not split evenly over the {mesh.size} devices of the mesh; "
            f"use a mesh whose device count divides {out}"
        )
    w = jax.device_put(w, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    hinv_upper = jax.device_put(hinv_upper, NamedSharding(mesh, PartitionSpec()))
    return SketchResult(*_rows_on_mesh(mesh, opts)(w, hinv_upper, *args))


@dataclass(frozen=True)
class _RowOptions:
    """The static options of `_sketch_rows` (hashable, so they key compiled programs)."""

    k: int
    groups: int
    iters: int
    init: str
    restarts: int
    block: int
    chunk: int | None
    error_feedback: bool
    refit: bool


def sketch_weight(
    w: jax.Array,
    h: jax.Array,
    *,
    bits: int,
    groups: int,
    percdamp: float = 0.01,
    act_order: bool = False,
    **options: Any,
) -> SketchResult:
    """Sketch ``w`` ``[out, in]`` against its input Hessian ``h`` ``[in, in]``: damp and
    factor ``h`` (`prepare_hessian`), run `sketch_matrix` (``options`` are its keyword
    arguments), with ``act_order`` sweeping each group by `act_order_within_groups`.

    The result is always in ``w``'s column order (float32 codebook, uint8 codes, w_hat).
    """
    order = act_order_within_groups(h, groups) if act_order else None
    if order is not None:
        w, h = jnp.asarray(w)[:, order], jnp.asarray(h)[order][:, order]
    hinv_upper, w_prepared = prepare_hessian(h, w, percdamp=percdamp)
    result = sketch_matrix(w_prepared, hinv_upper, bits=bits, groups=groups, **options)
    return result if order is None else restore_column_order(result, order)


def _sketch_rows(
    w: jax.Array, u: jax.Array, ids: jax.Array, seed: jax.Array, s: jax.Array, tol: jax.Array, *, opts: _RowOptions
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sketch the rows ``w [rows, in]``, whose k-means problem ids are ``ids [groups, rows]``:
    ``(codebook [rows, groups, k] float32, codes [rows, groups, in // groups] uint8, w_hat [rows, in])``.

    Every row is its own problem given ``u``, so any subset of rows gets the same result
    here as within the whole matrix.
    """
    rows, inp = w.shape
    groups, k = opts.groups, opts.k
    cpg = inp // groups
    chunk = opts.chunk or max(1, min(rows, CHUNK_ELEMENTS // (cpg * k)))
    kmeans = dict(k=k, groups=groups, iters=opts.iters, init=opts.init, restarts=opts.restarts)
    if opts.error_feedback:
        books, codes = _sketch_feedback(w, u, ids, seed, s, tol, block=opts.block, chunk=chunk, **kmeans)
    else:
        books, codes = _sketch_plain(w, u, ids, seed, s, tol, chunk=min(chunk * groups, rows * groups), **kmeans)
    if opts.refit:
        passes = 1 if groups == 1 else 3
        rchunk = max(1, min(rows, CHUNK_ELEMENTS // (cpg * k)))
        books, codes = _refit(w, u, books, codes, groups=groups, passes=passes, chunk=rchunk)
    w_hat = jnp.take_along_axis(books, codes, axis=2).reshape(rows, inp)
    return books, codes.astype(jnp.uint8), w_hat


@functools.lru_cache(maxsize=32)
def _rows_on_mesh(mesh: Mesh, opts: _RowOptions) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """`_sketch_rows` compiled for ``mesh``: rows split over all its devices, ``u`` and the
    scalars replicated; each device works on its own rows with no communication."""
    axes = mesh.axis_names
    split = PartitionSpec(axes)

    def local(w, u, seed, s, tol):
        rows = w.shape[0]
        first = lax.axis_index(axes) * rows
        ids = lax.dynamic_slice_in_dim(problem_ids(opts.groups, rows * mesh.size), first, rows, axis=1)
        return _sketch_rows(w, u, ids, seed, s, tol, opts=opts)

    replicated = PartitionSpec()
    # check_vma off: the loops start from replicated zeros and carry per-device rows.
    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(split, replicated, replicated, replicated, replicated),
            out_specs=(split, split, split),
            check_vma=False,
        )
    )


@jax.jit
def _rel_err(w, w_hat, h):
    def quad(a):
        return jnp.sum(jnp.matmul(a, h, precision=_HIGHEST) * a)

    return quad(w - w_hat) / quad(w)


def relative_output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> float:
    """``tr((W−Ŵ) H (W−Ŵ)ᵀ) / tr(W H Wᵀ)``: ``‖(W−Ŵ)X‖² / ‖WX‖²`` when ``H ∝ X Xᵀ``.

    ``w``, ``w_hat``: ``[out, in]``; ``h``: ``[in, in]`` (undamped).
    """
    f32 = jnp.float32
    return float(_rel_err(jnp.asarray(w, f32), jnp.asarray(w_hat, f32), jnp.asarray(h, f32)))
