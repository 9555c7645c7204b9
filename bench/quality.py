"""Perplexity of sketched models across bits x groups per row and ablations, on held-out text.

    python bench/quality.py --out bench/results/quality/quality-smollm2-cpu.json [--configs int4-g4,int4-g4-nofb]
    python bench/quality.py --configs int3-g4 --heal-steps 60 --sketched int3-g4=runs/int3 --out ...

Calibrates on windows from one part of the text (default: its second half) and
measures perplexity on the first windows of the text, so the sketch never saw the
evaluation tokens (``--eval-range 0.25:0.5``: on the first windows of that part instead,
to choose settings without looking at the test windows). One process, so programs compiled for one configuration serve
the next; results are written after every configuration and finished ones are
skipped when the command is run again. ``--heal-steps N`` adds a ``<config>-healed<N>`` row
per configuration: its codebooks distilled from the dense model (`sketchtune_jax.train.heal`) on
the calibration part of the text, with the wall and process-CPU seconds the heal took.
``--sketched NAME=DIR`` reads configuration NAME from a saved sketch instead of sketching;
``--save-dir DIR`` saves each new sketch as ``DIR/NAME`` (an interrupted one resumes there),
so that it can be healed or fine-tuned later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from _common import WIKITEXT, progress, report, result_header, write_result

# Picked on the first three layers of SmolLM2 at INT3 from 1e-4, 3e-4, 1e-3 (layer error after 32 steps, on calibration rows only).
LAYER_TUNE_LR = 1e-3

CONFIGS: dict[str, dict] = {
    **{f"int{b}-g{g}": dict(bits=b, groups_per_row=g) for b in (4, 3, 2) for g in (1, 2, 4, 8)},
    "int4-g4-nofb": dict(bits=4, groups_per_row=4, error_feedback=False),
    "int4-g4-s0": dict(bits=4, groups_per_row=4, hessian_exponent=0.0),
    "int4-g4-refit": dict(bits=4, groups_per_row=4, refit_codebook=True),
    "int4-g4-restarts4": dict(bits=4, groups_per_row=4, kmeans_restarts=4),
    "int4-g4-refit-restarts4": dict(bits=4, groups_per_row=4, refit_codebook=True, kmeans_restarts=4),
    "int4-g4-trueseq": dict(bits=4, groups_per_row=4, true_sequential=True),
    **{f"int{b}-g4-ao": dict(bits=b, groups_per_row=4, act_order=True) for b in (4, 3, 2)},
    **{
        f"int{b}-g{g}-lt{n}": dict(bits=b, groups_per_row=g, layer_tune_steps=n, layer_tune_lr=LAYER_TUNE_LR)
        for b in (4, 3, 2)
        for g in (1, 4, 8)
        for n in (16, 32, 64)
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(WIKITEXT))
    parser.add_argument("--calib-range", default="0.5:1", help="fractions of the text the calibration draws from")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument(
        "--eval-range",
        help="score on the first windows of this fraction of the text (e.g. 0.25:0.5 for validation "
        "windows when choosing settings) instead of the text's start; must not meet --calib-range",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--markdown", action="store_true", help="print the results in --out as tables and exit")
    parser.add_argument("--heal-steps", type=int, default=0, help="also heal each sketch for N steps (0: no)")
    parser.add_argument("--heal-batch-size", type=int, default=2)
    parser.add_argument("--heal-lr", type=float, default=5e-4)
    parser.add_argument(
        "--dense-from",
        help="take the dense perplexity from this earlier results JSON "
        "(same model, text and windows) instead of measuring it again",
    )
    parser.add_argument(
        "--sketched",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="take configuration NAME from this sketched directory instead of sketching it",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="k-means++ seed of new sketches; with N > 0 rows are named CONFIG-seedN"
    )
    parser.add_argument("--save-dir", help="save each new sketch in DIR/NAME, resuming an unfinished one there")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return
    from flax import nnx

    import sketchtune_jax as st
    from sketchtune_jax.data.text import text_fraction
    from sketchtune_jax.settings import fraction_range, fraction_ranges_meet

    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    sketched = dict(item.split("=", 1) for item in args.sketched)
    lo, hi = fraction_range(args.calib_range, "calib_range")
    eval_range = fraction_range(args.eval_range, "eval_range") if args.eval_range else None
    if eval_range and fraction_ranges_meet((lo, hi), eval_range):
        raise SystemExit(f"--eval-range {args.eval_range} meets --calib-range {args.calib_range}; keep them apart")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"setup": vars(args), "runs": {}}
    results.setdefault("invocations", []).append(vars(args))  # a rerun that adds rows records its own flags
    results.update(result_header(__file__, argv))

    text = st.data.text.read_text(args.text)
    if eval_range:
        text = text_fraction(text, eval_range)
    loaded = st.load_any(args.model)
    calib = st.calibration_windows(
        args.text, loaded.tokenizer, nsamples=args.nsamples, seq_len=args.seq_len, text_range=(lo, hi)
    )
    if "dense" not in results and args.dense_from:
        results["dense"] = json.loads(Path(args.dense_from).read_text())["dense"]
    if "dense" not in results:
        results["dense"] = st.perplexity(loaded.model, loaded.tokenizer, text, max_windows=args.eval_windows).ppl
    healed = lambda name: f"{name}-healed{args.heal_steps}"  # noqa: E731
    for config in names:
        name = config if args.seed == 0 else f"{config}-seed{args.seed}"
        if name in results["runs"] and (not args.heal_steps or healed(name) in results["runs"]):
            continue
        if args.save_dir and name not in sketched and st.io.sketched_dir.is_sketched_dir(Path(args.save_dir) / name):
            sketched[name] = str(Path(args.save_dir) / name)
        seed = args.seed
        if name in sketched:
            saved = json.loads((Path(sketched[name]) / "sketch_config.json").read_text())
            seed = check_saved_settings(config, sketched[name], saved.get("settings", {}))
            model = st.io.sketched_dir.load_sketched(sketched[name]).model
            sketch_report = saved["report"]
            seconds, cpu = sketch_report.get("seconds"), None
        else:
            settings = st.SketchSettings(
                calib=args.text,
                nsamples=args.nsamples,
                seq_len=args.seq_len,
                calib_range=(lo, hi),
                seed=args.seed,
                **CONFIGS[config],
            )
            start, cpu = time.perf_counter(), time.process_time()
            if args.save_dir:
                sketched[name] = str(Path(args.save_dir) / name)
                sketch_report = st.sketch_to_dir(args.model, sketched[name], settings)
                model = st.io.sketched_dir.load_sketched(sketched[name]).model
            else:
                model = nnx.clone(loaded.model)  # sketching swaps modules in place; the dense model stays as it is
                sketch_report = st.sketch_model(model, calib, settings)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if name not in results["runs"]:
            ppl = st.perplexity(model, loaded.tokenizer, text, max_windows=args.eval_windows).ppl
            results["runs"][name] = {
                **CONFIGS[config],
                "seed": seed,
                "ppl": ppl,
                "ratio": ppl / results["dense"],
                "mean_rel_output_error": sketch_report["mean_rel_output_error"],
                "sketch_seconds": seconds,
                **({"sketch_cpu_seconds": cpu} if cpu is not None else {}),
                "trainable_params": st.io.codebooks.trainable_parameter_count(model),
                "sketch_dir": sketched.get(name),
            }
            write_result(results, out)
            progress({name: results["runs"][name]})
        if args.heal_steps:
            results["runs"][healed(name)] = heal_row(
                args, model, loaded, (lo, hi), text, results["dense"], CONFIGS[config], sketched.get(name)
            )
            write_result(results, out)
            progress({healed(name): results["runs"][healed(name)]})
    report(results, out)


def check_saved_settings(config: str, sketch_dir: str, settings: dict) -> int:
    """The k-means++ seed of the sketch in ``sketch_dir``; SystemExit if its saved ``settings``
    disagree with configuration ``config`` (its row would be mislabelled)."""
    import sketchtune_jax as st

    saved = dataclasses.asdict(st.SketchSettings.from_dict(settings))
    named = dataclasses.asdict(st.SketchSettings(**CONFIGS[config]))
    varied = sorted({k for c in CONFIGS.values() for k in c})
    found = ", ".join(f"{k} {saved[k]!r} (config {named[k]!r})" for k in varied if saved[k] != named[k])
    if found:
        raise SystemExit(f"{sketch_dir} is not configuration {config}: its sketch has {found}; name the right config")
    return saved["seed"]


def heal_row(
    args, model, loaded, calib_range, text: str, dense_ppl: float, config: dict, sketch_dir: str | None
) -> dict:
    """Heal ``model`` against the dense model for ``args.heal_steps`` steps; its perplexity and costs.

    With ``--save-dir`` the sketch in ``sketch_dir`` is healed into ``<sketch_dir>-healed<N>``
    (`st.heal_to_dir`: resumable, kept for fine-tuning); otherwise ``model`` is healed in place.
    """
    import sketchtune_jax as st
    from sketchtune_jax.data.calibration import calibration_token_ids
    from sketchtune_jax.train import read_log
    from sketchtune_jax.train.heal import heal, heal_windows

    heal_settings = st.HealSettings(
        steps=args.heal_steps,
        batch_size=args.heal_batch_size,
        seq_len=args.seq_len,
        lr=args.heal_lr,
        save_every=0,
        calib_range=calib_range,
    )
    hc = heal_settings.train_config()
    if args.save_dir and sketch_dir:
        out = Path(f"{sketch_dir}-healed{args.heal_steps}")
        if not st.io.sketched_dir.is_sketched_dir(out):
            st.heal_to_dir(sketch_dir, args.model, args.text, out, heal_settings)
        record = json.loads((out / "sketch_config.json").read_text())["heal"]
        model = st.io.sketched_dir.load_sketched(out).model
        wall, cpu, steps, windows = record["seconds"], record["cpu_seconds"], record["steps"], record["windows"]
        kl = [r["loss"] for r in read_log(out / "heal_log.jsonl") if "loss" in r]
    else:
        ids = calibration_token_ids(args.text, loaded.tokenizer, text_range=calib_range)
        batches = heal_windows(ids, steps=hc.max_steps, batch_size=hc.batch_size, seq_len=hc.seq_len)
        with tempfile.TemporaryDirectory() as run:
            wall, cpu = time.perf_counter(), time.process_time()
            result = heal(model, loaded.model, batches, hc, run)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            kl = [r["loss"] for r in read_log(result.log_path) if "loss" in r]
        steps, windows = result.step, len(batches)
    ppl = st.perplexity(model, loaded.tokenizer, text, max_windows=args.eval_windows).ppl
    return {
        **config,
        "ppl": ppl,
        "ratio": ppl / dense_ppl,
        "heal_steps": steps,
        "heal_batch_size": hc.batch_size,
        "heal_seq_len": hc.seq_len,
        "heal_lr": hc.lr,
        "heal_schedule": hc.schedule,
        "heal_windows": windows,
        "heal_seconds": wall,
        "heal_cpu_seconds": cpu,
        "first_kl": kl[0],
        "final_kl": kl[-1],
        "kl_every_step": kl,
        "healed_dir": str(out) if args.save_dir and sketch_dir else None,
    }


def markdown_tables(results: dict) -> str:
    """Perplexity (and ratio to dense) by bits x groups per row, then the INT4 GPR=4 variants."""
    runs = results["runs"]
    cell = lambda r: f"{r['ppl']:.2f} ({r['ratio']:.3f}x)" if r else "not run"  # noqa: E731
    lines = ["| bits | GPR 1 | GPR 2 | GPR 4 | GPR 8 |", "|---|---|---|---|---|"]
    for b in (4, 3, 2):
        lines.append(f"| INT{b} | " + " | ".join(cell(runs.get(f"int{b}-g{g}")) for g in (1, 2, 4, 8)) + " |")
    healed_plain = {k.split("-healed")[0]: runs[k] for k in runs if "-healed" in k and "-lt" not in k}
    if healed_plain:
        lines += ["", "| bits: unhealed -> healed | GPR 1 | GPR 4 | GPR 8 |", "|---|---|---|---|"]
        for b in (4, 3, 2):
            pair = lambda g: (  # noqa: E731
                f"{cell(runs.get(f'int{b}-g{g}'))} -> {cell(healed_plain[f'int{b}-g{g}'])}"
                if f"int{b}-g{g}" in healed_plain
                else "not run"
            )
            lines.append(f"| INT{b} | " + " | ".join(pair(g) for g in (1, 4, 8)) + " |")
    healed = sorted(k for k in runs if "-healed" in k)
    if healed:
        lines += [
            "",
            "| healed | perplexity | heal steps | heal s (wall) | heal s (process CPU) |",
            "|---|---|---|---|---|",
        ]
        for key in healed:
            r = runs[key]
            lines.append(
                f"| {key} | {cell(r)} | {r['heal_steps']} | {r['heal_seconds']:.0f} | {r['heal_cpu_seconds']:.0f} |"
            )
    tuned = sorted((k for k in runs if "-lt" in k), key=lambda k: (int(k.split("-lt")[1]), k))
    if tuned:
        lines += [
            "",
            "| layer-tuned (GPR 4) | perplexity | tuning steps a layer | sketch s (wall) | sketch s (process CPU) |",
            "|---|---|---|---|---|",
        ]
        for key in tuned:
            r = runs[key]
            cpu = f"{r['sketch_cpu_seconds']:.0f}" if "sketch_cpu_seconds" in r else ""
            lines.append(
                f"| INT{r['bits']} | {cell(r)} | {r['layer_tune_steps']} | {r['sketch_seconds']:.0f} | {cpu} |"
            )
    variants = {
        "int4-g4": "full method (s = 3, error feedback, k-means++)",
        "int4-g4-nofb": "ablation: no error feedback",
        "int4-g4-s0": "ablation: s = 0 (unweighted k-means)",
        "int4-g4-refit": "+ codebook refit after the sweep",
        "int4-g4-restarts4": "+ 4 k-means++ restarts",
        "int4-g4-refit-restarts4": "+ refit and 4 restarts",
        "int4-g4-trueseq": "+ true-sequential Hessians",
    }
    lines += ["", "| INT4, GPR 4 | perplexity | mean rel. output error |", "|---|---|---|"]
    for key, label in variants.items():
        if key in runs:
            lines.append(f"| {label} | {cell(runs[key])} | {runs[key]['mean_rel_output_error']:.2e} |")
    return f"Dense: {results['dense']:.2f}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
