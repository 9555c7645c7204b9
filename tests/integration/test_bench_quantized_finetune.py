"""bench/quantized_finetune.py: its rows are the issue's table, its sketch commands are the recipes and
parse, its statistics are right, and bad rows are refused before any work."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "bench"))  # bench scripts import their shared module, _common, from bench/
        yield importlib.import_module("quantized_finetune")


def test_rows_are_the_papers_table_and_every_row_is_in_the_run_order(bench):
    rows = bench.all_rows()
    expected = {"lora-r64", "full"}
    expected |= {f"{m}-r64-nf{b}" for m in ("qlora", "loftq") for b in (4, 3, 2)}
    expected |= {f"sketch-int{b}-g{g}" for b in (4, 3, 2) for g in (1, 4)}
    assert set(rows) == expected == set(bench.DEFAULT_ORDER)
    assert all(len(r.lrs) >= 3 for r in rows.values())
    assert rows["loftq-r64-nf2"].loftq and rows["loftq-r64-nf2"].qtype == "nf2"
    _, _, method = bench.method_of(rows["loftq-r64-nf3"], 64, 5, 0)
    assert (method.lora.qtype, method.lora.init, method.lora.loftq_iters, method.lora.alpha) == ("nf3", "loftq", 5, 128)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_sketch_rows_run_the_recipe_command_and_it_parses(bench, bits, tmp_path):
    from sketchtune_jax.cli import build_parser

    row = bench.all_rows()[f"sketch-int{bits}-g1"]
    cmd = bench.sketch_command(row, tmp_path / "s", "text.txt")
    args = build_parser().parse_args(cmd[3:])
    assert (args.bits, args.groups_per_row, args.calib_range) == (bits, 1, "0.5:1.0")
    assert args.heal_steps == (64 if bits == 2 else 32)
    assert bool(args.act_order) == (bits == 2)


def test_bootstrap_stderr_of_a_perplexity_matches_the_delta_method(bench):
    nll = np.random.default_rng(0).normal(3.4, 0.2, size=200)
    se = bench.bootstrap_ppl(nll.tolist(), 4000, 0)
    delta = math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(len(nll))
    assert abs(se - delta) < 0.1 * delta
    assert bench.bootstrap_ppl([2.0] * 20, 100, 0) < 1e-12


def test_paired_difference_is_exact_and_its_stderr_smaller_than_unpaired(bench):
    rng = np.random.default_rng(1)
    base = rng.normal(3.4, 0.3, size=20)
    a = {"test_window_nll_after": (base + 0.05).tolist()}
    b = {"test_window_nll_after": base.tolist()}
    diff, se = bench.paired_difference(a, b, 2000, 0)
    assert diff == pytest.approx(math.exp(base.mean() + 0.05) - math.exp(base.mean()))
    assert se < 0.25 * bench.bootstrap_ppl(base.tolist(), 2000, 0)


def test_unknown_rows_are_refused(bench, capsys):
    with pytest.raises(SystemExit) as refused:
        bench.parse_args(["--rows", "qlora-r64-nf5", "--out", "x.json"])
    assert refused.value.code == 2 and "unknown rows ['qlora-r64-nf5']" in capsys.readouterr().err


def math_column(row: str, record_nll, record_tokens) -> dict:
    after = {"record_nll": list(record_nll), "record_tokens": list(record_tokens)}
    return {"row": row, "after": after}


def test_math_nll_difference_is_paired_token_weighted_and_refuses_other_items(bench):
    rng = np.random.default_rng(2)
    tokens = rng.integers(50, 200, size=40)
    per_token = rng.normal(1.2, 0.3, size=40)
    a = math_column("sketch-int2-g4", tokens * (per_token - 0.1), tokens)
    b = math_column("qlora-r64-nf2", tokens * per_token, tokens)
    diff, se = bench.paired_nll_difference(a, b, 2000, 0)
    assert diff == pytest.approx(-0.1)
    assert se < 1e-9  # the same shift on every item: no spread to resample
    c = math_column("lora-r64", tokens[:-1] * per_token[:-1], tokens[:-1])
    with pytest.raises(ValueError, match="different GSM8K items"):
        bench.paired_nll_difference(a, c, 100, 0)


def test_math_comparisons_set_each_sketch_against_its_width_only(bench):
    rows = {
        "sketch-int2-g4": {"method": "sketch", "bits": 2, "groups_per_row": 4},
        "qlora-r64-nf2": {"method": "qlora", "bits": 2},
        "qlora-r64-nf4": {"method": "qlora", "bits": 4},
    }
    noise = np.random.default_rng(3).normal(0, 5, size=30)
    maths = {
        name: math_column(name, 100 * (1.0 + 0.01 * i) + noise * (i + 1), [100] * 30) for i, name in enumerate(rows)
    }
    found = bench.math_comparisons(rows, maths, 500, 0)
    assert [(c["a"], c["b"]) for c in found] == [("sketch-int2-g4", "qlora-r64-nf2")]
    assert found[0]["nll_a_minus_b"] == pytest.approx(-0.01 + float(np.mean(noise * -1)) / 100)


def test_each_row_is_read_against_its_width_its_bound_and_its_sibling(bench):
    rows = {name: bench.row_identity(row) for name, row in bench.all_rows().items()}
    refs = {name: bench.references(r) for name, r in rows.items()}
    assert refs["sketch-int3-g1"] == ("qlora-r64-nf3", "loftq-r64-nf3", "lora-r64", "full", "sketch-int3-g4")
    assert refs["sketch-int3-g4"] == ("qlora-r64-nf3", "loftq-r64-nf3", "lora-r64", "full")
    assert refs["loftq-r64-nf2"] == ("qlora-r64-nf2",) and refs["full"] == ("lora-r64",)
    assert refs["qlora-r64-nf4"] == refs["lora-r64"] == ()
    assert all(set(r) <= set(rows) for r in refs.values())

    # Only finished rows are compared: without full and the GPR 1 sketches, none of their pairs appear.
    windows = np.random.default_rng(4).normal(3.0, 0.2, size=20)
    done = [n for n in rows if n != "full" and not n.endswith("-g1")]
    scored = {n: rows[n] | {"test_window_nll_after": (windows + 0.01 * i).tolist()} for i, n in enumerate(done)}
    pairs = {(c["a"], c["b"]) for c in bench.comparisons(scored, 200, 0)}
    assert pairs == {(n, ref) for n in done for ref in refs[n] if ref in scored}
    assert ("loftq-r64-nf3", "qlora-r64-nf3") in pairs and ("sketch-int2-g4", "lora-r64") in pairs
    assert not any("full" in p or "-g1" in "".join(p) for p in pairs)


def test_half_decade_ladder_runs_both_ways_and_refuses_other_rates(bench):
    assert [bench.half_decade(x, up=True) for x in (1e-4, 3e-4, 1e-3, 3e-3)] == [3e-4, 1e-3, 3e-3, 1e-2]
    assert [bench.half_decade(x, up=False) for x in (1e-4, 3e-5, 1e-5)] == [3e-5, 1e-5, 3e-6]
    with pytest.raises(ValueError, match="ladder"):
        bench.half_decade(5e-4, up=True)


def test_the_grid_grows_past_its_edge_twice_at_most_and_never_for_an_inside_best(bench):
    grid = (1e-4, 3e-4, 1e-3)
    assert bench.next_pilot_lr({1e-4: 40.0, 3e-4: 30.0, 1e-3: 35.0}, grid) is None
    assert bench.next_pilot_lr({1e-4: 40.0, 3e-4: 30.0, 1e-3: 25.0}, grid) == 3e-3
    assert bench.next_pilot_lr({1e-4: 40.0, 3e-4: 30.0, 1e-3: 25.0, 3e-3: 24.0}, grid) == 1e-2
    assert bench.next_pilot_lr({1e-4: 40.0, 3e-4: 30.0, 1e-3: 25.0, 3e-3: 24.0, 1e-2: 23.0}, grid) is None
    assert bench.next_pilot_lr({1e-4: 20.0, 3e-4: 30.0, 1e-3: 35.0}, grid) == 3e-5
    # A diverged top point is no edge to follow.
    assert bench.next_pilot_lr({1e-4: 40.0, 3e-4: 30.0, 1e-3: float("nan")}, grid) is None
    assert bench.best_lr({1e-4: float("inf"), 3e-4: 30.0, 1e-3: float("nan")}) == 3e-4
