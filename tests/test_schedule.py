"""Stage schedules: Prop-alpha step counts, FLOPs speed-ups and validation (docs/method.md,
section 2)."""

import itertools

import numpy as np
import pytest

from midas_jax import schedule as sched
from midas_jax.schedule import Stage

# docs/method.md, section 2: speedup(n, alpha) for n = 4, 6, 8 and alpha = 0..3.
SPEEDUP_TABLE = {
    4: (1.600, 1.333, 1.200, 1.130),
    6: (1.714, 1.385, 1.238, 1.163),
    8: (1.778, 1.412, 1.259, 1.182),
}


def _steps(schedule):
  return [s.steps for s in schedule]


def _real_shares(total_steps, n, alpha):
  w = np.arange(1, n + 1, dtype=np.float64) ** alpha
  return total_steps * w / w.sum()


# (total_steps, num_layers, block_size) with n = num_layers / block_size stages; small T close to
# n, odd and prime T, and huge T.
PROP_CASES = [
    (1, 1, 1), (7, 1, 1), (2, 2, 1), (3, 2, 1), (4, 4, 2), (5, 4, 1), (6, 6, 1), (7, 6, 1),
    (8, 8, 1), (9, 8, 1), (10, 7, 1), (13, 12, 3), (21, 7, 1), (24, 24, 4), (25, 24, 4),
    (97, 6, 1), (100, 8, 2), (1000, 24, 4), (1001, 32, 4), (4999, 12, 1), (65_537, 8, 1),
    (10**6 + 3, 16, 2), (10**9 + 7, 6, 1), (10**12 + 1, 32, 4),
]


@pytest.mark.parametrize("alpha", [0, 0.5, 1, 2, 3])
@pytest.mark.parametrize("total_steps,num_layers,block_size", PROP_CASES)
def test_prop_schedule_integer_steps_sum_exactly(total_steps, num_layers, block_size, alpha):
  schedule = sched.prop_schedule(total_steps, num_layers, block_size, alpha)
  n = num_layers // block_size
  assert len(schedule) == n
  assert all(isinstance(s, Stage) for s in schedule)
  assert all(type(s.steps) is int and type(s.depth) is int for s in schedule)
  assert sum(_steps(schedule)) == total_steps
  assert sched.total_steps(schedule) == total_steps
  assert min(_steps(schedule)) >= 1
  assert [s.depth for s in schedule] == [i * block_size for i in range(1, n + 1)]
  assert schedule[-1].depth == num_layers


def test_prop_schedule_exact_values():
  # T * i^a / sum j^a is an integer here, so the split is exact.
  assert _steps(sched.prop_schedule(100, 4, 1, 1)) == [10, 20, 30, 40]
  assert _steps(sched.prop_schedule(1200, 8, 2, 0)) == [300, 300, 300, 300]
  assert _steps(sched.prop_schedule(3600, 24, 8, 3)) == [100, 800, 2700]
  # Fewest possible steps: one per stage, whatever alpha.
  assert _steps(sched.prop_schedule(6, 6, 1, 3)) == [1] * 6
  assert sched.prop_schedule(5, 1, 1, 2) == (Stage(1, 5),)


def test_prop_schedule_300_12_4_2_is_rounded_share():
  shares = _real_shares(300, 3, 2)  # [21.43, 85.71, 192.86]
  assert _steps(sched.prop_schedule(300, 12, 4, 2)) == [21, 86, 193]
  assert np.max(np.abs(np.array([21, 86, 193]) - shares)) < 1


@pytest.mark.parametrize("alpha", [0, 1, 2, 3])
def test_prop_schedule_within_one_step_of_real_share(alpha):
  checked = 0
  for n, total_steps in itertools.product(range(1, 13), list(range(1, 300)) + [997, 10**6 + 1]):
    shares = _real_shares(total_steps, n, alpha)
    if shares.min() < 1:  # only when T is large relative to n: every stage's share >= 1 step
      continue
    steps = np.array(_steps(sched.prop_schedule(total_steps, n, 1, alpha)))
    assert np.max(np.abs(steps - shares)) <= 1 + 1e-9, (total_steps, n, alpha, steps, shares)
    checked += 1
  assert checked > 500


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_prop_schedule_non_decreasing_when_shares_are_well_separated(alpha):
  # Within-one-step rounding of shares that grow by >= 2 steps per stage must stay monotone.
  checked = 0
  for n, total_steps in itertools.product(range(1, 13), list(range(1, 400)) + [10**6 + 1]):
    shares = _real_shares(total_steps, n, alpha)
    if n > 1 and np.diff(shares).min() < 2 or shares.min() < 1:
      continue
    steps = _steps(sched.prop_schedule(total_steps, n, 1, alpha))
    assert steps == sorted(steps), (total_steps, n, alpha, steps)
    checked += 1
  assert checked > 300


