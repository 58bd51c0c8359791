"""Experiment tracking from inside the stages: MLflow and TensorBoard (`spec.tracking`, docs/tracking.md).

The stages talk to the tracking server; the operator never does. One MLflow run per IterativeDPORun
(tagged with its namespace, name and uid), created by the run's first stage, and one nested run per
iteration, created by the iteration's first stage: each reports the id it created in its summary
(`mlflow_run_id`, `mlflow_iteration_run_id`), the operator records them in status and hands them to
the stages after it. On the iteration's run: the frozen stage configs as params, generation and ranking
statistics, TRL's per-step training metrics, a sample of the pairs. On the run's own: every evaluation
metric with step = iteration, the best checkpoint's `pvc://` URI as a tag, the report as an artifact.
TensorBoard event files go under `<run folder>/tensorboard/iter-<n>/` on the claim.

A tracking server that is down never fails a stage: the first error is a warning in the stage's summary
(`contract.warn`), and the stage stops talking to the server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from idpo_jobs import contract
from idpo_jobs.config import StageConfig, on_volume

# Fail fast when the server is away: MLflow's client retries for minutes by default.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PARAM = 500  # characters of a param value MLflow keeps (longer: cut, e.g. a chat template)
TAG = "idpo."
# The frozen spec sections each stage reports as params of its iteration's run.
SECTIONS = {"generate": ("prompts", "generation"), "rank": ("ranking",), "train": ("training",)}
SECTIONS["evaluate"] = ("evaluation",)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested sections as MLflow params: `generation.temperature` -> 0.7; lists as their repr."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= flatten(item, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): value}


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (MLflow and TensorBoard take nothing else); a map's under its path,
    e.g. the per-axis figures as `axes/<axis>/lc_win_rate_vs_base`."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out |= {f"{k}/{name}": number for name, number in numbers(v).items()}
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Tracker:
    """What one stage process reports to MLflow and TensorBoard; every call is safe to make."""

    def __init__(self, config: StageConfig | None, shard: int = 0, main: bool = True) -> None:
        self.config, self.shard = config, shard
        self.spec = config.tracking if config is not None else None
        self.enabled = self.spec is not None and main
        self.client: Any = None
        self.parent_id = self.spec.parent_run_id if self.spec else None
        self.run_id = self.spec.iteration_run_id if self.spec else None
        self.created: dict[str, str] = {}  # what this process created, for its summary
        self.writer: Any = None

    # -- failures are warnings ---------------------------------------------------------------------
    def _failed(self, what: str, err: BaseException) -> None:
        contract.warn(f"tracking failed ({what}): {type(err).__name__}: {str(err)[:200]}")
        self.client = None
        self.enabled = False

    def _mlflow(self) -> Any:
        if not self.enabled or self.spec is None or self.spec.mlflow is None:
            return None
        if self.client is None:
            for key, value in CLIENT_ENV.items():
                os.environ.setdefault(key, value)
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.spec.mlflow.tracking_uri)
        return self.client

    # -- runs --------------------------------------------------------------------------------------
    def open(self) -> dict[str, str]:
        """The run's and the iteration's MLflow runs, created if this stage is their first; the ids it
        created, for the stage's summary (metrics `mlflow_run_id`, `mlflow_iteration_run_id`)."""
        try:
            client = self._mlflow()
            if client is None or self.spec is None or self.spec.mlflow is None:
                return {}
            experiment = client.get_experiment_by_name(self.spec.mlflow.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else client.create_experiment(self.spec.mlflow.experiment)
            )
            named = {"namespace": self.spec.namespace, "name": self.spec.run, "uid": self.spec.uid}
            tags = {f"{TAG}{k}": v for k, v in named.items() if v}  # a local run has no namespace or uid
            if self.parent_id is None:
                self.parent_id = client.create_run(experiment_id, tags=tags, run_name=self.spec.run).info.run_id
                self.created["mlflow_run_id"] = self.parent_id
            iteration = self.config.iteration if self.config is not None else 0
            if self.run_id is None and iteration > 0:  # the base model's evaluation reports to the run's own
                nested = {**tags, "mlflow.parentRunId": self.parent_id, f"{TAG}iteration": str(iteration)}
                name = f"{self.spec.run}-iter-{iteration}"
                self.run_id = client.create_run(experiment_id, tags=nested, run_name=name).info.run_id
                self.created["mlflow_iteration_run_id"] = self.run_id
        except Exception as err:
            self._failed("opening the runs", err)
        return dict(self.created)

    def params(self, sections: Mapping[str, Any]) -> None:
        """The stage's frozen spec sections, as params of the iteration's run (iteration 0: the run's own)."""
        client = self._mlflow()
        run = self.run_id or self.parent_id
        if client is None or run is None:
            return
        from mlflow.entities import Param

        try:
            flat = {k: v for k, v in flatten(sections).items() if v is not None}
            params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flat.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run, params=params[start : start + 100])
        except Exception as err:
            self._failed("logging params", err)

    def metrics(self, values: Mapping[str, Any], step: int = 0, prefix: str = "", parent: bool = False) -> None:
        found = {f"{prefix}{k}": v for k, v in numbers(values).items()}
        if not found:
            return
        self._tensorboard_scalars(found, step)
        client = self._mlflow()
        run = self.parent_id if parent else self.run_id
        if client is None or run is None:
            return
        import time

        from mlflow.entities import Metric

        try:
            now = int(time.time() * 1000)
            client.log_batch(run, metrics=[Metric(k, v, now, step) for k, v in found.items()])
        except Exception as err:
            self._failed("logging metrics", err)

    def distribution(self, name: str, values: list[float], step: int = 0) -> None:
        """A distribution (response lengths, scores): its mean and deciles as metrics, and a histogram."""
        found = sorted(v for v in values if math.isfinite(v))
        if not found:
            return

        def quantile(q: float) -> float:
            return found[min(len(found) - 1, round(q * (len(found) - 1)))]

        summary = {"mean": sum(found) / len(found), "p10": quantile(0.1), "p50": quantile(0.5), "p90": quantile(0.9)}
        self.metrics(summary, step=step, prefix=f"{name}_")
        if self.enabled and self.spec is not None and self.spec.tensorboard and self.writer is not None:
            try:
                import torch

                self.writer.add_histogram(name, torch.tensor(found), step)
            except Exception as err:
                contract.warn(f"tracking failed (TensorBoard): {type(err).__name__}: {str(err)[:200]}")

    def tag(self, key: str, value: str, parent: bool = False) -> None:
        client = self._mlflow()
        run = self.parent_id if parent else self.run_id
        if client is not None and run is not None:
            try:
                client.set_tag(run, key, value)
            except Exception as err:
                self._failed("tagging", err)

    def artifact(self, path: Path, parent: bool = False) -> None:
        client = self._mlflow()
        run = self.parent_id if parent else self.run_id
        if client is not None and run is not None:
            try:
                client.log_artifact(run, str(path))
            except Exception as err:
                self._failed("logging an artifact", err)

    # -- TensorBoard -------------------------------------------------------------------------------
    def tensorboard_dir(self) -> Path:
        assert self.config is not None
        return on_volume(Path(self.config.workspace) / "tensorboard" / f"iter-{self.config.iteration}")

    def _tensorboard_scalars(self, values: Mapping[str, float], step: int) -> None:
        if not self.enabled or self.spec is None or not self.spec.tensorboard:
            return
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir()))
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        except Exception as err:
            contract.warn(f"tracking failed (TensorBoard): {type(err).__name__}: {str(err)[:200]}")
            self.spec = self.spec.model_copy(update={"tensorboard": False})

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as err:
                contract.warn(f"tracking failed (TensorBoard): {err}")


