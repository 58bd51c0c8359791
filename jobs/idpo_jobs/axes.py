"""Scorer axes (`ranking.axes`, docs/ranking.md): which scorer each axis is, and how axes decide together.

An axis is a scorer with a name: an objective (`weight`) or a constraint (`gate`). The rank and evaluate
stages score with every axis in turn, one model in memory at a time (`build`, then `release` before the
next), so a run's memory is its largest axis's. What the scores decide is pure arithmetic, here:

- `normalize`: one objective's scores made comparable across axes within a prompt (rank, zscore, none);
- `combine`: the weighted sum of the normalised objectives (one objective: its raw scores);
- `passing`: which candidates pass every gate (`pairing.decide` never chooses one that does not);
- `vote`: the combined judgement of two responses from each axis's preference, for the evaluate stage.

Scorer kinds are a registry (`KINDS`): a kind is a factory from the axis and the ranking section to an
object with `score(prompts, candidates) -> scores` (higher is better). The ranker classes of `rank` are
the kinds `pairrm`, `reward-model` and `function`; another kind (an LLM judge) registers itself the same way
and nothing below changes.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from idpo_jobs.config import AxisSpec, CombineSpec, PairingSpec, RankingSpec


class Scorer(Protocol):
    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]: ...


Factory = Callable[[AxisSpec, RankingSpec], Scorer]
KINDS: dict[str, Factory] = {}


def register(kind: str) -> Callable[[Factory], Factory]:
    def add(factory: Factory) -> Factory:
        KINDS[kind] = factory
        return factory

    return add


def _ranker(kind: str) -> Factory:
    """A ranker class of `rank` as an axis's scorer: the ranking section's settings (batch size, lengths) with
    the axis as its single ranker."""

    def build(axis: AxisSpec, ranking: RankingSpec) -> Scorer:
        from idpo_jobs import rank  # rank scores through this module: imported when a scorer is built

        return rank.make_ranker(scoring_view(ranking, axis))

    return build


for _kind in ("pairrm", "reward-model", "function"):
    register(_kind)(_ranker(_kind))


@register("judge")
def _judge(axis: AxisSpec, ranking: RankingSpec) -> Scorer:
    """An LLM judge's 1-9 rating (`Judge.score`): NaN where it gave none. Not cached on the claim here: the
    rank stage keeps each axis's finished chunks (resume.chunked), so a retry rates only the unfinished ones."""
    from idpo_jobs.judge import Judge

    assert axis.judge is not None  # AxisSpec: kind judge has one
    return Judge(axis.judge)


def scoring_view(ranking: RankingSpec, axis: AxisSpec) -> RankingSpec:
    """The ranking section as far as `axis`'s scores depend on it: the axis as the single ranker, the shared
    scoring settings, nothing that only decides pairs (weights, gates, combination, pairing). Also what
    identifies the axis's finished chunks."""
    single = {"ranker": axis.kind, "model": axis.model, "function": axis.function}
    scorer = axis.model_copy(update={"weight": 1.0, "gate": None})
    return ranking.model_copy(update={**single, "axes": [scorer], "pairing": PairingSpec(), "combine": CombineSpec()})


def build(axis: AxisSpec, ranking: RankingSpec) -> Scorer:
    return KINDS[axis.kind](axis, ranking)


