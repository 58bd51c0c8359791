"""Win rates, intervals, the length-controlled win rate and the early-stop rule, on known numbers."""

from __future__ import annotations

import math
import random

import pytest
from idpo_jobs import winrate
from idpo_jobs.config import StopWhen


def judged_by_length(n: int, mean_diff: float, quality: float, seed: int = 0) -> tuple[list[float], list[float]]:
    """A judge that prefers longer responses: logit P(win) = quality + 3 tanh(diff / sd)."""
    rng = random.Random(seed)
    diffs = [rng.gauss(mean_diff, 60) for _ in range(n)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / n)
    outcomes = [1.0 if rng.random() < 1 / (1 + math.exp(-(quality + 3 * math.tanh(d / sd)))) else 0.0 for d in diffs]
    return outcomes, diffs


def test_wilson_interval_of_8_out_of_10_matches_the_textbook_value() -> None:
    assert winrate.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_wilson_interval_stays_within_0_and_1_at_the_extremes() -> None:
    low, high = winrate.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)
    assert winrate.wilson_interval(0, 10)[0] == 0.0


@pytest.mark.parametrize(
    ("preference", "expected"),
    [(0.93, 1.0), (0.5, 0.5), (0.07, 0.0), (0.5000001, 1.0)],
    ids=["win", "tie", "loss", "barely-a-win"],
)
def test_a_preference_becomes_a_win_a_tie_or_a_loss(preference: float, expected: float) -> None:
    assert winrate.outcome(preference) == expected


def test_ties_count_half() -> None:
    comparison = winrate.compare([1.0, 1.0, 0.5, 0.5, 0.0], [0, 0, 0, 0, 0])
    assert (comparison.wins, comparison.ties, comparison.losses) == (2, 2, 1)
    assert comparison.win_rate == pytest.approx(0.6)
    assert comparison.interval == pytest.approx(winrate.wilson_interval(3, 5))


def test_a_gain_in_length_alone_raises_the_win_rate_but_not_the_length_controlled_one() -> None:
    outcomes, diffs = judged_by_length(2000, mean_diff=60, quality=0.0)
    comparison = winrate.compare(outcomes, diffs)
    assert comparison.win_rate > 0.75
    assert comparison.lc_win_rate == pytest.approx(0.5, abs=0.05)
    assert comparison.lc_interval[0] < 0.5 < comparison.lc_interval[1]


def test_a_true_gain_keeps_the_length_controlled_win_rate_above_one_half() -> None:
    outcomes, diffs = judged_by_length(2000, mean_diff=60, quality=1.0)
    comparison = winrate.compare(outcomes, diffs)
    assert comparison.lc_interval[0] > 0.6  # sigmoid(1) = 0.73 at zero length difference
    assert comparison.lc_win_rate == pytest.approx(1 / (1 + math.exp(-1)), abs=0.05)


def test_a_shorter_but_better_model_gets_credit_for_quality() -> None:
    outcomes, diffs = judged_by_length(2000, mean_diff=-60, quality=1.0)
    comparison = winrate.compare(outcomes, diffs)
    assert comparison.lc_win_rate > comparison.win_rate


def test_lengths_that_never_vary_leave_the_win_rate_unchanged() -> None:
    outcomes = [1.0] * 7 + [0.0] * 3
    assert winrate.compare(outcomes, [12] * 10).lc_win_rate == pytest.approx(0.7, abs=0.02)  # only the ridge pulls


def test_metrics_are_flat_keys_named_by_baseline() -> None:
    metrics = winrate.compare([1.0, 0.0, 0.5], [3, -1, 0]).metrics("vs_base")
    assert set(metrics) == {
        "win_rate_vs_base",
        "win_rate_vs_base_ci",
        "lc_win_rate_vs_base",
        "lc_win_rate_vs_base_ci",
        "wins_vs_base",
        "ties_vs_base",
        "losses_vs_base",
        "mean_length_diff_vs_base",
    }
    assert metrics["win_rate_vs_base"] == 0.5 and metrics["mean_length_diff_vs_base"] == pytest.approx(0.67)


def history(metric: str, *values: float | None) -> list[dict[str, float]]:
    return [{} if v is None else {winrate.METRIC_KEYS[metric]: v} for v in values]


@pytest.mark.parametrize(
    ("values", "rule", "stop"),
    [
        ((0.62, 0.58, 0.47), {"below": 0.5}, True),
        ((0.62, 0.58, 0.53), {"below": 0.5}, False),
        ((0.60, 0.68, 0.681, 0.679), {"patience": 2, "minDelta": 0.01}, True),
        ((0.60, 0.64, 0.68, 0.72), {"patience": 2, "minDelta": 0.01}, False),
        ((0.60, 0.605, 0.610, 0.615), {"patience": 2, "minDelta": 0.01}, False),  # slow, but 0.015 in two
        ((0.60, 0.605, 0.610, 0.615), {"patience": 1, "minDelta": 0.01}, True),
        ((0.60, 0.60), {"patience": 2}, False),  # not enough iterations to judge a plateau yet
        ((0.60, None, 0.61, None, 0.605), {"patience": 2, "minDelta": 0.02}, True),  # gaps are skipped
    ],
    ids=[
        "below-threshold",
        "above-threshold",
        "plateau",
        "steady-improvement",
        "slow-climb-within-patience",
        "slow-climb-beyond-patience",
        "too-early",
        "evaluations-missing",
    ],
)
def test_the_stop_rule_triggers_on_a_plateau_or_a_drop_and_not_on_improvement(values, rule, stop) -> None:
    stop_when = StopWhen.model_validate({"metric": "lcWinRateVsBase", **rule})
    decided, reason = winrate.should_stop(history("lcWinRateVsBase", *values), stop_when)
    assert decided is stop
    assert bool(reason) is stop


def test_no_stop_rule_never_stops() -> None:
    assert winrate.should_stop(history("lcWinRateVsPrevious", 0.1, 0.1, 0.1), None) == (False, "")


def test_the_stop_rule_reads_the_metric_it_names() -> None:
    both = [{"lc_win_rate_vs_previous": 0.4, "lc_win_rate_vs_base": 0.7}]
    assert winrate.should_stop(both, StopWhen(metric="lcWinRateVsPrevious", below=0.5))[0] is True
    assert winrate.should_stop(both, StopWhen(metric="lcWinRateVsBase", below=0.5))[0] is False


def test_a_stop_rule_without_a_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="needs `below`, `patience`"):
        StopWhen(metric="lcWinRateVsBase")


def test_the_best_evaluation_is_the_highest_and_the_earliest_of_equals() -> None:
    assert winrate.best_index(history("lcWinRateVsBase", 0.6, None, 0.7, 0.7, 0.65)) == 2
    assert winrate.best_index(history("lcWinRateVsBase", None, None)) is None


def test_statistics_import_without_torch_or_numpy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "from idpo_jobs import winrate; from idpo_jobs.config import StopWhen\n"
        "print(winrate.should_stop([{'lc_win_rate_vs_base': 0.4}], StopWhen(metric='lcWinRateVsBase', below=0.5)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "True" in proc.stdout, proc.stderr
