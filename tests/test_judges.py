"""LLM judges (idpo_jobs.judge): AlpacaEval's templates and parsing, and the judge client against a real
OpenAI-compatible server, vLLM's on CPU serving the tiny judge, behind a counting front of ours."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs import contract
from idpo_jobs.config import EvaluationSpec, JudgeSpec
from idpo_jobs.judge import Judge, JudgeUnavailable, retry_after, templates
from idpo_jobs.judge.cache import JudgmentCache
from pydantic import ValidationError

from tests.harness.cluster import free_port
from tests.harness.vllm_server import Front, VLLMServer

KEY_ENV = "IDPO_JUDGE_API_KEY_TINY"
PROMPTS = ["Write a short poem about tides.", "Give three tips about chess.", "Why do people like kites?"]
KIND = "kind gentle wise helpful friendly honest kind calm"
PLAIN = "the river of a stone and tree over it"


def judge_spec(url: str, **fields: Any) -> JudgeSpec:
    endpoint = {"baseUrl": f"{url}/v1", "model": "tiny-judge", "apiKeySecret": {"name": "judge", "key": "token"}}
    return JudgeSpec.model_validate({"name": "tiny", "endpoint": endpoint, "maxConcurrency": 2, **fields})


@pytest.fixture
def keyed(judge_server: VLLMServer, monkeypatch: pytest.MonkeyPatch) -> VLLMServer:
    """The session's judge server, its API key where the operator puts it for the judge `tiny`."""
    monkeypatch.setenv(KEY_ENV, judge_server.api_key or "")
    return judge_server


# -- templates: AlpacaEval's own, read from its package data -----------------------------------------------
def test_the_alpaca_eval_template_is_alpaca_evals_own_annotator_prompt() -> None:
    import pandas as pd
    from alpaca_eval import utils

    config = templates._annotator(templates.ALPACA_EVAL_2)
    raw = templates._package_file(config["prompt_template"]).read_text()
    row = pd.DataFrame([{"instruction": "Name a color.", "output_1": "Blue.", "output_2": "Red, or green."}])
    (prompt,), _ = utils.make_prompts(row, raw)
    ours = templates.template("alpaca-eval").render("Name a color.", "Blue.", "Red, or green.")
    assert ours == [{"role": m["role"], "content": m["content"]} for m in utils.prompt_to_chatml(prompt)]
    assert templates.template("alpaca-eval").request == {
        "max_tokens": 1,
        "temperature": 1,
        "logprobs": True,
        "top_logprobs": 5,
    }


