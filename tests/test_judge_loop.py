"""LLM judges in the loop: per-iteration judge figures in the evaluate stage, status, `idpo status`, the report
and the stop rules; `kind: judge` as a ranking axis; and a local run against vLLM's OpenAI server on CPU
serving the tiny judge (tests/harness/vllm_server.py), behind a counting front of ours."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from idpo_jobs import axes, contract, pairing, report, winrate
from idpo_jobs.config import AxisSpec, PairingSpec, StopWhen
from idpo_operator import table
from idpo_operator.observe import parse_summary
from idpo_operator.spec import IterativeDPORunSpec
from pydantic import ValidationError

from tests.conftest import env_with_tests, manifest
from tests.harness.vllm_server import Front, VLLMServer

LONGEST = [f"{'j' * 31}{n}" for n in range(8)]  # 8 judges of 32-character names: the caps


def judge_figures(lc: float = 0.61) -> dict[str, Any]:
    c = winrate.compare([1, 0, 0.5, 1, 0, 1, 1, 0, 1, 0.5] * 20, [n * 37.3 - 1000 for n in range(200)])
    figures = {**c.figures("vs_base"), "ties_vs_base": 40, **c.figures("vs_previous"), "ties_vs_previous": 40}
    figures["lc_win_rate_vs_base"] = [lc, lc - 0.1, lc + 0.1]
    return figures | {"calls": 20000, "cached": 20000, "failures": 20000, "tokens": 123456789}


# -- what status holds ------------------------------------------------------------------------------------
def test_eight_axes_and_eight_judges_at_the_caps_fit_a_termination_message_keeping_what_decisions_read(
    tmp_path: Path,
) -> None:
    from tests.test_axes import evaluate_metrics

    metrics = {**evaluate_metrics(), "judges": {n: judge_figures() for n in LONGEST}}
    log = tmp_path / "term"
    summary = {"stage": "evaluate", "iteration": 100, "shard": 0, "shards": 1, "metrics": metrics}
    contract.write_termination_log(contract.StageConfig.model_construct(termination_log=str(log)), summary)
    assert len(log.read_bytes()) <= contract.TERMINATION_LIMIT
    written = parse_summary(log.read_text()).metrics
    assert written["blocks_trimmed"] is True and written["lc_win_rate_vs_base"] == metrics["lc_win_rate_vs_base"]
    for name in LONGEST:  # every judge keeps its LC rates (as values) and its cost
        assert written["judges"][name] == {
            "lc_win_rate_vs_base": 0.61,
            "lc_win_rate_vs_previous": metrics["judges"][name]["lc_win_rate_vs_previous"][0],
            "calls": 20000,
            "failures": 20000,
            "tokens": 123456789,
        }
    assert set(written["axes"]) == set(metrics["axes"])
    small = {"stage": "evaluate", "metrics": {"prompts": 8, "judges": {"j": judge_figures()}}}
    contract.write_termination_log(contract.StageConfig.model_construct(termination_log=str(log)), small)
    assert json.loads(log.read_text())["metrics"] == small["metrics"]  # whole when it fits


def test_a_summary_carries_bounded_per_judge_figures() -> None:
    parsed = parse_summary(json.dumps({"metrics": {"judges": {"j": {"lc_win_rate_vs_base": [0.6, 0.5, math.inf]}}}}))
    assert parsed.metrics["judges"] == {"j": {"lc_win_rate_vs_base": [0.6, 0.5, None]}}
    with pytest.raises(ValueError, match="not a map of at most 8 judges"):
        parse_summary(json.dumps({"metrics": {"judges": {f"j{n}": {} for n in range(9)}}}))
    with pytest.raises(ValueError, match=re.escape("metric 'judges.j.deeper' is a dict")):
        parse_summary(json.dumps({"metrics": {"judges": {"j": {"deeper": {"x": 1}}}}}))


def history(*rows: tuple[float, float]) -> list[dict[str, Any]]:
    """Evaluations 1..n: (the ranker's LC vs base, judge j's LC vs base)."""
    return [
        {"lc_win_rate_vs_base": ranker, "judges": {"j": {"lc_win_rate_vs_base": [judge, judge - 0.1, judge + 0.1]}}}
        for ranker, judge in rows
    ]


def test_stop_when_and_the_best_iteration_can_follow_a_judge() -> None:
    found = history((0.9, 0.7), (0.95, 0.4), (0.99, 0.45))  # the ranker climbs; the independent judge does not
    by_judge = StopWhen(judge="j", patience=1, min_delta=0.01)
    assert winrate.best_of(found, by_judge) == 0 and winrate.best_of(found, StopWhen(patience=1)) == 2
    assert winrate.should_stop(found, by_judge) == (
        True,
        "lcWinRateVsBase of judge j: the best of the last 1 iteration(s), 0.450, is not 0.01 above the best "
        "before them, 0.700",
    )
    assert winrate.should_stop(found, StopWhen(judge="j", below=0.42)) == (False, "")
    with pytest.raises(ValidationError, match="an `axis` or a `judge`, not both"):
        StopWhen(judge="j", axis="a", below=0.5)


def test_a_stop_rule_naming_no_judge_of_the_run_is_refused() -> None:
    judge = {"name": "gpt4", "endpoint": {"baseUrl": "https://api.openai.com/v1", "model": "m"}}
    ok = manifest(evaluation={"judges": [judge], "stopWhen": {"judge": "gpt4", "below": 0.5}})["spec"]
    IterativeDPORunSpec.model_validate(ok)
    wrong = manifest(evaluation={"judges": [judge], "stopWhen": {"judge": "gpt5", "below": 0.5}})["spec"]
    with pytest.raises(ValidationError, match=r"evaluation.stopWhen.judge: 'gpt5' is not a judge of evaluation.judges"):
        IterativeDPORunSpec.model_validate(wrong)


def judged_status(name: str = "gpt4") -> dict[str, Any]:
    return {
        "phase": "Running",
        "iterations": [
            {"iteration": 0, "stages": {"evaluate": {"phase": "Succeeded", "metrics": {"prompts": 8}}}},
            {
                "iteration": 1,
                "stages": {
                    "evaluate": {
                        "phase": "Succeeded",
                        "metrics": {"prompts": 8, "mean_length_ratio_vs_base": 1.1, "judges": {name: judge_figures()}},
                    }
                },
            },
        ],
    }


def test_idpo_status_and_the_report_show_each_judge_and_escape_its_name() -> None:
    shown = table.render(judged_status())
    assert "judges: LC win rate vs base" in shown and "GPT4" in shown and "0.610 / 20000 failed" in shown
    md = report.render_markdown(judged_status())
    assert "## LLM judges" in md and "| 1 | gpt4 | 0.600 [0." in md and "| 40 / 40 | 20000 | 20000 | 20000 |" in md
    html = report.render_html(judged_status("<b>x</b>"))
    assert "<h2>LLM judges</h2>" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    hostile = report.render_markdown(judged_status("x|y\x1b[2J"))
    assert "\x1b" not in hostile and "x|y" not in hostile


# -- kind: judge as a ranking axis --------------------------------------------------------------------------
RATER = {"name": "rater", "endpoint": {"baseUrl": "http://127.0.0.1:8000/v1", "model": "m"}, "template": "pointwise"}


def test_a_judge_axis_needs_a_pointwise_judge() -> None:
    AxisSpec.model_validate({"name": "r", "kind": "judge", "judge": RATER, "weight": 1})
    with pytest.raises(ValidationError, match="needs `judge` with template `pointwise`"):
        AxisSpec.model_validate(
            {"name": "r", "kind": "judge", "judge": {**RATER, "template": "alpaca-eval"}, "weight": 1}
        )
    with pytest.raises(ValidationError, match="`judge` is for kind judge"):
        AxisSpec.model_validate({"name": "r", "kind": "function", "function": "m:f", "judge": RATER, "weight": 1})


def test_a_response_the_judge_could_not_rate_is_never_chosen_and_pairs_stay_strict_json() -> None:
    rater = AxisSpec.model_validate({"name": "rater", "kind": "judge", "judge": RATER, "weight": 1})
    length = AxisSpec.model_validate({"name": "len", "kind": "function", "function": "m:f", "weight": 1})
    for axis_list, scores in (
        ([rater], {"rater": [math.nan, 3.0, 7.5]}),
        ([rater, length], {"rater": [math.nan, 3.0, 7.5], "len": [100.0, 1.0, 2.0]}),
    ):
        combined = axes.combine(scores, axis_list, "rank")
        ok = axes.passing(scores, axis_list)
        assert all(math.isfinite(v) for v in combined) and combined[0] < min(combined[1:]) and ok == [False, True, True]
        pair = pairing.decide(combined, ["a", "b", "c"], PairingSpec(), ok)
        assert pair == pairing.Pair(2, 0)  # the unrated one may be rejected, never chosen
        row = pairing.preference_row({"prompt_id": "p", "prompt": "q", "all_generated_responses": ["a", "b", "c"]},
                                     combined, pair, scores)  # fmt: skip
        json.dumps(row, allow_nan=False)
    assert pairing.decide([0.0, 0.0], ["a", "b"], PairingSpec(), axes.passing({"rater": [math.nan] * 2}, [rater])) is (
        pairing.Drop.GATE
    )


# -- a local run with a judge, on the real server -----------------------------------------------------------
def _tree_text(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.stat().st_size < 1 << 22)


@pytest.mark.slow
def test_a_local_run_ranks_by_a_judge_axis_and_reports_per_iteration_judge_figures(
    judge_server: VLLMServer, tmp_path: Path
) -> None:
    with Front(judge_server.url) as front:
        secret = {"name": "judge", "key": "token"}
        endpoint = {"baseUrl": f"{front.url}/v1", "model": "tiny-judge", "apiKeySecret": secret}
        judge = {"name": "tiny", "endpoint": endpoint, "maxConcurrency": 4}
        rater = {**judge, "name": "rater", "template": "pointwise"}
        doc = manifest(
            "judged",
            iterations=1,
            evaluation={"enabled": True, "limit": 6, "minPrompts": 4, "judges": [judge],
                        "stopWhen": {"judge": "tiny", "below": 0.0}},
            ranking={"axes": [{"name": "rater", "kind": "judge", "judge": rater, "weight": 1}]},
        )  # fmt: skip
        path, workdir, rules = tmp_path / "judged.yaml", tmp_path / "w", tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(doc))
        rules.write_text(yaml.safe_dump({"secrets": ["judge"], "endpoints": [front.url]}))
        key = judge_server.api_key or ""
        env = {**env_with_tests(), "IDPO_JUDGE_API_KEY_TINY": key, "IDPO_JUDGE_API_KEY_RATER": key}
        command = [sys.executable, "-m", "idpo_operator.cli", "run", str(path), "--workdir", str(workdir)]
        ran = subprocess.run([*command, "--policy", str(rules)], env=env, capture_output=True, text=True, timeout=900)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        sent = front.requests()
    status = json.loads((workdir / "status.json").read_text())
    ranked = status["iterations"][1]["stages"]["rank"]["metrics"]
    assert (
        ranked["pairs"] > 0
        and ranked["axes"]["rater"]["mean_chosen_score"] > ranked["axes"]["rater"]["mean_rejected_score"]
    )
    (pairs,) = (workdir / "workspace").rglob("iter-1/rank/**/pairs.jsonl")
    ratings = [v for row in map(json.loads, pairs.read_text().splitlines()) for v in row["axis_scores"]["rater"]]
    assert all(v is None or 1 <= v <= 9 for v in ratings)
    figures = status["iterations"][1]["stages"]["evaluate"]["metrics"]["judges"]["tiny"]
    value, low, high = figures["lc_win_rate_vs_base"]
    assert 0 <= low <= value <= high <= 1 and len(figures["win_rate_vs_base"]) == 3
    # Both orders for every held-out prompt whose responses differ from the base model's; identical ones tie free.
    responses = {
        k: {r["prompt_id"]: r["response"] for r in map(json.loads, p.read_text().splitlines())}
        for k in (0, 1)
        for p in (workdir / "workspace").rglob(f"iter-{k}/evaluate/responses.jsonl")
    }
    differ = sum(1 for pid, text in responses[1].items() if responses[0][pid] != text)
    assert figures["calls"] == 2 * differ and figures["failures"] == 0 and figures["tokens"] > 0
    assert figures["ties_vs_base"] >= len(responses[1]) - differ
    assert len(sent) > figures["calls"]  # the rank stage's ratings went to the same server
    assert status["bestIteration"] == 1  # picked by the stop rule's judge: it has figures for iteration 1
    assert key not in _tree_text(workdir)  # not in status, logs, configs or the judgment cache


@pytest.mark.slow
def test_a_cluster_run_reports_per_iteration_judge_figures_in_its_status(
    kube: Any, judge_server: VLLMServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The operator gives the evaluate pod the key from a Secret; the pod (a local process on the test cluster)
    reaches the judge on loopback, which the policy's `endpoints` lists."""
    from tests.harness.cluster import Cluster
    from tests.test_operator_e2e import CLAIM, run_manifest

    if kube.plane is None:
        pytest.skip("the judge listens on this machine's loopback, which only the local control plane's pods reach")
    with Front(judge_server.url) as front:
        cluster = Cluster(kube, tmp_path_factory.mktemp("judge-e2e"), "judge")
        cluster.policy_overrides = {"secrets": ["judge-key"], "endpoints": [front.url]}
        with cluster:
            cluster.seed(CLAIM)
            key = judge_server.api_key or ""
            made = cluster.kubectl("create", "secret", "generic", "judge-key", f"--from-literal=token={key}")
            assert made.returncode == 0, made.stderr
            endpoint = {"baseUrl": f"{front.url}/v1", "model": "tiny-judge",
                        "apiKeySecret": {"name": "judge-key", "key": "token"}}  # fmt: skip
            evaluation = {"enabled": True, "limit": 6, "minPrompts": 4,
                          "judges": [{"name": "tiny", "endpoint": endpoint}]}  # fmt: skip
            assert cluster.apply(run_manifest("judged", iterations=1, evaluation=evaluation)).returncode == 0
            status = cluster.wait_phase("judged", "Succeeded", "Failed", timeout=900)
            assert status["phase"] == "Succeeded", status.get("message")
            (entry,) = [it for it in status["iterations"] if it["iteration"] == 1]
            figures = entry["stages"]["evaluate"]["metrics"]["judges"]["tiny"]
            run = cluster.kubectl("get", "idpo", "judged", "-o", "json").stdout
        sent = front.requests()
    assert len(figures["lc_win_rate_vs_base"]) == 3 and figures["failures"] == 0
    assert figures["calls"] == len(sent) > 0  # every request the pod made, and only the evaluate stage's
    assert key not in run


def test_a_retried_evaluation_judges_the_responses_its_failed_attempt_generated(tmp_path: Path) -> None:
    from idpo_jobs import evaluate

    rows = [{"prompt_id": "p1", "prompt": "a"}, {"prompt_id": "p2", "prompt": "b"}]
    assert evaluate.cached_responses(tmp_path, rows) is None
    evaluate.keep_responses(tmp_path, rows, ["x", "y"], None)
    assert evaluate.cached_responses(tmp_path, rows) == (["x", "y"], None)  # the same texts: the judges' cache hits
    assert evaluate.cached_responses(tmp_path, rows[:1]) is None  # another held-out set: generated again
    (tmp_path / evaluate.RESPONSES_KEPT).write_text('{"prompt_ids": ["p1", "p2"], "respo')  # torn by a kill
    assert evaluate.cached_responses(tmp_path, rows) is None