# Prop-alpha with alpha >= 0 gives non-decreasing real-valued shares; rounding the cumulative
# boundaries alone can swap neighbours (T=3, n=2, alpha=0 gave [2, 1]), which the schedule must fix.
@pytest.mark.parametrize("total_steps,n,alpha", [
    (3, 2, 0),
    (7, 2, 0),
    (1003, 2, 0),
    (10, 7, 1),
    (21, 7, 1),
    (40, 16, 2),
    (5, 2, 0), (1001, 2, 0), (100, 6, 1), (1000, 8, 2), (1000, 8, 3),
])
def test_prop_schedule_steps_non_decreasing(total_steps, n, alpha):
  steps = _steps(sched.prop_schedule(total_steps, n, 1, alpha))
  assert sum(steps) == total_steps
  assert steps == sorted(steps), steps


@pytest.mark.parametrize("n", sorted(SPEEDUP_TABLE))
@pytest.mark.parametrize("alpha", [0, 1, 2, 3])
def test_theoretical_speedup_matches_midas_table(n, alpha):
  expected = SPEEDUP_TABLE[n][alpha]
  assert round(sched.theoretical_speedup(n, alpha), 3) == expected
  i = np.arange(1, n + 1, dtype=np.float64)
  assert sched.theoretical_speedup(n, alpha) == pytest.approx(
      n * (i**alpha).sum() / (i ** (alpha + 1)).sum(), rel=1e-12)


@pytest.mark.parametrize("n", sorted(SPEEDUP_TABLE))
@pytest.mark.parametrize("alpha", [0, 1, 2, 3])
def test_schedule_speedup_of_prop_schedule_matches_table(n, alpha):
  block_size = 4
  schedule = sched.prop_schedule(10**7, n * block_size, block_size, alpha)
  assert abs(sched.schedule_speedup(schedule) - SPEEDUP_TABLE[n][alpha]) < 1e-3
  assert sched.schedule_speedup(schedule) == pytest.approx(sched.theoretical_speedup(n, alpha),
                                                           abs=1e-5)


def test_schedule_speedup_hand_computed():
  schedule = (Stage(4, 100), Stage(8, 300))
  assert sched.schedule_speedup(schedule) == pytest.approx(8 * 400 / (4 * 100 + 8 * 300))
  assert sched.boundaries(schedule) == [100]
  assert sched.boundaries((Stage(2, 5), Stage(4, 7), Stage(6, 9))) == [5, 12]
  assert sched.boundaries((Stage(8, 10),)) == []
  text = sched.describe(schedule)
  assert "2 stage(s)" in text and "4L x 100" in text and "8L x 300" in text
  assert f"{8 * 400 / 2800:.3f}x" in text


def test_baseline_schedule_is_one_stage_with_speedup_one():
  schedule = sched.baseline_schedule(1234, 24)
  assert schedule == (Stage(24, 1234),)
  assert sched.schedule_speedup(schedule) == 1.0
  assert sched.boundaries(schedule) == []
  assert sched.make_schedule("baseline", total_steps=1234, num_layers=24, block_size=4) == schedule


def test_make_schedule_prop_matches_prop_schedule():
  assert (sched.make_schedule("prop", total_steps=999, num_layers=24, block_size=4, alpha=2)
          == sched.prop_schedule(999, 24, 4, 2))


@pytest.mark.parametrize("stages", [
    [(4, 100), (8, 300)],
    ((4, 100), (8, 300)),
    [[4, 100], [8, 300]],
    "[(4, 100), (8, 300)]",
    "((4,100),(8,300))",
    " [(4, 100), (8, 300)] ",
])
def test_explicit_schedule_from_list_and_string(stages):
  expected = (Stage(4, 100), Stage(8, 300))
  assert sched.explicit_schedule(stages, num_layers=8, block_size=4) == expected
  assert sched.make_schedule("prop", total_steps=1, num_layers=8, block_size=4,
                             stages=stages) == expected


