"""A real MLflow tracking server for the tracking tests, and what a tracked run must show in it.

The server is the `mlflow` package's own (`mlflow server`): a SQLite backend store, artifacts served
from a local folder, on 127.0.0.1, so that local runs and the test cluster's stage pods (processes on
this machine) reach it on loopback. The checks read it back through `MlflowClient` only."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idpo_jobs import tracking

from tests.harness.cluster import free_port, start_server, stop_group


class TrackingServer:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> TrackingServer:  # a minute on a machine that runs the suite in parallel
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--workers", "1"]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        # No server-side job runner: idpo uses none of MLflow's server jobs (GenAI scorers), and its seven
        # polling consumer processes per server would take memory and CPU from the stages under test.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        health = f"{self.uri}/health"
        self.proc = start_server(command, self.root / "server.log", health, timeout, "the MLflow server", env=env)
        return self

    def stop(self) -> None:
        """The whole server: `mlflow server` runs uvicorn as a child, in its session."""
        stop_group(self.proc)

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def expected_params(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The params an iteration's MLflow run must hold: its stages' frozen configs (`configs`: stage ->
    the config as the stage got it, JSON), section by section, flattened."""
    found: dict[str, str] = {}
    for stage, config in configs.items():
        for section in tracking.SECTIONS[stage]:
            flat = tracking.flatten({section: config[section]})
            found |= {k: str(v)[: tracking.MAX_PARAM] for k, v in flat.items() if v is not None}
    return found


def check_tracked(
    server: TrackingServer,
    experiment: str,
    run: str,
    configs: Mapping[int, Mapping[str, Mapping[str, Any]]],
    best_checkpoint: str,
) -> dict[str, Any]:
    """One MLflow run for `run`, a nested run per iteration in `configs` (iteration -> stage -> config) with
    those configs as params and TRL's per-step loss at several steps, the evaluation's win rates at
    step = iteration, the best checkpoint as a tag and the report as an artifact. The parent run."""
    client = server.client()
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`idpo.name` = '{run}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    nested = {int(r.data.tags["idpo.iteration"]): r for r in runs if r is not parent}
    assert sorted(nested) == sorted(configs), sorted(nested)
    for iteration, child in nested.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params == expected_params(configs[iteration])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert len(set(steps)) >= 3, f"iteration {iteration}: train/loss at steps {steps}"
        assert child.data.metrics["rank/pairs"] >= 1 and "generate/response_chars_p50" in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["pairs-sample.jsonl"]
    rates = client.get_metric_history(parent.info.run_id, "evaluate/win_rate_vs_base")
    assert sorted(m.step for m in rates) == sorted(configs)
    assert parent.data.tags["idpo.best_checkpoint"] == best_checkpoint
    assert "report.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    return {"parent": parent, "nested": nested}
