"""Experiment tracking of a local run: a real MLflow server sees the run, its iterations, TRL's per-step
metrics and the evaluation; TensorBoard's own reader reads the event files; a server that goes away
mid-run costs warnings, not the run. The same MLflow story on the test cluster is in test_operator_e2e."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs.config import Stage
from idpo_operator.local import LocalRunner
from idpo_operator.plan import StageKey
from idpo_operator.spec import parse_manifest

from tests.conftest import manifest
from tests.harness.tracking import TrackingServer, check_tracked

pytestmark = pytest.mark.slow


def configs_of(workdir: Path) -> dict[int, dict[str, Any]]:
    """Iteration -> stage -> the config the stage got, as `idpo run` wrote it for the stage."""
    found: dict[int, dict[str, Any]] = {}
    for path in (workdir / "configs").glob("iter-*.json"):
        _, iteration, stage = path.stem.split("-")
        if int(iteration) > 0:
            found.setdefault(int(iteration), {})[stage] = json.loads(path.read_text())
    return found


def test_a_local_run_is_one_mlflow_run_with_a_nested_run_per_iteration(mlflow_server, evaluated_run: Path) -> None:
    status = json.loads((evaluated_run / "status.json").read_text())  # tests.conftest.PLATEAU: 2 iterations ran
    assert status["phase"] == "Succeeded"
    found = check_tracked(mlflow_server, "local", "plateau", configs_of(evaluated_run), status["bestCheckpoint"])
    assert status["tracking"]["mlflowRunId"] == found["parent"].info.run_id
    assert not any(s.get("message") for it in status["iterations"] for s in it["stages"].values())  # no warnings


def test_tensorboards_reader_reads_the_event_files_one_folder_per_iteration(evaluated_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = evaluated_run / "workspace" / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == ["iter-0", "iter-1", "iter-2"]
    for iteration in (1, 2):
        events = EventAccumulator(str(root / f"iter-{iteration}"), size_guidance={"scalars": 0}).Reload()
        tags = events.Tags()
        loss = events.Scalars("train/loss")
        assert len({e.step for e in loss}) >= 3 and all(0 < e.value < 5 for e in loss)
        assert {"train/rewards/margins", "rank/pairs", "evaluate/win_rate_vs_base"} <= set(tags["scalars"])
        assert {"rank/chosen_score", "generate/response_chars"} <= set(tags["histograms"])
        rates = events.Scalars("evaluate/win_rate_vs_base")
        assert [e.step for e in rates] == [iteration] and 0 <= rates[0].value <= 1
    base = EventAccumulator(str(root / "iter-0")).Reload()
    assert "evaluate/mean_response_chars" in base.Tags()["scalars"]


class ServerStoppedAfter(LocalRunner):
    """`idpo run` whose tracking server is stopped once a given stage has finished."""

    def __init__(self, doc: dict[str, Any], workdir: Path, server: TrackingServer, after: StageKey) -> None:
        super().__init__(parse_manifest(doc), workdir)
        self.server, self.after = server, after

    def run_stage(self, key: StageKey) -> None:
        super().run_stage(key)
        if key == self.after:
            self.server.stop()


def test_a_tracking_server_stopped_mid_run_costs_warnings_and_the_run_succeeds(tmp_path: Path) -> None:
    server = TrackingServer(tmp_path / "mlflow").start()
    try:
        doc = manifest("orphan", iterations=1, tracking={"mlflow": {"trackingUri": server.uri}})
        runner = ServerStoppedAfter(doc, tmp_path / "w", server, after=StageKey(1, Stage.GENERATE))
        assert runner.run() == 0
    finally:
        server.stop()
    iterations = json.loads((tmp_path / "w" / "status.json").read_text())["iterations"]
    stages = next(it["stages"] for it in iterations if it["iteration"] == 1)
    assert {s: v["phase"] for s, v in stages.items()} == dict.fromkeys(("generate", "rank", "train"), "Succeeded")
    assert stages["generate"].get("message") is None and stages["generate"]["metrics"]["mlflow_run_id"]
    for later in ("rank", "train"):
        assert stages[later]["message"].startswith("tracking failed ("), stages[later]
