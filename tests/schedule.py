"""The suite's xdist schedule: `--dist loadgroup`'s work units (a group, or a test alone), costliest first.

xdist deals units in the order of their number of tests, so a long test alone (a vLLM server's start, the
README's quick start) is dealt among the last, and the run ends with one worker on it while the others
idle. Dealt longest first by their recorded time (tests/durations.json), the short units fill in at the end
(LPT scheduling). Units of equal cost keep pytest-randomly's order; a test not in the file counts as
DEFAULT seconds, so a stale file only makes the schedule worse, never the run wrong.

    python -m pytest -n 4 --dist loadgroup --report-log=run.jsonl    # any run of the whole suite
    python -m tests.schedule run.jsonl                                 # rewrite tests/durations.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from xdist.scheduler import LoadGroupScheduling

DURATIONS = Path(__file__).with_name("durations.json")
DEFAULT = 1.0  # seconds: most tests not yet recorded are unit tests


def plain_id(nodeid: str) -> str:
    """The id without the `@group` that loadgroup appends (the group depends on the worker count)."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


class LongestFirst(LoadGroupScheduling):
    def __init__(self, config: Any, log: Any = None, durations: dict[str, float] | None = None) -> None:
        super().__init__(config, log)
        self.durations = durations if durations is not None else read_durations()
        self.ordered = False

    def cost(self, unit: dict[str, bool]) -> float:
        return sum(self.durations.get(plain_id(nodeid), DEFAULT) for nodeid in unit)

    def _assign_work_unit(self, node: Any) -> None:
        if not self.ordered:  # the queue is complete by the first assignment (LoadScopeScheduling.schedule)
            ranked = sorted(self.workqueue.items(), key=lambda item: -self.cost(item[1]))
            self.workqueue.clear()
            self.workqueue.update(ranked)
            self.ordered = False
        super()._assign_work_unit(node)


def read_durations(path: Path = DURATIONS) -> dict[str, float]:
    return json.loads(path.read_text()) if path.exists() else {}


def durations_from_report_log(lines: list[str]) -> dict[str, float]:
    """Each test's seconds (set-up, call and teardown: a group's fixtures are paid by whichever test runs
    first), from pytest-reportlog's JSON lines."""
    seconds: dict[str, float] = defaultdict(float)
    for line in lines:
        report = json.loads(line)
        if report.get("$report_type") == "TestReport":
            seconds[plain_id(report["nodeid"])] += report["duration"]
    return {nodeid: round(s, 1) for nodeid, s in sorted(seconds.items())}


if __name__ == "__main__":
    (log,) = sys.argv[1:]
    recorded = durations_from_report_log(Path(log).read_text().splitlines())
    DURATIONS.write_text(json.dumps(recorded, indent=0) + "\n")
    print(f"{DURATIONS}: {len(recorded)} tests, {sum(recorded.values()):.0f} s")
