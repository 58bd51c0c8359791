"""Turning scored candidates into preference pairs: best = chosen, worst = rejected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idpo_jobs.config import PairingSpec


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int


def adjusted(scores: list[float], responses: list[str], spec: PairingSpec) -> list[float]:
    return [s - spec.length_penalty * len(r) / 100 for s, r in zip(scores, responses, strict=True)]


def choose(scores: list[float], responses: list[str], spec: PairingSpec) -> Pair | None:
    """The pair for one prompt, or None for a tie (equal scores, or identical texts)."""
    adj = adjusted(scores, responses, spec)
    best = max(range(len(adj)), key=adj.__getitem__)  # first index wins among equals: stable
    worst = min(range(len(adj)), key=adj.__getitem__)
    tie = adj[best] - adj[worst] <= spec.tie_epsilon or responses[best] == responses[worst]
    if tie and spec.drop_ties:
        return None
    if best == worst:  # all equal and ties kept: any two distinct indices
        worst = (best + 1) % len(adj)
    return Pair(best, worst)


def preference_row(row: dict[str, Any], scores: list[float], pair: Pair) -> dict[str, Any]:
    """The Snorkel / TRL layout: conversational `chosen` / `rejected` plus all candidates."""
    responses = row["all_generated_responses"]
    user = {"role": "user", "content": row["prompt"]}
    return {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "chosen": [user, {"role": "assistant", "content": responses[pair.chosen]}],
        "rejected": [user, {"role": "assistant", "content": responses[pair.rejected]}],
        "all_generated_responses": responses,
        "all_rm_scores": scores,
        "score_chosen": scores[pair.chosen],
        "score_rejected": scores[pair.rejected],
    }
