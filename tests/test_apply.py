"""What the apply layer does when the API refuses a write, without a server: the failure reaches
status (so observedGeneration advances and GitOps does not show Progressing forever)."""

from __future__ import annotations

from idpo_operator import apply
from idpo_operator.expectations import older
from idpo_operator.reconcile import decide

from tests.test_reconcile import NOW, run


def test_a_refused_write_stalls_the_run_with_the_apis_message_and_still_observes_the_generation() -> None:
    before = decide(run(), [], [], NOW).status
    message = 'jobs "r-i1-generate" is forbidden: no'
    status = apply.failed_write_status(before, "ApplyFailed", message, generation=7)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Stalled"]["status"], conditions["Stalled"]["reason"]) == ("True", "ApplyFailed")
    assert conditions["Reconciling"]["status"] == "False" and status["observedGeneration"] == 7
    assert status["message"] == 'API write failed: jobs "r-i1-generate" is forbidden: no'
    assert status["phase"] == before["phase"]  # not Failed: the write is retried, and may succeed
    assert status["iterations"] == before["iterations"]  # what the refused write would have done is not claimed


def test_resource_versions_order_the_cache_against_our_own_writes() -> None:
    assert older("41", "42") and not older("42", "42") and not older("43", "42")
    assert not older("opaque", "42")  # not integers: never assumed older


def test_a_status_patch_sends_what_changed_and_removes_what_is_gone_at_any_depth() -> None:
    old = {"phase": "Running", "frozenSpecs": {"a1": {"x": 1}, "b2": {"x": 2}}, "message": "m", "iterations": [1]}
    new = {"phase": "Running", "frozenSpecs": {"b2": {"x": 2}}, "iterations": [1, 2]}
    assert apply.status_patch(old, new) == {
        "status": {"frozenSpecs": {"a1": None}, "message": None, "iterations": [1, 2]}
    }
    assert apply.merge_patch(new, new) == {}
