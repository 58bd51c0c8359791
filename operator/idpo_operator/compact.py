"""What a run's status keeps of finished work, so that it stays small at the documented caps.

etcd holds an object of at most 1.5 MiB, and kubectl, Argo CD and Flux read the whole status on every
look. So, whatever the stages report:
- a stage's part digests stay only until the stage that reads the parts has succeeded (they exist to
  refuse a rebuilt input);
- frozen spec sections stay only for the iterations still running and the latest finished one (each
  iteration keeps its `specDigest`);
- past `BUDGET` bytes, the oldest finished iterations keep only their headline metrics, marked
  `compacted: true`; the latest `KEEP_WHOLE` iterations always stay whole. A stage's full metrics are
  in its `_SUCCESS.json` on the claim, and in the tracking server when there is one.
"""

from __future__ import annotations

import json
from typing import Any

from idpo_jobs import winrate
from idpo_jobs.config import Stage

BUDGET = 192 * 1024  # bytes of status.iterations and status.frozenSpecs together
KEEP_WHOLE = 5
READS = {Stage.RANK.value: Stage.GENERATE.value, Stage.TRAIN.value: Stage.RANK.value}
# The MLflow runs a stage created stay: later stages report to them.
TRACKING = ("mlflow_run_id", "mlflow_iteration_run_id")
HEADLINE = {
    Stage.GENERATE.value: ("prompts", "responses", "mean_response_chars", *TRACKING),
    Stage.RANK.value: ("pairs", "dropped_ties", "mean_chosen_score", "mean_rejected_score", *TRACKING),
    Stage.TRAIN.value: ("pairs", "steps", "loss", "reward_accuracy", "reward_margin", "resumed_from_step", *TRACKING),
    # What early stopping and the best checkpoint are decided on must survive (per axis too).
    Stage.EVALUATE.value: (
        "prompts",
        "win_rate_vs_base",
        "lc_win_rate_vs_base",
        "lc_win_rate_vs_previous",
        "mean_response_chars",
        "mean_length_ratio_vs_base",
        "axes",
        "judges",
        *TRACKING,
    ),
}
# What a compacted evaluation keeps of the axis or judge `stopWhen` follows (the metrics it can name), as plain
# values; other axes' and judges' figures go (8 of each for 100 iterations would not fit).
AXIS_HEADLINE = ("lc_win_rate_vs_base", "lc_win_rate_vs_previous")
KEPT_FIELDS = ("phase", "attempts", "startTime", "completionTime")


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


def drop_used_digests(iterations: list[dict[str, Any]]) -> None:
    for entry in iterations:
        stages = entry["stages"]
        for reader, source in READS.items():
            if stages.get(reader, {}).get("phase") == "Succeeded" and source in stages:
                stages[source].pop("digests", None)


def kept_specs(iterations: list[dict[str, Any]], specs: dict[str, Any]) -> dict[str, Any]:
    """The frozen sections the running iterations and the latest finished one name."""
    running = [e for e in iterations if e["phase"] != "Succeeded"]
    finished = [e for e in iterations if e["phase"] == "Succeeded"]
    wanted = {e.get("specDigest") for e in [*running, *finished[-1:]]}
    return {d: s for d, s in specs.items() if d in wanted}


def _headline(key: str, value: Any, follow: tuple[tuple[str, str], ...]) -> Any:
    if isinstance(value, str):
        return value[:60]
    if key in ("axes", "judges") and isinstance(value, dict):
        kept = {n: f for n, f in value.items() if (key, n) in follow and isinstance(f, dict)}
        return {n: {k: winrate.value_of(v) for k, v in f.items() if k in AXIS_HEADLINE} for n, f in kept.items()}
    return value


def _compacted(name: str, stage: dict[str, Any], follow: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    metrics = stage.get("metrics") or {}
    headline = {k: _headline(k, v, follow) for k, v in metrics.items() if k in HEADLINE[name]}
    return {**{k: stage[k] for k in KEPT_FIELDS if k in stage}, "metrics": headline, "compacted": True}


def within_budget(
    iterations: list[dict[str, Any]],
    specs: dict[str, Any],
    budget: int = BUDGET,
    follow: tuple[tuple[str, str], ...] = (),
) -> None:
    """Compact the oldest finished iterations, in place, until iterations and specs fit `budget`; `follow`: the
    (`axes` or `judges`, name) whose figures decisions read (`evaluation.stopWhen.source`)."""
    size = _size(iterations) + _size(specs)
    candidates = [e for e in iterations[:-KEEP_WHOLE] if e["phase"] == "Succeeded"]
    for entry in candidates:
        if size <= budget:
            return
        before = _size(entry)
        entry["stages"] = {name: _compacted(name, stage, follow) for name, stage in entry["stages"].items()}
        size -= before - _size(entry)
