"""bench/collective_bytes.py: the collective-bytes parser on literal HLO text."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

HLO = """
ENTRY %main.1 (param.1: f32[2,5,32]) -> f32[2,5,64] {
  %param.1 = f32[2,5,32]{2,1,0} parameter(0)
  %fusion.3 = f32[2,5,16]{2,1,0} fusion(%param.1), kind=kLoop, calls=%fused, metadata={op_name="all-gather(x)"}
  %all-gather = f32[2,5,64]{1,0,2} all-gather(%fusion.3), channel_id=11, replica_groups={{0,1,2,3}}, dimensions={2}
  %psum.28 = f32[2,5,32]{2,1,0} all-reduce(%param.1), channel_id=1, replica_groups={{0,1}}, to_apply=%region_3.6
  %all-reduce.3 = (f32[], bf16[32,2,16]{2,1,0}, pred[4]{0}) all-reduce(%a, %b, %c), channel_id=13, to_apply=%add
  %collective-permute.1 = s32[4,32]{1,0} collective-permute(%x), channel_id=11, source_target_pairs={{0,1},{1,0}}
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%y), channel_id=2, dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
  %a2a = (f32[4,1,8]{2,1,0}, f32[4,1,8]{2,1,0}) all-to-all(%p, %q), channel_id=3, dimensions={0}
  ROOT %rs = u8[16]{0} reduce-scatter(%z), channel_id=4, dimensions={0}, to_apply=%add
}
"""


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # bench scripts import their shared module, _common, from bench/
        yield importlib.import_module("collective_bytes")


def test_collective_bytes_sums_result_sizes_per_op(bench):
    got = bench.collective_bytes(HLO)
    assert got["all-gather"] == {"count": 2, "bytes": 2 * 5 * 64 * 4 + 32 * 4}
    assert got["all-reduce"] == {"count": 2, "bytes": 2 * 5 * 32 * 4 + (4 + 32 * 2 * 16 * 2 + 4)}
    assert got["collective-permute"] == {"count": 1, "bytes": 4 * 32 * 4}
    assert got["all-to-all"] == {"count": 1, "bytes": 2 * 4 * 8 * 4}
    assert got["reduce-scatter"] == {"count": 1, "bytes": 16}


def test_collective_bytes_of_text_without_collectives_is_zero(bench):
    got = bench.collective_bytes("%add = f32[4]{0} add(%a, %b)\n%f = f32[4]{0} fusion(%a), calls=%all-reduce")
    assert all(v == {"count": 0, "bytes": 0} for v in got.values())
