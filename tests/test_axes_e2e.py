"""Axes on the test cluster (docs/ranking.md): one short run with two objectives and a gate, length control at
pairing and a stopWhen on one axis, through the real operator, Jobs and stage CLIs; per-axis figures in status
and in MLflow; a function axis the policy does not allow refused by the operator, and by the chart's
admission policy."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.harness.cluster import Cluster, Target
from tests.test_operator_e2e import (
    CLAIM,
    delete_runs_afterwards,  # noqa: F401  (autouse: the e2e module's, here too)
    run_manifest,
    stage,
)
from tests.test_security import SUITE, admission_policy

pytestmark = pytest.mark.slow
REWARDS = "idpo_jobs.rewards"
AXES = [
    {"name": "s-words", "kind": "function", "function": f"{REWARDS}:starts_with_s", "weight": 1.0},
    {"name": "length", "kind": "function", "function": f"{REWARDS}:word_count", "weight": 0.5},
    {"name": "distinct", "kind": "function", "function": f"{REWARDS}:distinct_words", "gate": {"min": 0.5}},
]
FORBIDDEN = [AXES[0], {"name": "env", "kind": "function", "function": "os:getenv", "gate": {"min": 0}}]


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory):
    with Cluster(kube, tmp_path_factory.mktemp("axes"), "axes") as c:
        c.seed(CLAIM)
        yield c


def axes_run(name: str, axes: list[dict[str, Any]], **override: Any) -> dict[str, Any]:
    ranking = {"axes": axes, "pairing": {"maxLengthRatio": 1.5}}
    return run_manifest(name, ranking=ranking, **override)


def test_a_gated_two_axis_run_reports_each_axis_and_a_forbidden_one_is_refused(cluster: Cluster, mlflow_server) -> None:
    local = cluster.target.plane is not None
    tracking = {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "axes"}} if local else {}
    evaluation = {"enabled": True, "stopWhen": {"axis": "s-words", "metric": "lcWinRateVsBase", "maxLengthRatio": 50}}
    doc = axes_run("axes", AXES, evaluation=evaluation, tracking=tracking)
    assert cluster.apply(doc).returncode == 0
    assert cluster.apply(axes_run("forbidden", FORBIDDEN, iterations=1)).returncode == 0

    refused = cluster.wait_phase("forbidden", "Failed", timeout=60)
    assert "spec.ranking.axes[1].function: module of 'os:getenv' is not allowed" in refused["message"]
    assert cluster.jobs("forbidden") == []

    status = cluster.wait_phase("axes", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    for iteration in (1, 2):
        rank = stage(status, iteration, "rank")["metrics"]
        assert rank["ranker"] == "axes" and set(rank["axes"]) == {"s-words", "length", "distinct"}
        assert rank["pairs"] + rank["dropped_ties"] + rank["dropped_gates"] + rank["dropped_length_ratio"] == 8
        assert rank["pairs"] >= 1 and rank["axes"]["distinct"]["dropped_prompts"] <= rank["dropped_gates"]
        assert rank["axes"]["distinct"]["mean_chosen_score"] >= 0.5  # nothing the gate fails is chosen
        evaluated = stage(status, iteration, "evaluate")["metrics"]
        for axis in ("s-words", "length", "distinct"):
            value, low, high = evaluated["axes"][axis]["lc_win_rate_vs_base"]
            assert 0 <= low <= value <= high <= 1
        assert 0 <= evaluated["axes"]["distinct"]["pass_rate"] <= 1
        assert evaluated["mean_length_ratio_vs_base"] > 0
    # bestIteration follows the s-words axis's LC win rate against the base model.
    figures = [stage(status, i, "evaluate")["metrics"]["axes"]["s-words"]["lc_win_rate_vs_base"][0] for i in (1, 2)]
    assert status["bestIteration"] == 1 + figures.index(max(figures))
    if local:
        client = mlflow_server.client()
        experiment = client.get_experiment_by_name("axes")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`idpo.name` = 'axes'")
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        history = client.get_metric_history(parent.info.run_id, "evaluate/axes/s-words/lc_win_rate_vs_base")
        assert sorted(m.step for m in history) == [1, 2]
        nested = [r for r in runs if r is not parent]
        assert all("rank/axes/distinct/dropped_prompts" in r.data.metrics for r in nested)


def test_the_admission_policy_refuses_a_function_axis_it_does_not_allow(cluster: Cluster) -> None:
    allowed = axes_run("allowed", AXES, iterations=1)
    allowed["spec"]["runtime"]["image"] = cluster.image
    with admission_policy(cluster, SUITE):  # in force inside, removed after
        refused = cluster.apply(axes_run("forbidden", FORBIDDEN, iterations=1))
        assert refused.returncode != 0, "the admission policy let a forbidden function axis through"
        assert "spec.ranking.axes: an axis's function module is not allowed" in refused.stderr, refused.stderr
        checked = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(allowed))
        assert checked.returncode == 0, checked.stderr
