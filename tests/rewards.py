"""Programmatic rewards for the `function` ranker in tests (importable by stage subprocesses).

The e2e suite copies this file onto the cluster's volume; the stage image has `idpo_jobs`, whose demo
reward the tests rank with too."""

import os
from pathlib import Path

from idpo_jobs.rewards import starts_with_s

__all__ = ["flaky", "not_a_number", "starts_with_s", "stub_summary"]


def not_a_number(prompt: str, response: str) -> str:
    return "high"


def flaky(prompt: str, response: str) -> float:
    """Times out on the first call of a run, as a remote scorer might; `IDPO_FLAKY_MARKER` (a path on
    the volume) remembers that it happened, so the retried pod scores normally."""
    marker = Path(os.environ["IDPO_FLAKY_MARKER"])
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise TimeoutError("the scoring service did not answer")
    return starts_with_s(prompt, response)


def stub_summary(prompt: str, response: str) -> float:
    """A broken stage: ends at once, successfully, leaving `IDPO_STUB_SUMMARY` as its summary (the
    termination message), as a stage of another image, or a bug, could."""
    path = os.environ.get("IDPO_TERMINATION_LOG") or "/dev/termination-log"
    Path(path).write_text(os.environ["IDPO_STUB_SUMMARY"])
    os._exit(0)
