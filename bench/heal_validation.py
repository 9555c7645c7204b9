"""Heal variants of one sketch, each scored on validation windows: how heal settings are chosen.

    python bench/heal_validation.py runs/quality/int3-g4-lt32 --teacher smollm2-135m \\
        --variant "h32=--steps 32 --batch-size 2" --variant "h32-norms=--steps 32 --batch-size 2 --train-norms" \\
        --runs runs/quality/val-runs --out bench/results/healing/heal-validation-int3-smollm2-135m-cpu.json

Each ``--variant NAME=FLAGS`` is one ``sketchtune heal SKETCH --teacher T --calib TEXT
--calib-range CALIB --out RUNS/NAME FLAGS``; the healed sketch, the unhealed one and the teacher
are then scored by ``sketchtune eval ppl --text TEXT --text-range VAL``. The validation range
must not meet the calibration range, and the test windows (the text's start, where
``bench/quality.py`` measures) should lie outside both, so that the settings are never chosen
on the figures they are reported with. Results are written after every variant; a rerun skips
finished variants and finishes an interrupted heal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
from pathlib import Path

from _common import WIKITEXT, progress, report, result_header, run_cli, write_result

HEAL_SETTINGS = ("steps", "batch_size", "seq_len", "lr", "schedule", "warmup_steps", "train_norms", "seed")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"NAME=FLAGS"`` as ``(NAME, [flag, ...])``; ValueError for a spec without a name."""
    name, sep, flags = spec.partition("=")
    if not sep or not name or "/" in name:
        raise ValueError(f"--variant must be NAME=FLAGS with a plain NAME, got {spec!r}")
    return name, shlex.split(flags)


def val_ppl(model: str, args: argparse.Namespace) -> float:
    """Perplexity of ``model`` on the validation windows, kept in ``--runs`` (a rerun reads it back)."""
    where = f"{args.val_range.replace(':', '-')}-{args.val_windows}x{args.val_seq_len}"
    json_path = Path(args.runs) / f"val-{Path(model).name}-{where}.json"
    if not json_path.is_file():
        argv = ["eval", "ppl", model, "--text", args.text, "--text-range", args.val_range]
        argv += ["--max-windows", str(args.val_windows), "--seq-len", str(args.val_seq_len), "--json", str(json_path)]
        with contextlib.redirect_stdout(io.StringIO()):
            run_cli(argv)
    return json.loads(json_path.read_text())["ppl"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sketch", help="the sketched directory every variant heals")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--text", default=str(WIKITEXT))
    parser.add_argument("--calib-range", default="0.5:1", help="fractions of the text the heals read")
    parser.add_argument("--val-range", default="0.25:0.5", help="fractions of the text the variants are scored on")
    parser.add_argument("--val-windows", type=int, default=20, help="validation windows")
    parser.add_argument("--val-seq-len", type=int, default=512, help="tokens per validation window")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS", help="heal flags")
    parser.add_argument("--runs", required=True, help="directory for the healed sketches and per-run JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from sketchtune_jax.io.sketched_dir import is_sketched_dir
    from sketchtune_jax.settings import fraction_range, fraction_ranges_meet

    variants = dict(parse_variant(v) for v in args.variant)
    calib, val = fraction_range(args.calib_range, "calib_range"), fraction_range(args.val_range, "val_range")
    if fraction_ranges_meet(calib, val):
        raise SystemExit(f"--val-range {args.val_range} meets --calib-range {args.calib_range}; keep them apart")
    if not is_sketched_dir(args.sketch):
        raise SystemExit(f"{args.sketch} is not a sketched directory")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(
        result_header(__file__, argv),
        what=f"heal variants of {args.sketch}, scored on {args.val_windows} x {args.val_seq_len} windows of {args.text} "
        f"from {args.val_range} (heals read {args.calib_range})",
        heal_command=f"sketchtune heal {args.sketch} --teacher {args.teacher} --calib {args.text} "
        f"--calib-range {args.calib_range} --out {runs}/NAME FLAGS",
        val_command=f"sketchtune eval ppl DIR --text {args.text} --text-range {args.val_range} "
        f"--max-windows {args.val_windows} --seq-len {args.val_seq_len}",
    )
    results["val_ppl"] = {
        "teacher": val_ppl(args.teacher, args),
        "unhealed": val_ppl(args.sketch, args),
    }
    results.setdefault("variants", {})
    for name, flags in variants.items():
        healed = runs / name
        if not is_sketched_dir(healed):
            run_cli(
                [
                    "heal",
                    args.sketch,
                    "--teacher",
                    args.teacher,
                    "--calib",
                    args.text,
                    "--calib-range",
                    args.calib_range,
                ]
                + ["--out", str(healed), *flags]
            )
        record = json.loads((healed / "sketch_config.json").read_text())["heal"]
        results["variants"][name] = {
            "flags": shlex.join(flags),
            "val_ppl": val_ppl(str(healed), args),
            **{k: record.get(k) for k in HEAL_SETTINGS},
            "first_kl": record["first_kl"],
            "final_kl": record["final_kl"],
            "seconds": record["seconds"],
            "cpu_seconds": record["cpu_seconds"],
        }
        write_result(results, out)
        progress({name: results["variants"][name]})
    rows = sorted(results["variants"].items(), key=lambda kv: kv[1]["val_ppl"])
    report(
        results,
        out,
        summary=[{"variant": name, "val_ppl": row["val_ppl"], "flags": row["flags"]} for name, row in rows],
        title=f"teacher {results['val_ppl']['teacher']:.3f}, unhealed {results['val_ppl']['unhealed']:.3f}",
    )


if __name__ == "__main__":
    main()
