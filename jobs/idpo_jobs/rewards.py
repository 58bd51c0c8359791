"""Programmatic rewards shipped with the stage image, for `ranking.ranker: function` (`idpo_jobs.rewards:<name>`)
and axes of kind function.

They are demos: signals simple enough that the tiny models of the quick start can climb them in two
iterations, so that `idpo run examples/tiny.yaml && idpo report` shows what the loop is for (the
win rate against the base model rising). A real run ranks with PairRM or a reward model.
`examples/tiny-axes.yaml` combines them: `starts_with_s` (an objective that does not care about length),
`word_count` (one that does, as LLM judges and PairRM do) and `distinct_words` (a gate against repetition).
"""

from __future__ import annotations

TARGET_LETTER = "s"


def starts_with_s(prompt: str, response: str) -> float:
    """The share of the response's words that start with 's': smooth, and reachable from random text."""
    words = response.lower().split()
    return sum(w.startswith(TARGET_LETTER) for w in words) / len(words) if words else 0.0


def word_count(prompt: str, response: str) -> float:
    """The number of words, in tens: a length-biased objective, standing in for a judge that prefers longer answers."""
    return len(response.split()) / 10


def distinct_words(prompt: str, response: str) -> float:
    """The share of the response's words that are distinct (1.0 for an empty one): low for repetitive text."""
    words = response.lower().split()
    return len(set(words)) / len(words) if words else 1.0
