"""tests/schedule.py: loadgroup's units dealt longest first by their recorded seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.schedule import DEFAULT, LongestFirst, durations_from_report_log, plain_id

# Four units: a group of three short tests, a long test alone, a group of two, an unrecorded test.
COLLECTION = [
    "tests/a.py::one@a",
    "tests/a.py::two@a",
    "tests/a.py::three@a",
    "tests/b.py::long",
    "tests/c.py::x[p@q]@c",
    "tests/c.py::y@c",
    "tests/d.py::new",
]
SECONDS = {"tests/a.py::one": 5, "tests/a.py::two": 1, "tests/a.py::three": 1, "tests/b.py::long": 200}
SECONDS |= {"tests/c.py::x[p@q]": 20, "tests/c.py::y": 30}


class Node:
    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[list[str]] = []

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.sent.append([COLLECTION[i] for i in indexes])

    def shutdown(self) -> None:
        self.shutting_down = True


def dealt(durations: dict[str, float], nodes: int) -> list[list[list[str]]]:
    """The units each worker was sent, in order, when every test takes the same time."""
    config = SimpleNamespace(getvalue=lambda name: {"tx": [f"{nodes}*popen"]}[name], option=SimpleNamespace())
    config.option.loadscopereorder = True  # xdist's default: units by their number of tests
    scheduler = LongestFirst(config, durations=durations)  # type: ignore[arg-type]
    workers = [Node(f"gw{i}") for i in range(nodes)]
    for node in workers:
        scheduler.add_node(node)  # type: ignore[arg-type]
        scheduler.add_node_collection(node, COLLECTION)  # type: ignore[arg-type]
    scheduler.schedule()
    done: dict[str, int] = {node.gateway.id: 0 for node in workers}
    while not scheduler.tests_finished:
        for node in workers:
            sent = [test for unit in node.sent for test in unit]
            if done[node.gateway.id] < len(sent):
                scheduler.mark_test_complete(node, COLLECTION.index(sent[done[node.gateway.id]]))  # type: ignore[arg-type]
                done[node.gateway.id] += 1
    return [node.sent for node in workers]


def test_the_longest_unit_goes_first_and_the_unrecorded_last() -> None:
    (first,) = dealt(SECONDS, nodes=1)
    assert first[0] == ["tests/b.py::long"]  # alone, but 200 s: xdist's own order deals it after the groups
    assert first[1] == ["tests/c.py::x[p@q]@c", "tests/c.py::y@c"]
    assert sorted(first[2]) == sorted(COLLECTION[:3])  # 7 s
    assert first[3] == ["tests/d.py::new"]  # DEFAULT s


def test_each_worker_starts_on_one_of_the_longest_units() -> None:
    starts = [sent[0] for sent in dealt(SECONDS, nodes=2)]
    assert starts == [["tests/b.py::long"], ["tests/c.py::x[p@q]@c", "tests/c.py::y@c"]]


def test_without_recorded_times_the_order_is_xdists() -> None:
    (first,) = dealt({}, nodes=1)
    assert len(first[0]) == 3 and all(t.endswith("@a") for t in first[0])  # the most tests: each counts DEFAULT
    assert DEFAULT > 0


@pytest.mark.parametrize(
    ("nodeid", "test"),
    [
        ("tests/a.py::t@g", "tests/a.py::t"),
        ("tests/a.py::t[x@y]", "tests/a.py::t[x@y]"),
        ("tests/a.py::t[x@y]@g", "tests/a.py::t[x@y]"),
    ],
)
def test_the_group_is_not_part_of_a_tests_id(nodeid: str, test: str) -> None:
    assert plain_id(nodeid) == test


def test_a_tests_seconds_are_its_set_up_call_and_teardown_from_the_report_log() -> None:
    def report(nodeid: str, when: str, duration: float) -> str:
        return json.dumps({"$report_type": "TestReport", "nodeid": nodeid, "when": when, "duration": duration})

    lines = [json.dumps({"$report_type": "SessionStart"}), report("t.py::a@g", "setup", 90.0)]
    lines += [report("t.py::a@g", "call", 2.0), report("t.py::a@g", "teardown", 0.5), report("t.py::b", "call", 1.0)]
    assert durations_from_report_log(lines) == {"t.py::a": 92.5, "t.py::b": 1.0}