@pytest.mark.parametrize(
    "top",
    [
        [["M", -0.1], ["m", -2.5], ["Both", -9.0]],
        [["m", -0.3], ["The", -1.0]],
        [["M", -0.01]],
        [["m", -1.2], ["M", -1.2]],
    ],
    ids=["both-labels", "first-only", "second-only", "even"],
)
def test_the_label_probability_is_alpaca_evals_logprob_parser(top: list[list[Any]]) -> None:
    from alpaca_eval.completion_parsers import logprob_parser

    kwargs = templates._annotator(templates.ALPACA_EVAL_2)["completion_parser_kwargs"]
    completion = {"logprobs": {"content": [{"top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}}
    (preference,) = logprob_parser(completion, **kwargs)  # 1: output_1 preferred ... 2: output_2
    ours = templates.template("alpaca-eval").read({"text": top[0][0], "top_logprobs": top})
    assert ours == pytest.approx(2 - preference)


def test_a_response_holding_a_slot_name_is_not_filled_again() -> None:
    (_, user) = templates.template("alpaca-eval").render("Say {output_2}.", "Use {output_2} {instruction}", "Red")
    assert '"""Use {output_2} {instruction}"""' in user["content"] and '"""Red"""' in user["content"]


def test_labels_are_read_with_the_whitespace_of_sentencepiece_tokens_and_their_variants_add_up() -> None:
    read = templates.template("alpaca-eval").read
    assert read({"top_logprobs": [[" m", math.log(0.3)], ["m", math.log(0.3)], [" M", math.log(0.2)]]}) == (
        pytest.approx(0.75)
    )
    assert read({"top_logprobs": [["The", -0.1], ["A", -3.0]]}) is None  # no label at all: unreadable


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Output (a)", 1.0), ("Output (b)", 0.0), ("\nOutput (b)\n\nOutput (a) is worse", 0.0), ("Both", None)],
)
def test_text_answers_are_read_as_alpaca_evals_regex_parser(text: str, expected: float | None) -> None:
    from alpaca_eval.completion_parsers import regex_parser

    matches = templates._annotator(templates.ALPACA_EVAL_TEXT)["completion_parser_kwargs"]["outputs_to_match"]
    theirs = regex_parser(text, dict(matches))
    assert templates.template("pairwise").read({"text": text}) == expected
    assert (theirs[0] if theirs else None) == (None if expected is None else 2 - expected)


def test_a_rating_is_the_expected_digit_or_the_digit_answered() -> None:
    read = templates.template("pointwise").read
    top = [["7", math.log(0.5)], [" 9", math.log(0.25)], ["x", math.log(0.2)], ["3", math.log(0.05)]]
    assert read({"top_logprobs": top}) == pytest.approx((7 * 0.5 + 9 * 0.25 + 3 * 0.05) / 0.8)
    assert read({"text": "Rating: 6/9", "top_logprobs": []}) == 6.0
    assert read({"text": "6", "top_logprobs": [["Sure", -0.1]]}) is None  # log-probabilities, none a rating


# -- the spec ----------------------------------------------------------------------------------------------
def test_judge_names_are_unique_dns_labels_and_endpoints_http() -> None:
    judge = {"name": "gpt4", "endpoint": {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4-1106-preview"}}
    assert EvaluationSpec.model_validate({"judges": [judge]}).judges[0].api_key_env == "IDPO_JUDGE_API_KEY_GPT4"
    with pytest.raises(ValidationError, match="gpt4 appear more than once"):
        EvaluationSpec.model_validate({"judges": [judge, judge]})
    for bad in ({"name": "GPT_4"}, {"endpoint": {"baseUrl": "file:///etc/passwd", "model": "m"}}):
        with pytest.raises(ValidationError):
            JudgeSpec.model_validate({**judge, **bad})


def test_the_crd_refuses_two_judges_of_one_name() -> None:
    import celpy
    from idpo_operator import crd

    (rule,) = crd.CEL_RULES["EvaluationSpec"]
    program = celpy.Environment().program(celpy.Environment().compile(rule["rule"]))

    def allowed(names: list[str]) -> bool:
        section = {"judges": [{"name": n} for n in names]}
        return bool(program.evaluate({"self": celpy.json_to_cel(section)}))

    assert allowed([]) and allowed(["a", "b"]) and not allowed(["a", "b", "a"])


# -- the client without a server -----------------------------------------------------------------------------
def test_retry_after_is_read_in_seconds_milliseconds_or_as_a_date_and_capped() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (retry_after({"retry-after": soon}) or 0) <= 30
    assert retry_after({"retry-after": "86400"}) == 300.0
    assert retry_after({}) is None and retry_after({"retry-after": "soon"}) is None


def test_an_endpoint_that_stays_down_is_a_transient_failure(tmp_path: Path) -> None:
    endpoint = {"baseUrl": f"http://127.0.0.1:{free_port()}/v1", "model": "m"}
    spec = JudgeSpec.model_validate({"name": "down", "endpoint": endpoint, "maxRetries": 1, "maxConcurrency": 1})
    judge = Judge(spec, tmp_path)
    with pytest.raises(JudgeUnavailable, match="after 1 retries") as raised:
        judge.compare(PROMPTS[:1], [KIND], [PLAIN])
    assert contract.exit_code(raised.value) == contract.EXIT_TRANSIENT
    assert judge.stats.requests == 2 and judge.stats.retries == 1


def test_a_judge_whose_secret_is_not_in_the_environment_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(contract.StageError, match=f"no API key in \\${KEY_ENV} \\(from Secret 'judge', key 'token'\\)"):
        Judge(judge_spec("http://127.0.0.1:9"))


def test_the_cache_skips_a_torn_line_and_appends_after_it(tmp_path: Path) -> None:
    cache = JudgmentCache(tmp_path, "j")
    cache.put("a", {"text": "m"})
    with cache.path.open("a") as f:  # type: ignore[union-attr]
        f.write('{"key": "b", "answ')  # killed mid-line
    again = JudgmentCache(tmp_path, "j")
    assert again.get("a") == {"text": "m"} and again.get("b") is None
    again.put("c", {"text": "M"})
    assert JudgmentCache(tmp_path, "j").get("c") == {"text": "M"}


# -- against vLLM's OpenAI server ----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_alpaca_eval_judge_reads_a_probability_from_top_logprobs(keyed: VLLMServer, tmp_path: Path) -> None:
    from alpaca_eval.completion_parsers import logprob_parser

    with Front(keyed.url) as front:
        judge = Judge(judge_spec(front.url), tmp_path)
        preferences = judge.compare(PROMPTS, [KIND] * 3, [PLAIN] * 3)
        sent = front.requests()
    assert all(p is not None and 0 < p < 1 for p in preferences), preferences
    assert len(sent) == 6 and {s.json()["top_logprobs"] for s in sent} == {5}  # both orders, AlpacaEval's request
    assert judge.stats.judgments == 6 and judge.stats.prompt_tokens > 6 * 100 and judge.stats.completion_tokens == 6
    # What the server answered, read by alpaca_eval's own parser (with its labels' whitespace stripped).
    kwargs = templates._annotator(templates.ALPACA_EVAL_2)["completion_parser_kwargs"]
    for row in map(json.loads, judge.cache.path.read_text().splitlines()):  # type: ignore[union-attr]
        top = [{"token": t.strip(), "logprob": lp} for t, lp in row["answer"]["top_logprobs"]]
        (theirs,) = logprob_parser({"logprobs": {"content": [{"top_logprobs": top}]}}, **kwargs)
        assert templates.template("alpaca-eval").read(row["answer"]) == pytest.approx(2 - theirs)


@pytest.mark.slow
def test_swapped_order_gives_the_complementary_preference(keyed: VLLMServer, tmp_path: Path) -> None:
    with Front(keyed.url) as front:
        forward = Judge(judge_spec(front.url), tmp_path).compare(PROMPTS, [KIND] * 3, [PLAIN] * 3)
        backward = Judge(judge_spec(front.url), None).compare(PROMPTS, [PLAIN] * 3, [KIND] * 3)  # asked anew
        assert len(front.requests()) == 12
    assert backward == pytest.approx([1 - p for p in forward], abs=1e-4)  # type: ignore[operator]
    again = Judge(judge_spec(front.url), tmp_path)  # the first judge's cache holds both orders: nothing to ask
    assert again.compare(PROMPTS, [PLAIN] * 3, [KIND] * 3) == pytest.approx(backward, abs=1e-4)
    assert again.stats.requests == 0 and again.stats.cached == 6


@pytest.mark.slow
def test_a_429_is_retried_after_its_retry_after(keyed: VLLMServer, tmp_path: Path) -> None:
    with Front(keyed.url) as front:
        front.fail_next(1, 429, {"Retry-After": "2"})
        judge = Judge(judge_spec(front.url, maxConcurrency=1), tmp_path)
        (preference,) = judge.compare(PROMPTS[:1], [KIND], [PLAIN])
        refused, retried, _ = front.requests()
    assert preference is not None
    assert (refused.status, refused.passed, retried.status) == (429, False, 200) and refused.digest == retried.digest
    assert retried.at - refused.at >= 2  # the wait the endpoint asked for, not the client's first backoff (0.5 s)
    assert judge.stats.requests == 3 and judge.stats.retries == 1 and judge.stats.judgments == 2


@pytest.mark.slow
def test_a_wrong_model_is_bad_input_named_clearly_and_not_retried(keyed: VLLMServer, tmp_path: Path) -> None:
    with Front(keyed.url) as front:
        spec = judge_spec(front.url).model_copy(deep=True)
        spec.endpoint.model = "no-such-judge"
        with pytest.raises(contract.StageError, match=r"judge 'tiny' .*HTTP 404 for model 'no-such-judge'") as raised:
            Judge(spec, tmp_path).compare(PROMPTS[:1], [KIND], [PLAIN])
        assert contract.exit_code(raised.value) == contract.EXIT_BAD_INPUT
        assert [s.status for s in front.requests()] in ([404], [404, 404])  # one per order in flight, no retry


@pytest.mark.slow
def test_a_wrong_key_is_bad_input_and_never_shown(
    judge_server: VLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    wrong = "sk-proj-WRONG0123456789abcdef"
    monkeypatch.setenv(KEY_ENV, wrong)
    with Front(judge_server.url) as front:
        with pytest.raises(contract.StageError, match="HTTP 401, the endpoint refused the key 'token' of Secret") as e:
            Judge(judge_spec(front.url), tmp_path).compare(PROMPTS[:1], [KIND], [PLAIN])
        assert {s.status for s in front.requests()} == {401}
    assert contract.exit_code(e.value) == contract.EXIT_BAD_INPUT
    out, err = capfd.readouterr()
    assert wrong not in str(e.value) + repr(e.value) + out + err
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained openai error to print it


@pytest.mark.slow
def test_the_text_template_reads_the_judges_words(keyed: VLLMServer, tmp_path: Path) -> None:
    with Front(keyed.url) as front:
        judge = Judge(judge_spec(front.url, template="pairwise"), tmp_path)
        preferences = judge.compare(PROMPTS, [KIND] * 3, [PLAIN] * 3)
        assert {json.dumps(s.json().get("logprobs")) for s in front.requests()} == {"null"}
    assert all(p in (0.0, 0.5, 1.0) for p in preferences), (preferences, judge.stats)


@pytest.mark.slow
def test_the_pointwise_judge_rates_each_candidate(keyed: VLLMServer, tmp_path: Path) -> None:
    candidates = [[KIND, PLAIN, "kind stone calm river"]] * 2
    with Front(keyed.url) as front:
        judge = Judge(judge_spec(front.url, template="pointwise"), tmp_path)
        ratings = judge.score(PROMPTS[:2], candidates)
        assert len(front.requests()) == 6
    assert all(1 <= r <= 9 for row in ratings for r in row), ratings
    assert len({r for row in ratings for r in row}) > 1  # read from each answer's own log-probabilities


@pytest.mark.slow
def test_the_budget_stops_at_max_requests_and_a_rerun_pays_only_the_rest(keyed: VLLMServer, tmp_path: Path) -> None:
    with Front(keyed.url) as front:
        with pytest.raises(contract.StageError, match="maxRequests 3 reached") as raised:
            Judge(judge_spec(front.url, maxRequests=3), tmp_path).compare(PROMPTS, [KIND] * 3, [PLAIN] * 3)
        assert contract.exit_code(raised.value) == contract.EXIT_BAD_INPUT and len(front.requests()) == 3
        again = Judge(judge_spec(front.url, maxRequests=3), tmp_path)
        assert all(p is not None for p in again.compare(PROMPTS, [KIND] * 3, [PLAIN] * 3))
        assert len(front.requests()) == 6 and again.stats.cached == 3


@pytest.mark.slow
def test_a_request_the_endpoint_rejects_fails_alone(keyed: VLLMServer, tmp_path: Path) -> None:
    longer_than_the_context = " ".join(["kind"] * 3000)
    with Front(keyed.url) as front:
        judge = Judge(judge_spec(front.url), tmp_path)
        first, second = judge.compare(PROMPTS[:2], [KIND, longer_than_the_context], [PLAIN, PLAIN])
        assert sorted(s.status for s in front.requests()) == [200, 200, 400, 400]  # no retry of a 400
    assert first is not None and second is None
    assert judge.stats.failures == {"rejected": 2}


KILLABLE = """
import sys
from pathlib import Path
from idpo_jobs.config import JudgeSpec
from idpo_jobs.judge import Judge
spec = JudgeSpec.model_validate_json(sys.argv[1])
prompts = [f"Describe {n} kites in two sentences." for n in range(16)]
Judge(spec, Path(sys.argv[2])).compare(prompts, ["kind calm wise"] * 16, ["stone river"] * 16)
"""  # one judging of 16 prompts, both orders: 32 requests


@pytest.mark.slow
def test_a_killed_judging_resumes_without_asking_again_what_it_had_judged(keyed: VLLMServer, tmp_path: Path) -> None:
    cache = tmp_path / "judgments"
    prompts = [f"Describe {n} kites in two sentences." for n in range(16)]
    with Front(keyed.url) as front:
        spec = judge_spec(front.url, maxConcurrency=1)
        front.hold_after(5)  # the sixth request waits unanswered: the child is killed there
        child = subprocess.Popen([sys.executable, "-c", KILLABLE, spec.model_dump_json(by_alias=True), str(cache)])
        deadline = time.monotonic() + 300
        while len(front.requests()) < 6:
            assert child.poll() is None and time.monotonic() < deadline, "the judging never reached request 6"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        front.release()
        kept = JudgmentCache(cache, "tiny")
        resumed = Judge(spec, cache)
        assert all(p is not None for p in resumed.compare(prompts, ["kind calm wise"] * 16, ["stone river"] * 16))
        asked_after = front.requests()[6:]
    assert len(kept) == 5 and resumed.stats.cached == 5  # every answer paid for before the kill was kept
    assert len(asked_after) == 32 - 5 == resumed.stats.requests
    asked = {s.json()["messages"][-1]["content"] for s in asked_after}
    judged = {m[-1]["content"] for m in _conversations(prompts) if _key(resumed, m) in kept._answers}
    assert len(judged) == 5 and asked.isdisjoint(judged)


def _conversations(prompts: list[str]) -> list[list[dict[str, str]]]:
    tmpl = templates.template("alpaca-eval")
    first, second = "kind calm wise", "stone river"
    return [tmpl.render(p, first, second) for p in prompts] + [tmpl.render(p, second, first) for p in prompts]


def _key(judge: Judge, messages: list[dict[str, str]]) -> str:
    from idpo_jobs.judge.cache import request_key

    request = {"model": judge.spec.endpoint.model, "messages": messages, **judge.template.request}
    return request_key(judge.spec.name, judge.spec.endpoint.base_url, request)


NO_DOWNLOADS = """
import sys
from idpo_jobs.config import JudgeSpec
from idpo_jobs.judge import Judge, JudgeUnavailable, templates
for name in ("alpaca-eval", "pairwise", "pointwise"):
    templates.template(name)
spec = {"name": "j", "endpoint": {"baseUrl": "http://127.0.0.1:9/v1", "model": "m"}, "maxRetries": 0}
try:
    Judge(JudgeSpec.model_validate(spec)).compare(["p"], ["a"], ["b"])
except JudgeUnavailable:
    pass
print(sorted(m for m in ("alpaca_eval", "tiktoken", "dotenv", "datasets") if m in sys.modules))
"""


def test_judging_imports_neither_alpaca_eval_nor_tiktoken() -> None:
    """AlpacaEval's files are read, not imported (its import loads a .env and its whole pipeline), and no
    code path of a judge touches tiktoken, whose first use downloads an encoding file."""
    done = subprocess.run([sys.executable, "-c", NO_DOWNLOADS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
