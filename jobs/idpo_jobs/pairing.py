"""Turning scored candidates into preference pairs: best = chosen, worst = rejected.

With gates (`ranking.axes`), candidates that fail a gate rank below every candidate that passes: they may be
rejected, never chosen. With `maxLengthRatio` (and `minLengthRatio`), the best candidate is paired with the
worst one whose length is within that band of its own. A prompt without a pair is dropped, and why (`Drop`) is counted.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from idpo_jobs.config import PairingSpec


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int


class Drop(enum.StrEnum):
    TIE = "ties"  # best and worst score alike (or are the same text)
    GATE = "gates"  # no candidate passes every gate
    LENGTH_RATIO = "length_ratio"  # no candidate's length is within the band of the best's


def adjusted(scores: Sequence[float], responses: Sequence[str], spec: PairingSpec) -> list[float]:
    return [s - spec.length_penalty * len(r) / 100 for s, r in zip(scores, responses, strict=True)]


def decide(
    scores: Sequence[float], responses: Sequence[str], spec: PairingSpec, passing: Sequence[bool] | None = None
) -> Pair | Drop:
    """The pair for one prompt, or why there is none. `passing`: per candidate, whether it passes every gate."""
    ok = list(passing) if passing is not None else [True] * len(scores)
    adj = adjusted(scores, responses, spec)
    eligible = [i for i in range(len(adj)) if ok[i]]
    if not eligible:
        return Drop.GATE
    best = max(eligible, key=adj.__getitem__)  # first index wins among equals: stable
    high, low = spec.max_length_ratio, spec.min_length_ratio
    size = len(responses[best])

    def in_band(i: int) -> bool:
        return (high is None or size <= high * len(responses[i])) and (low is None or size >= low * len(responses[i]))

    others = [i for i in range(len(adj)) if i != best and in_band(i)]
    if not others:
        return Drop.LENGTH_RATIO if high is not None or low is not None else Drop.TIE
    worst = min(others, key=lambda i: (ok[i], adj[i]))  # a failing candidate is worse than any passing one
    same = ok[worst] and adj[best] - adj[worst] <= spec.tie_epsilon
    if (same or responses[best] == responses[worst]) and spec.drop_ties:
        return Drop.TIE
    return Pair(best, worst)


def choose(
    scores: Sequence[float], responses: Sequence[str], spec: PairingSpec, passing: Sequence[bool] | None = None
) -> Pair | None:
    """The pair for one prompt, or None when it has none (`decide` says why)."""
    found = decide(scores, responses, spec, passing)
    return found if isinstance(found, Pair) else None


def preference_row(
    row: dict[str, Any], scores: list[float], pair: Pair, axis_scores: Mapping[str, list[float]] | None = None
) -> dict[str, Any]:
    """The Snorkel / TRL layout: conversational `chosen` / `rejected` plus all candidates; `all_rm_scores` is
    the combined score, `axis_scores` every axis's raw scores."""
    responses = row["all_generated_responses"]
    user = {"role": "user", "content": row["prompt"]}
    out = {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "chosen": [user, {"role": "assistant", "content": responses[pair.chosen]}],
        "rejected": [user, {"role": "assistant", "content": responses[pair.rejected]}],
        "all_generated_responses": responses,
        "all_rm_scores": scores,
        "score_chosen": scores[pair.chosen],
        "score_rejected": scores[pair.rejected],
    }
    if axis_scores is not None:  # an LLM judge's missing rating (NaN) as null: pairs.jsonl stays strict JSON
        out["axis_scores"] = {k: [v if math.isfinite(v) else None for v in vs] for k, vs in axis_scores.items()}
    return out
