"""Budget schedules: ToMe's constant / (r, inflection) / explicit forms, keep ratios, Cropr's warm-up."""

import math
from pathlib import Path

import pytest
import yaml

from tokred.schedules import SCHEDULES, Constant, Explicit, KeepRatio, Linear, Warmup, build_schedule

SCHEDULE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "schedule").glob("*.yaml"))


@pytest.mark.parametrize("depth", [1, 6, 12])
def test_constant_gives_r_in_every_block(depth):
    assert Constant(3).budgets(depth, 196) == [3] * depth
    assert build_schedule("constant", r=3).budgets(depth, 196) == [3] * depth


def test_linear_decreasing_from_2r_to_0():
    # ToMe's (r, -1): hand-checked where the steps are whole numbers
    assert Linear(5, -1.0).budgets(6, 196) == [10, 8, 6, 4, 2, 0]
    assert Linear(5, 1.0).budgets(6, 196) == [0, 2, 4, 6, 8, 10]
    for r, depth in [(8, 12), (7, 24), (3, 6)]:
        b = Linear(r, -1.0).budgets(depth, 196)
        assert len(b) == depth and b[0] == 2 * r and b[-1] == 0
        assert all(x >= y for x, y in zip(b, b[1:]))
        assert r * depth - depth <= sum(b) <= r * depth  # mean r, up to truncation in each block


@pytest.mark.parametrize("r", [0, 4, 13])
def test_linear_with_inflection_zero_is_constant(r):
    assert Linear(r, 0.0).budgets(12, 196) == Constant(r).budgets(12, 196)


def test_explicit_is_padded_with_zeros_and_must_fit_depth():
    assert Explicit([16, 16, 8]).budgets(6, 196) == [16, 16, 8, 0, 0, 0]
    assert Explicit([1] * 6).budgets(6, 196) == [1] * 6
    with pytest.raises(ValueError, match="depth 6"):
        Explicit([1] * 7).budgets(6, 196)


@pytest.mark.parametrize("num_tokens, num, den", [(196, 1, 2), (100, 7, 100), (1024, 3, 10), (24, 1, 1)])
def test_keep_ratio_at_the_end(num_tokens, num, den):
    budgets = KeepRatio(num / den).budgets(12, num_tokens)
    assert num_tokens - sum(budgets) == -(-num_tokens * num // den)  # ceil(N * keep_ratio), integer maths
    assert max(budgets) - min(budgets) <= 1  # spread evenly


def test_keep_ratio_hand_checked():
    assert KeepRatio(0.07).budgets(4, 100) == [24, 23, 23, 23]  # 7 of 100 kept (float maths would keep 8)
    assert KeepRatio(0.5, blocks=3).budgets(6, 24) == [4, 4, 4, 0, 0, 0]
    # per block, geometric: 24 -> 12 -> 6 -> 3 -> 2
    assert KeepRatio(0.5, per_block=True).budgets(4, 24) == [12, 6, 3, 1]


def test_keep_ratio_per_block_is_geometric():
    n, keep_ratio = 1024, 0.8
    budgets = KeepRatio(keep_ratio, per_block=True, blocks=5).budgets(12, n)
    assert budgets[5:] == [0] * 7
    for r in budgets[:5]:
        kept = n - r
        assert kept == math.ceil(n * 4 / 5)  # 0.8 = 4/5, exact
        n = kept


def test_warmup_ramps_from_zero_over_the_first_fraction():
    w = Warmup(Constant(8), fraction=0.5)
    assert w.budgets(6, 196, progress=0.0) == [0] * 6
    assert w.budgets(6, 196, progress=0.25) == [4] * 6
    assert w.budgets(6, 196, progress=0.5) == [8] * 6
    assert w.budgets(6, 196, progress=1.0) == [8] * 6
    assert w.budgets(6, 196, progress=-1.0) == [0] * 6  # never negative
    assert Warmup(Explicit([10, 2]), fraction=0.5).budgets(3, 196, progress=0.25) == [5, 1, 0]
    assert Warmup(Constant(8), fraction=0.0).budgets(2, 196, progress=0.0) == [8, 8]


def test_bad_inputs_raise_naming_the_parameter():
    with pytest.raises(ValueError, match="r must be >= 0"):
        Constant(-1)
    with pytest.raises(ValueError, match="r must be >= 0"):
        Linear(-2, 0.0)
    with pytest.raises(ValueError, match="inflection"):
        Linear(4, 1.5)
    with pytest.raises(ValueError, match="explicit schedule"):
        Explicit([2, -1])
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            KeepRatio(bad)
    with pytest.raises(ValueError, match="blocks"):
        KeepRatio(0.5, blocks=0)
    with pytest.raises(ValueError, match="blocks"):
        KeepRatio(0.5, blocks=13).budgets(12, 196)
    with pytest.raises(ValueError, match="fraction"):
        Warmup(Constant(2), fraction=1.5)
    with pytest.raises(ValueError, match="keep_ratio, warmup"):
        build_schedule("geometric", r=2)
    with pytest.raises(ValueError, match="inflecton"):
        build_schedule("linear", r=2, inflecton=-1)
    with pytest.raises(ValueError, match="keep_ratio"):
        build_schedule("constant", r=2, keep_ratio=0.5)


def test_build_schedule_forms_and_config_round_trip():
    forms = [
        build_schedule("constant", r=4),
        build_schedule("linear", r=4, inflection=-1),
        build_schedule("explicit", values=[3, 2, 1]),
        build_schedule("keep_ratio", keep_ratio=0.25, per_block=True, blocks=4, applies_to=["merger"]),
        build_schedule("warmup", r=4, fraction=0.3, inner={"kind": "linear", "inflection": 1}),
    ]
    assert [type(s) for s in forms] == [Constant, Linear, Explicit, KeepRatio, Warmup]
    assert forms[4].inner == Linear(4, 1.0)
    assert [s.config()["kind"] for s in forms] == list(SCHEDULES)
    for s in forms:
        assert build_schedule(**s.config()) == s
    assert build_schedule("keep_ratio", keep_ratio=0.5, blocks=None) == KeepRatio(0.5)  # null = default


@pytest.mark.parametrize("path", SCHEDULE_CONFIGS, ids=lambda p: p.stem)
def test_schedule_config_files_build(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["kind"] == path.stem
    assert len(build_schedule(r=4, **spec).budgets(12, 196, 1.0)) == 12
