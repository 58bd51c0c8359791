"""One decision, two executors: the operator (`reconcile.decide` over Jobs) and `idpo run` (stage
processes over a workspace) are driven through the same sequences of stage outcomes, and must start the
same stages, stop for the same reason, and both ask `rules.next_step`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs import contract
from idpo_jobs.config import SUCCESS_FILE, Stage
from idpo_operator import resources, rules
from idpo_operator.local import LocalRunner
from idpo_operator.observe import job_view, pod_view
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import RunView, decide
from idpo_operator.spec import parse_manifest

from tests.conftest import manifest
from tests.test_reconcile import NOW, job_raw, pod_raw

# What a stage reports when it ends: its metrics, or None for a failure.
Outcome = Callable[[StageKey], dict[str, Any] | None]


def evaluated(lc_by_iteration: dict[int, float]) -> Outcome:
    def outcome(key: StageKey) -> dict[str, Any] | None:
        if key.stage is Stage.EVALUATE and key.iteration in lc_by_iteration:
            lc = lc_by_iteration[key.iteration]
            return {"prompts": 16, "lc_win_rate_vs_base": lc, "lc_win_rate_vs_previous": lc, "win_rate_vs_base": lc}
        return {"prompts": 8}

    return outcome


def failing_at(failed: StageKey) -> Outcome:
    return lambda key: None if key == failed else {"prompts": 8}


# Names only: no stage runs, so nothing is loaded (and no tiny model is built).
MODELS = {"model": {"name": "org/policy"}, "prompts": {"source": "/data/prompts.jsonl"}, "ranking": {"model": "org/rm"}}
STOP_BELOW_HALF = {"enabled": True, "stopWhen": {"metric": "lcWinRateVsPrevious", "below": 0.5}}
CASES = {
    "early-stop": ({"iterations": 3, "evaluation": STOP_BELOW_HALF}, evaluated({0: 0.5, 1: 0.7, 2: 0.4, 3: 0.9})),
    "all-iterations": ({"iterations": 2, "evaluation": STOP_BELOW_HALF}, evaluated({0: 0.5, 1: 0.7, 2: 0.8})),
    "a-failed-stage": ({"iterations": 2}, failing_at(StageKey(2, Stage.RANK))),
    "suspended": ({"iterations": 1, "suspend": True}, failing_at(StageKey(9, Stage.TRAIN))),
}


def on_the_cluster(spec: dict[str, Any], outcome: Outcome) -> tuple[list[StageKey], str]:
    """Reconcile after reconcile, each created Job ends as `outcome` says."""
    run, jobs, pods, started = RunView("r", "ns", "uid-12345678", 1, spec), [], [], []
    for _ in range(40):
        decision = decide(run, [job_view(j) for j in jobs], [pod_view(p) for p in pods], NOW)
        run = RunView(run.name, run.namespace, run.uid, run.generation, spec, decision.status)
        created = [o for o in decision.create if o["kind"] == "Job"]
        if not created:
            return started, decision.status["phase"]
        labels = created[0]["metadata"]["labels"]
        key = StageKey(int(labels[resources.LABEL_ITERATION]), Stage(labels[resources.LABEL_STAGE]))
        started.append(key)
        metrics = outcome(key)
        jobs.append(job_raw(key, "Complete" if metrics is not None else "Failed"))
        pods.append(pod_raw(key, {"metrics": metrics} if metrics is not None else {"error": "boom"}))
    raise AssertionError("the run never settled")


class ScriptedRunner(LocalRunner):
    """`idpo run` whose stage processes are replaced by the outcomes: a success writes the stage's
    `_SUCCESS.json` files as the stage contract does, a failure writes nothing."""

    def __init__(self, doc: dict[str, Any], workdir: Path, outcome: Outcome) -> None:
        super().__init__(parse_manifest(doc), workdir)
        self.outcome, self.started = outcome, []

    def heldout_problem(self) -> None:  # the prompts are a name only: no stage reads them
        return None

    def execute(self, key: StageKey, config_path: Path, shards: int) -> str | None:
        self.started.append(key)
        metrics = self.outcome(key)
        if metrics is None:
            return "exit 1: boom"
        for part in contract.stage_parts(self.workspace.stage_dir(key.iteration, key.stage), shards, key.stage):
            part.mkdir(parents=True)
            summary = {"metrics": metrics, "startTime": time.time(), "completionTime": time.time()}
            (part / SUCCESS_FILE).write_text(json.dumps(summary))
        return None


def locally(doc: dict[str, Any], outcome: Outcome, workdir: Path) -> tuple[list[StageKey], str]:
    runner = ScriptedRunner(doc, workdir, outcome)
    runner.run()
    return runner.started, json.loads((workdir / "status.json").read_text())["phase"]


@pytest.mark.parametrize("case", list(CASES))
def test_both_executors_start_the_same_stages_and_stop_for_the_same_reason(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    override, outcome = CASES[case]
    doc = manifest("r", **MODELS, **override)
    asked: list[str] = []
    real = rules.next_step

    def spy(spec: Any, records: Any) -> rules.Step:
        step = real(spec, records)
        asked.append(step.stop.value if step.stop else "start")
        return step

    monkeypatch.setattr(rules, "next_step", spy)
    cluster = on_the_cluster(doc["spec"], outcome)
    cluster_asked, asked[:] = list(asked), []
    local = locally(doc, outcome, tmp_path / "w")
    assert cluster == local
    assert cluster_asked[-1] == asked[-1]  # both stopped because next_step said so, for the same reason
    started, phase = cluster
    if case == "early-stop":
        assert phase == "Succeeded" and started[-1] == StageKey(2, Stage.EVALUATE)
        assert not any(k.iteration == 3 for k in started) and asked[-1] == "early-stopped"
    elif case == "a-failed-stage":
        assert phase == "Failed" and started[-1] == StageKey(2, Stage.RANK) and asked[-1] == "failed"
    elif case == "suspended":
        assert (started, phase, asked[-1]) == ([], "Suspended", "suspended")
    else:
        assert phase == "Succeeded" and started[-1] == StageKey(2, Stage.EVALUATE) and asked[-1] == "done"
