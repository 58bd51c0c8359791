"""Win rates, their intervals, the length-controlled win rate and the early-stop rule: pure statistics.

The evaluate stage computes the metrics; the operator decides with `should_stop` and `best_of`,
so this module imports no torch, and numpy only inside the length-controlled fit (the operator
image has no numpy).

An outcome is 1 (a win), 0.5 (a tie) or 0 (a loss) of a model's response against a baseline's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from idpo_jobs.config import StopWhen

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Ridge strength on both coefficients of the length fit: it keeps the fit finite when wins separate
# perfectly by length, or when every comparison is won; with 200 prompts it moves the intercept <1%.
LENGTH_FIT_L2 = 0.1
# Keys of the evaluate stage's metrics that `StopWhen.metric` names.
METRIC_KEYS = {"lcWinRateVsPrevious": "lc_win_rate_vs_previous", "lcWinRateVsBase": "lc_win_rate_vs_base"}


def outcome(preference: float) -> float:
    """A win, tie or loss from P(model beats baseline): exactly one half is a tie."""
    return 1.0 if preference > 0.5 else 0.0 if preference < 0.5 else 0.5


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean outcome: wins plus half the ties, over all comparisons."""
    if not outcomes:
        raise ValueError("a win rate needs at least one comparison")
    return math.fsum(outcomes) / len(outcomes)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; `successes` may count ties as halves.

    Ties have less variance than a coin flip, so with ties the interval is slightly conservative.
    """
    if n <= 0:
        raise ValueError("an interval needs at least one comparison")
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@dataclass(frozen=True)
class LengthFit:
    """logit P(win) = intercept + slope * tanh(length_diff / std(length_diff)); `intercept_se` from the
    inverse of the (penalized) Hessian."""

    intercept: float
    slope: float
    intercept_se: float

    @property
    def lc_win_rate(self) -> float:
        """The predicted win rate at zero length difference."""
        return _sigmoid(self.intercept)

    def lc_interval(self, z: float = Z95) -> tuple[float, float]:
        """Wald interval on the logit scale, mapped back to a probability."""
        return _sigmoid(self.intercept - z * self.intercept_se), _sigmoid(self.intercept + z * self.intercept_se)


def fit_length(outcomes: Sequence[float], length_diffs: Sequence[float], l2: float = LENGTH_FIT_L2) -> LengthFit:
    """AlpacaEval 2.0's length control for one model against one baseline, by Newton's method (IRLS).

    The feature is the length difference scaled by its standard deviation and squashed by tanh, so
    a few very long responses do not dominate. Ties enter as targets of 0.5 (a quasi-binomial fit).
    AlpacaEval's per-instruction difficulty term is left out: it needs many models' annotations.
    """
    import numpy as np

    y = np.asarray(outcomes, dtype=float)
    d = np.asarray(length_diffs, dtype=float)
    if y.shape != d.shape or y.size == 0:
        raise ValueError("outcomes and length differences must be non-empty and of equal length")
    spread = d.std()
    # Lengths that never differ by different amounts carry no information about the judge's bias.
    x = np.tanh(d / spread) if spread > 0 else np.zeros_like(d)
    design = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    penalty = l2 * np.eye(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(design @ beta, -35, 35)))
        gradient = design.T @ (y - p) - l2 * beta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1 / (1 + np.exp(-np.clip(design @ beta, -35, 35)))
    covariance = np.linalg.inv(design.T @ (design * (p * (1 - p))[:, None]) + penalty)
    return LengthFit(float(beta[0]), float(beta[1]), float(math.sqrt(covariance[0, 0])))


@dataclass(frozen=True)
class Comparison:
    """One model's responses against one baseline's, prompt by prompt."""

    wins: int
    ties: int
    losses: int
    win_rate: float
    interval: tuple[float, float]
    lc_win_rate: float
    lc_interval: tuple[float, float]
    mean_length_diff: float

    def metrics(self, suffix: str, digits: int = 4) -> dict[str, Any]:
        """Flat metric keys, e.g. `win_rate_vs_base`, `win_rate_vs_base_ci` = [low, high]."""

        def r(value: float) -> float:
            return round(value, digits)

        return {
            f"win_rate_{suffix}": r(self.win_rate),
            f"win_rate_{suffix}_ci": [r(v) for v in self.interval],
            f"lc_win_rate_{suffix}": r(self.lc_win_rate),
            f"lc_win_rate_{suffix}_ci": [r(v) for v in self.lc_interval],
            f"wins_{suffix}": self.wins,
            f"ties_{suffix}": self.ties,
            f"losses_{suffix}": self.losses,
            f"mean_length_diff_{suffix}": round(self.mean_length_diff, 2),
        }

    def figures(self, suffix: str, digits: int = 3) -> dict[str, list[float]]:
        """The rates as an axis's figures (compact: up to eight axes share a 4 KiB stage summary): each rate with
        its 95% interval as [value, low, high], e.g. `lc_win_rate_vs_base: [0.61, 0.52, 0.69]`."""
        return {
            f"win_rate_{suffix}": [round(v, digits) for v in (self.win_rate, *self.interval)],
            f"lc_win_rate_{suffix}": [round(v, digits) for v in (self.lc_win_rate, *self.lc_interval)],
        }


def value_of(figure: Any) -> float | None:
    """A rate as the evaluate stage reports it: a number (the combined figures) or [value, low, high] (an axis's)."""
    if isinstance(figure, list) and figure:
        figure = figure[0]
    return float(figure) if isinstance(figure, int | float) and not isinstance(figure, bool) else None


def compare(outcomes: Sequence[float], length_diffs: Sequence[float]) -> Comparison:
    """Everything reported about one comparison: counts, win rate (Wilson 95%), LC win rate (Wald 95%)."""
    rate = win_rate(outcomes)
    fit = fit_length(outcomes, length_diffs)
    return Comparison(
        wins=sum(1 for o in outcomes if o == 1.0),
        ties=sum(1 for o in outcomes if o == 0.5),
        losses=sum(1 for o in outcomes if o == 0.0),
        win_rate=rate,
        interval=wilson_interval(math.fsum(outcomes), len(outcomes)),
        lc_win_rate=fit.lc_win_rate,
        lc_interval=fit.lc_interval(),
        mean_length_diff=math.fsum(length_diffs) / len(length_diffs),
    )


LENGTH_RATIO = "mean_length_ratio_vs_base"  # the evaluate metric `StopWhen.maxLengthRatio` bounds


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


SOURCE_NAMES = {"axes": "axis", "judges": "judge"}


def _read(entry: Mapping[str, Any], key: str, source: tuple[str, str] | None) -> Any:
    """`key` of one evaluation: the combined figure, or `<axes|judges>.<name>.<key>` (StopWhen.source)."""
    if source is None:
        return entry.get(key)
    block, name = source
    figures = entry.get(block)
    figures = figures.get(name) if isinstance(figures, Mapping) else None
    return figures.get(key) if isinstance(figures, Mapping) else None


def _values(
    history: Sequence[Mapping[str, Any]], metric: str, source: tuple[str, str] | None = None
) -> list[tuple[int, float]]:
    """(position, value) of the evaluations that have `metric` (iteration 0 and failed ones have not)."""
    key = METRIC_KEYS[metric]
    return [(pos, v) for pos, h in enumerate(history) if (v := value_of(_read(h, key, source))) is not None]


def too_long(entry: Mapping[str, Any], stop_when: StopWhen | None) -> bool:
    """Whether an evaluation's mean length is past the length guard's bound."""
    ratio = entry.get(LENGTH_RATIO)
    bound = stop_when.max_length_ratio if stop_when is not None else None
    return bound is not None and _number(ratio) and ratio > bound


def should_stop(history: Sequence[Mapping[str, Any]], stop_when: StopWhen | None) -> tuple[bool, str]:
    """Whether to start no further iteration, and why, from the evaluate metrics of iterations 1..n in order.

    `maxLengthRatio`: the latest mean length is more than this many times the base model's. `below`: the
    latest value is below it. `patience`: the best of the last `patience` values is less than `minDelta`
    above the best value before them (so a slow but steady climb does not stop a run). Entries without the
    metric are skipped. With `axis` or `judge`, the rules read that axis's or judge's figures.
    """
    if stop_when is None:
        return False, ""
    if history and too_long(history[-1], stop_when):
        ratio, bound = history[-1][LENGTH_RATIO], stop_when.max_length_ratio
        return True, f"the mean response length is {ratio:.2f} times the base model's, above {bound:g}"
    source = stop_when.source
    name = f"{stop_when.metric} of {SOURCE_NAMES[source[0]]} {source[1]}" if source else stop_when.metric
    values = [v for _, v in _values(history, stop_when.metric, source)]
    if not values:
        return False, ""
    if stop_when.below is not None and values[-1] < stop_when.below:
        return True, f"{name} {values[-1]:.3f} is below {stop_when.below:g}"
    patience = stop_when.patience
    if patience is not None and len(values) > patience:
        before, recent = max(values[:-patience]), max(values[-patience:])
        if recent < before + stop_when.min_delta:
            return True, (
                f"{name}: the best of the last {patience} iteration(s), {recent:.3f}, is not "
                f"{stop_when.min_delta:g} above the best before them, {before:.3f}"
            )
    return False, ""


def best_index(
    history: Sequence[Mapping[str, Any]], metric: str = "lcWinRateVsBase", source: tuple[str, str] | None = None
) -> int | None:
    """Position in `history` of the highest `metric` (the earliest on a tie); None when no entry has it."""
    values = _values(history, metric, source)
    return max(values, key=lambda pv: (pv[1], -pv[0]))[0] if values else None


def best_of(history: Sequence[Mapping[str, Any]], stop_when: StopWhen | None) -> int | None:
    """The best iteration's position as `stopWhen` judges: its metric and axis or judge (the combined LC win rate vs the
    base model without one), among the evaluations within its length bound."""
    if stop_when is None:
        return best_index(history)
    kept = [{} if too_long(h, stop_when) else h for h in history]  # positions stay
    return best_index(kept, stop_when.metric, stop_when.source)