def test_explicit_schedule_may_skip_depths_and_has_one_stage():
  assert sched.explicit_schedule([(8, 5)], 8, 4) == (Stage(8, 5),)
  assert sched.explicit_schedule("[(2, 1), (6, 2), (8, 3)]", 8, 2) == (
      Stage(2, 1), Stage(6, 2), Stage(8, 3))


def _raises(fn, *substrings):
  with pytest.raises(ValueError) as info:
    fn()
  message = str(info.value)
  for s in substrings:
    assert s in message, (s, message)
  return message


def test_prop_schedule_rejects_negative_alpha():
  _raises(lambda: sched.prop_schedule(100, 8, 2, -0.5), "alpha", "-0.5")


def test_prop_schedule_rejects_fewer_steps_than_stages():
  _raises(lambda: sched.prop_schedule(3, 8, 2, 1), "total_steps=3", "4 stages")
  _raises(lambda: sched.prop_schedule(0, 1, 1, 1), "total_steps=0")
  _raises(lambda: sched.make_schedule("prop", total_steps=5, num_layers=6, block_size=1),
          "total_steps=5", "6 stages")


def test_schedules_reject_depth_not_multiple_of_block():
  msg = _raises(lambda: sched.prop_schedule(100, 6, 4, 1), "num_layers=6", "block_size=4")
  assert "[1, 2, 3, 6]" in msg  # the block sizes that would work
  _raises(lambda: sched.explicit_schedule([(4, 10), (6, 10)], 6, 4), "num_layers=6",
          "block_size=4")
  _raises(lambda: sched.explicit_schedule([(3, 10), (8, 10)], 8, 4), "block_size=4", "[3, 8]")


@pytest.mark.parametrize("num_layers,block_size", [(0, 1), (4, 0), (4, -2), (-4, 2)])
def test_schedules_reject_non_positive_sizes(num_layers, block_size):
  _raises(lambda: sched.prop_schedule(100, num_layers, block_size, 1), str(num_layers),
          str(block_size), "positive")


@pytest.mark.parametrize("stages", [[(8, 10), (4, 10)], [(4, 10), (4, 10), (8, 10)]])
def test_explicit_schedule_rejects_non_increasing_depths(stages):
  _raises(lambda: sched.explicit_schedule(stages, 8, 4), "increase",
          str([d for d, _ in stages]))


def test_explicit_schedule_rejects_wrong_last_depth():
  _raises(lambda: sched.explicit_schedule([(4, 100)], 8, 4), "depth 4", "num_layers=8")
  _raises(lambda: sched.explicit_schedule("[(4, 100), (8, 100)]", 12, 4), "depth 8",
          "num_layers=12")


@pytest.mark.parametrize("stages", [[(4, 0), (8, 10)], [(4, 10), (8, -3)]])
def test_explicit_schedule_rejects_stages_without_steps(stages):
  _raises(lambda: sched.explicit_schedule(stages, 8, 4), "steps > 0")


@pytest.mark.parametrize("text", [
    "[(4, 100), (8,", "four hundred", "[(4, 100), (8, 300)", "{4: 100", "[(4, x)]",
])
def test_explicit_schedule_rejects_malformed_string(text):
  _raises(lambda: sched.explicit_schedule(text, 8, 4), "STAGES", repr(text), "(depth, steps)")


@pytest.mark.parametrize("stages", ["[4, 8]", "[(4, 100, 1)]", "[(4,)]", [4, 8], [("a", 1)]])
def test_explicit_schedule_rejects_non_pairs(stages):
  _raises(lambda: sched.explicit_schedule(stages, 8, 4), "STAGES", "(depth, steps) pairs")


def test_explicit_schedule_rejects_empty():
  _raises(lambda: sched.explicit_schedule([], 8, 4), "empty")
  _raises(lambda: sched.explicit_schedule("[]", 8, 4), "empty")


def test_make_schedule_rejects_unknown_kind():
  _raises(lambda: sched.make_schedule("linear", total_steps=100, num_layers=8, block_size=4),
          "'linear'", "prop", "baseline")


@pytest.mark.parametrize("total_steps", [0, -5])
def test_baseline_schedule_rejects_non_positive_steps(total_steps):
  _raises(lambda: sched.baseline_schedule(total_steps, 8), "total_steps", str(total_steps))
