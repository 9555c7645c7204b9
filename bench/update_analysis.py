"""How well a low-rank update and a sketch-space update capture a full fine-tune (paper Fig. 1 / App. B).

    python bench/update_analysis.py DENSE FINETUNED --sketch SKETCH_DIR \
        --out bench/results/update-analysis/update-analysis.json

DENSE and FINETUNED are model refs `sketchtune_jax.load_any` takes (HF directory, GGUF,
``smollm2-135m``); SKETCH_DIR is a sketch of DENSE (``sketchtune sketch``). For every
sketched projection, ΔW = W_finetuned - W_dense ``[out, in]`` is approximated two ways
with the same number of parameters:

- rank r (truncated SVD, the best rank-r approximation by Eckart-Young), with
  ``r = round(out * groups * 2**bits / (in + out))``, at least 1;
- the sketch space: codes fixed by the sketch, one additive value per (row, group, code)
  cell, ``out * groups * 2**bits`` parameters, fitted by least squares.

Reported per projection and per layer type (q, k, v, o, gate, up, down): the relative
Frobenius error ``||ΔW - approx||_F / ||ΔW||_F`` of each; JSON, and a PNG bar chart when
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _common import report, result_header

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def equal_param_rank(rows: int, cols: int, groups: int, bits: int) -> int:
    """The LoRA-style rank whose ``r * (rows + cols)`` is closest to the sketch's ``rows * groups * 2**bits``."""
    return max(1, round(rows * groups * 2**bits / (rows + cols)))


def svd_relative_error(delta: np.ndarray, rank: int) -> float:
    """``||ΔW - ΔW_r||_F / ||ΔW||_F`` of the best rank-``rank`` approximation: the norm of the tail
    singular values over the norm of all of them (float64)."""
    s = np.linalg.svd(np.asarray(delta, np.float64), compute_uv=False)
    total = np.sqrt(np.sum(s**2))
    return float(np.sqrt(np.sum(s[rank:] ** 2)) / total) if total > 0 else 0.0


def low_rank_approximation(delta: np.ndarray, rank: int) -> np.ndarray:
    """``U_r S_r V_r^T``, the truncated SVD of ``delta`` (float64)."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def sketch_space_update(delta: np.ndarray, codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Best additive codebook update for fixed codes, and the matrix it makes.

    ``delta [out, in]``, ``codes [out, groups, in // groups]`` ints in ``[0, n_codes)``. Returns
    ``(update [out, groups, n_codes], approx [out, in])``, float64, ``approx[r, j] =
    update[r, j // cols, codes[r, j]]``. Each entry of ``delta`` belongs to exactly one
    (row, group, code) cell and each cell has one free value, so the least-squares problem splits
    into one per cell, whose optimum is the cell's mean; cells with no entries get 0.
    """
    rows, groups, cols = codes.shape
    if delta.shape != (rows, groups * cols):
        raise ValueError(f"delta {delta.shape} does not match codes {codes.shape}")
    cell = (np.arange(rows * groups).reshape(rows, groups, 1) * n_codes + codes.astype(np.int64)).ravel()
    size = rows * groups * n_codes
    sums = np.bincount(cell, weights=np.asarray(delta, np.float64).ravel(), minlength=size)
    counts = np.bincount(cell, minlength=size)
    update = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return update.reshape(rows, groups, n_codes), update[cell].reshape(rows, groups * cols)


def relative_error(delta: np.ndarray, approx: np.ndarray) -> float:
    """``||delta - approx||_F / ||delta||_F`` (0 when delta is 0)."""
    norm = np.linalg.norm(delta)
    return float(np.linalg.norm(delta - approx) / norm) if norm > 0 else 0.0