def release() -> None:
    """Give back what the last scorer held (call with no reference to it left) before the next one loads."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# What scores decide: pure functions
# ---------------------------------------------------------------------------------------------
def normalize(values: Sequence[float], how: str) -> list[float]:
    """One prompt's candidates' scores on one axis, made comparable with other axes' (CombineSpec.normalize).
    A score that is not a number (an LLM judge's unreadable rating) stays NaN; the others are normalised
    among themselves."""
    if not all(math.isfinite(v) for v in values):
        kept = [i for i, v in enumerate(values) if math.isfinite(v)]
        out = [math.nan] * len(values)
        for i, v in zip(kept, normalize([values[i] for i in kept], how) if kept else [], strict=True):
            out[i] = v
        return out
    if how == "none":
        return [float(v) for v in values]
    if how == "zscore":
        mean = statistics.fmean(values)
        spread = statistics.pstdev(values)
        return [(v - mean) / spread if spread > 0 else 0.0 for v in values]
    if len(values) == 1:
        return [0.5]
    # Rank among the prompt's candidates, ties sharing their average rank, scaled to 0 (worst) .. 1 (best).
    return [(sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2) / (len(values) - 1) for v in values]


def objectives(axes: Sequence[AxisSpec]) -> list[AxisSpec]:
    return [a for a in axes if a.weight is not None]


def gates(axes: Sequence[AxisSpec]) -> list[AxisSpec]:
    return [a for a in axes if a.gate is not None]


def combine(scores: Mapping[str, Sequence[float]], axes: Sequence[AxisSpec], how: str) -> list[float]:
    """The combined score of each candidate of one prompt: sum of weight x normalised score over the objectives.
    One objective: its raw scores (nothing to make comparable; the single-ranker form stays as it was)."""
    wanted = objectives(axes)
    if len(wanted) == 1:
        combined = [float(v) for v in scores[wanted[0].name]]
    else:
        parts = [[a.weight * v for v in normalize(scores[a.name], how)] for a in wanted if a.weight is not None]
        combined = [math.fsum(column) for column in zip(*parts, strict=True)]
    return _below_the_rest(combined)


def _below_the_rest(combined: list[float]) -> list[float]:
    """A candidate some axis could not score (NaN) gets a finite score below every scored one, so it sorts
    last and stays a number in pairs.jsonl; `passing` keeps it from being chosen."""
    finite = [v for v in combined if math.isfinite(v)]
    floor = min(finite) - 1.0 if finite else 0.0
    return [v if math.isfinite(v) else floor for v in combined]


def passing(scores: Mapping[str, Sequence[float]], axes: Sequence[AxisSpec]) -> list[bool]:
    """Per candidate: whether it passes every gate, and has a score on every axis (an LLM judge may give none:
    such a candidate may be rejected, never chosen)."""
    n = len(next(iter(scores.values())))
    scored = [all(math.isfinite(v[i]) for v in scores.values()) for i in range(n)]
    return [scored[i] and all(a.gate.passes(scores[a.name][i]) for a in gates(axes) if a.gate) for i in range(n)]


def closed_gates(scores: Mapping[str, Sequence[float]], axes: Sequence[AxisSpec]) -> list[str]:
    """The gates no candidate of the prompt passes: each alone drops the prompt. (Gates can also drop a prompt
    together, each failing other candidates; the rank stage's `dropped_gates` counts those too.)"""
    return [a.name for a in gates(axes) if a.gate and not any(a.gate.passes(v) for v in scores[a.name])]


def best(scores: Mapping[str, Sequence[float]], axes: Sequence[AxisSpec], how: str) -> int:
    """The candidate the axes prefer (best-of-n): the highest combined score among those passing every gate
    (among all when none passes); the first of equals."""
    combined, ok = combine(scores, axes, how), passing(scores, axes)
    pool = [i for i, p in enumerate(ok) if p] or list(range(len(combined)))
    return max(pool, key=combined.__getitem__)


def vote(preferences: Mapping[str, float], passed: Mapping[str, tuple[bool, bool]], axes: Sequence[AxisSpec]) -> float:
    """P(ours beats theirs) by the axes together, for one prompt: a response that passes every gate beats one
    that does not; otherwise each objective's preference counts by its weight (0.5 + sum w (p - 0.5) / sum |w|).
    `preferences`: each objective's P(ours beats theirs); `passed`: each gate's (ours passes, theirs passes).
    One objective and no gate: its own preference."""
    ours = all(p[0] for p in passed.values())
    theirs = all(p[1] for p in passed.values())
    if ours != theirs:
        return 1.0 if ours else 0.0
    wanted = objectives(axes)
    total = math.fsum(abs(a.weight or 0.0) for a in wanted)
    return 0.5 + math.fsum((a.weight or 0.0) * (preferences[a.name] - 0.5) for a in wanted) / total