def trainer_callback(tracker: Tracker) -> Any:
    """TRL's per-step logs (loss, rewards/*, logps, learning rate, gradient norm) to the tracker."""
    from transformers import TrainerCallback

    class Track(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs:
                tracker.metrics(logs, step=state.global_step, prefix="train/")

    return Track()


_current: Tracker | None = None
_DISABLED = Tracker(None)


def current() -> Tracker:
    """The tracker of this stage process (a disabled one outside a stage, and on ranks other than 0)."""
    return _current or _DISABLED


@contextmanager
def session(config: StageConfig, shard: int) -> Iterator[Tracker]:
    """The stage's tracking: its runs opened (created if it is the first), its sections as params; closed
    at the end, whatever happened. Only one process of a stage reports: shard 0 of a sharded stage (its
    statistics stand for the stage's; the totals are in status) and rank 0 of a train gang."""
    global _current
    main = config.tracking is not None and shard == 0 and os.environ.get("RANK", "0") == "0"
    tracker = Tracker(config, shard, main=main)
    if tracker.enabled:
        tracker.open()
        tracker.params({name: getattr(config, name).to_wire() for name in SECTIONS.get(config.stage.value, ())})
    _current = tracker
    try:
        yield tracker
    finally:
        _current = None
        tracker.close()