def analyse_updates(dense, finetuned, sketched) -> dict:
    """Per projection and per layer type, the rank-r and sketch-space errors of ΔW (see the module docstring).

    ``dense`` and ``finetuned`` are NNX models with `Linear` projections of the same shapes;
    ``sketched`` holds a `SketchedLinear` under the same dotted name for each projection analysed.
    """
    from pallas_kernels.packing import unpack_codes
    from sketchtune_jax._utils.module_paths import get_submodule, iter_modules
    from sketchtune_jax.layers import SketchedLinear

    modules = list(iter_modules(sketched, SketchedLinear))
    if not modules:
        raise ValueError("the sketch has no SketchedLinear modules")
    per_module = {}
    for name, sk in modules:
        w_dense = np.asarray(get_submodule(dense, name).weight[...], np.float64)
        w_ft = np.asarray(get_submodule(finetuned, name).weight[...], np.float64)
        if w_dense.shape != w_ft.shape or w_dense.shape != (sk.out_features, sk.in_features):
            raise ValueError(
                f"{name}: dense {w_dense.shape}, fine-tuned {w_ft.shape} and sketch "
                f"{(sk.out_features, sk.in_features)} differ; are they the same model?"
            )
        delta = w_ft - w_dense
        codes = np.asarray(unpack_codes(np.asarray(sk.codes[...]), sk.bits, sk.in_features // sk.groups))
        rank = equal_param_rank(sk.out_features, sk.in_features, sk.groups, sk.bits)
        _, approx = sketch_space_update(delta, codes, 2**sk.bits)
        per_module[name] = {
            "type": name.rsplit(".", 1)[-1],
            "shape": list(delta.shape),
            "delta_norm": float(np.linalg.norm(delta)),
            "sketch_params": sk.out_features * sk.groups * 2**sk.bits,
            "rank": rank,
            "rank_params": rank * (sk.out_features + sk.in_features),
            "svd_error": svd_relative_error(delta, rank),
            "sketch_error": relative_error(delta, approx),
        }
    per_type = {}
    for layer_type in sorted({m["type"] for m in per_module.values()}, key=_type_order):
        rows = [m for m in per_module.values() if m["type"] == layer_type]
        norms = np.asarray([m["delta_norm"] for m in rows])
        total = np.sqrt(np.sum(norms**2))

        def pooled(key):
            # Error of the whole type's stacked ΔW: per-module errors weighted by their ΔW's norm.
            errs = np.asarray([m[key] for m in rows])
            return float(np.sqrt(np.sum((errs * norms) ** 2)) / total) if total > 0 else 0.0

        per_type[layer_type] = {
            "modules": len(rows),
            "rank": sorted({m["rank"] for m in rows}),
            "sketch_params": rows[0]["sketch_params"],
            "rank_params": rows[0]["rank_params"],
            "svd_error_mean": float(np.mean([m["svd_error"] for m in rows])),
            "sketch_error_mean": float(np.mean([m["sketch_error"] for m in rows])),
            "svd_error_pooled": pooled("svd_error"),
            "sketch_error_pooled": pooled("sketch_error"),
        }
    return {"per_type": per_type, "per_module": per_module}


def _type_order(layer_type: str) -> int:
    return LAYER_TYPES.index(layer_type) if layer_type in LAYER_TYPES else len(LAYER_TYPES)


def plot(result: dict, path: Path, title: str) -> bool:
    """Bar chart of the mean errors per layer type; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    types = list(result["per_type"])
    x = np.arange(len(types))
    svd = [result["per_type"][t]["svd_error_mean"] for t in types]
    sk = [result["per_type"][t]["sketch_error_mean"] for t in types]
    ranks = ["/".join(str(r) for r in result["per_type"][t]["rank"]) for t in types]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, svd, 0.4, label="best rank r (SVD)")
    ax.bar(x + 0.2, sk, 0.4, label="sketch space (codes fixed)")
    ax.set_xticks(x, [f"{t.removesuffix('_proj')}\nr={r}" for t, r in zip(types, ranks)])
    ax.set_ylabel("||ΔW - approx||_F / ||ΔW||_F")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dense", help="the dense model: HF directory, GGUF file or 'smollm2-135m'")
    parser.add_argument("finetuned", help="its fully fine-tuned version (same architecture)")
    parser.add_argument("--sketch", required=True, help="a sketched directory of the dense model")
    parser.add_argument("--out", required=True, help="JSON file to write; the plot goes beside it as .png")
    args = parser.parse_args(argv)

    from sketchtune_jax.io.loading import load_any
    from sketchtune_jax.io.sketched_dir import is_sketched_dir

    for ref in (args.dense, args.finetuned):
        if is_sketched_dir(ref):
            parser.error(f"{ref} is a sketched directory; DENSE and FINETUNED must be dense models")
    if not is_sketched_dir(args.sketch):
        parser.error(f"--sketch {args.sketch} is not a sketched directory (make one with `sketchtune sketch`)")
    out = Path(args.out)
    if out.suffix != ".json":
        parser.error(f"--out must end in .json, got {out}")

    dense, finetuned, sketched = (load_any(ref).model for ref in (args.dense, args.finetuned, args.sketch))
    result = analyse_updates(dense, finetuned, sketched)
    result = {
        **result_header(__file__, argv),
        "dense": args.dense,
        "finetuned": args.finetuned,
        "sketch": args.sketch,
        **result,
    }
    png = out.with_suffix(".png")
    if not plot(result, png, f"ΔW of {Path(args.finetuned).name} vs {Path(args.dense).name}"):
        print("info: matplotlib is not installed; no plot written", file=sys.stderr)
        png = None
    per_type = {
        t: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        for t, row in result["per_type"].items()
    }
    report(result, out, summary={"json": str(out), "png": str(png) if png else None, "per_type": per_type})
    return 0


if __name__ == "__main__":
    sys.exit(main())
