"""Pairing: best is chosen, worst is rejected, ties are dropped and counted."""

from __future__ import annotations

import pytest
from idpo_jobs.config import PairingSpec
from idpo_jobs.pairing import Pair, choose, preference_row


def test_best_is_chosen_and_worst_rejected() -> None:
    assert choose([0.1, 0.9, -0.5, 0.3], ["a", "b", "c", "d"], PairingSpec()) == Pair(chosen=1, rejected=2)


@pytest.mark.parametrize(
    ("scores", "responses", "spec"),
    [
        ([0.5, 0.5, 0.5], ["a", "b", "c"], PairingSpec()),
        ([0.50, 0.52], ["a", "b"], PairingSpec(tie_epsilon=0.05)),
        ([0.1, 0.9], ["same", "same"], PairingSpec()),
    ],
    ids=["equal-scores", "within-epsilon", "identical-texts"],
)
def test_ties_are_dropped(scores: list[float], responses: list[str], spec: PairingSpec) -> None:
    assert choose(scores, responses, spec) is None


def test_ties_are_kept_when_asked() -> None:
    assert choose([0.5, 0.5], ["a", "b"], PairingSpec(drop_ties=False)) == Pair(0, 1)


def test_length_penalty_can_flip_the_choice() -> None:
    responses = ["short", "x" * 500]
    assert choose([0.0, 1.0], responses, PairingSpec()) == Pair(1, 0)
    assert choose([0.0, 1.0], responses, PairingSpec(length_penalty=0.5)) == Pair(0, 1)


def test_preference_row_has_the_snorkel_trl_layout() -> None:
    row = {"prompt_id": "p1", "prompt": "Hi?", "all_generated_responses": ["good", "bad"]}
    out = preference_row(row, [2.0, -1.0], Pair(0, 1))
    assert out["chosen"] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "good"}]
    assert out["rejected"][-1] == {"role": "assistant", "content": "bad"}
    assert (out["all_rm_scores"], out["score_chosen"], out["score_rejected"]) == ([2.0, -1.0], 2.0, -1.0)
