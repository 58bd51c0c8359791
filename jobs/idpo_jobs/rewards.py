"""Programmatic rewards shipped with the stage image, for `ranking.ranker: function` (`idpo_jobs.rewards:<name>`).

They are demos: a signal simple enough that the tiny models of the quick start can climb it in two
iterations, so that `idpo run examples/tiny.yaml && idpo report` shows what the loop is for (the
win rate against the base model rising). A real run ranks with PairRM or a reward model.
"""

from __future__ import annotations

TARGET_LETTER = "s"


def starts_with_s(prompt: str, response: str) -> float:
    """The share of the response's words that start with 's': smooth, and reachable from random text."""
    words = response.lower().split()
    return sum(w.startswith(TARGET_LETTER) for w in words) / len(words) if words else 0.0
