"""LLM judges over OpenAI-compatible endpoints (DESIGN §11, docs/evaluation.md: LLM judges).

A `Judge` is a scorer the run never trains on: `compare` gives P(first beats second) per prompt, judged in
both orders so that the judge's position bias cancels (as for PairRM); `score` rates candidates one by one,
the `Ranker` interface of rank.py. Templates and their parsing are in `templates`, the on-claim cache of
answers in `cache`.

Requests go through the `openai` client with its own retries off: each HTTP request, retries included, is
counted against `maxRequests` here, and a `Retry-After` is honoured however long it is (up to
MAX_RETRY_AFTER), where the client's retries would hide both. Outcomes:
- 401/403 (the key) and 404 (the model, or a base URL without its `/v1`): bad input, `StageError` (exit 2,
  not retried); the message names the judge, the endpoint and the Secret, never the key.
- 429, 5xx, a timeout or no connection: retried with backoff; past `maxRetries`, `JudgeUnavailable`, a
  transient failure (exit 75): the Job retries the stage, and the cache spares it every judgment already
  made. Not a warning with empty figures: a stop rule or the best checkpoint could then follow a judge that
  was not consulted, and a retry costs only what is left.
- another 4xx (a request the endpoint rejects, e.g. longer than its context): that judgment fails, counted
  in `failures`, and the others go on.
- `maxRequests` reached: bad input, `StageError`; raising it and rerunning pays only for what is left.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from idpo_jobs import contract
from idpo_jobs.config import JudgeSpec
from idpo_jobs.judge import templates
from idpo_jobs.judge.cache import JudgmentCache, request_key

MAX_RETRY_AFTER = 300.0  # seconds: a longer Retry-After is cut to this
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  # seconds: exponential backoff with jitter, without a Retry-After
MAX_TEXT = 2000  # characters of an answer kept in the cache
# Of the first token's alternatives, kept in the cache: OpenAI returns 20 at most; an endpoint may send more.
MAX_ALTERNATIVES, MAX_TOKEN = 20, 64


class JudgeUnavailable(ConnectionError):
    """The endpoint kept failing past the retries: transient (contract.exit_code), the Job retries the stage."""


class _Stopped(Exception):
    """Another request failed for good: the queued ones are not sent."""


@dataclass
class JudgeStats:
    """What a judge cost: `requests` (sent, retries included: what `maxRequests` counts), `judgments`
    (answers received), `cached` (answers read from the cache instead), `retries`, `failures` by kind
    (`unreadable`: no label or rating in the answer; `rejected`: a 4xx for that request), tokens, seconds."""

    requests: int = 0
    judgments: int = 0
    cached: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge:
    """One `JudgeSpec`; its answers cached under `cache_dir` (None: not kept). The API key is read from the
    environment variable `spec.api_key_env` when the endpoint has a Secret, and sent nowhere else."""

    def __init__(self, spec: JudgeSpec, cache_dir: Path | None = None) -> None:
        from openai import OpenAI

        self.spec, self.template = spec, templates.template(spec.template)
        self._key = self._api_key()
        # An explicit key, never the client's fallback to OPENAI_API_KEY: that one is not meant for this endpoint.
        self.client = OpenAI(
            base_url=spec.endpoint.base_url, api_key=self._key or "none", max_retries=0, timeout=spec.timeout_seconds
        )
        self.cache = JudgmentCache(cache_dir, spec.name)
        self.stats = JudgeStats()
        self._lock = threading.Lock()

    def _api_key(self) -> str | None:
        secret = self.spec.endpoint.api_key_secret
        if secret is None:
            return None
        key = os.environ.get(self.spec.api_key_env, "")
        if not key:
            raise contract.StageError(
                f"judge {self.spec.name!r}: no API key in ${self.spec.api_key_env} "
                f"(from Secret {secret.name!r}, key {secret.key!r})"
            )
        return key

    # -- what callers use ----------------------------------------------------------------------------------
    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float | None]:
        """P(`first` beats `second`) per prompt; None where the judge gave no readable answer. Pairwise
        templates judge each pair as (first, second) and as (second, first) and average P(first) over the
        two, so a judge that favours a position is corrected; swapping the arguments gives 1 minus the
        result. `pointwise` rates each response once: 1, 0 or 0.5 for a tie."""
        n = len(prompts)
        if self.template.pairwise:
            values = self._judge(
                [self.template.render(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]
                + [self.template.render(p, b, a) for p, a, b in zip(prompts, first, second, strict=True)]
            )
            return [
                None if x is None or y is None else (x + 1 - y) / 2 for x, y in zip(values[:n], values[n:], strict=True)
            ]
        ratings = self._judge(
            [self.template.render(p, r) for p, r in zip([*prompts, *prompts], [*first, *second], strict=True)]
        )
        return [
            None if x is None or y is None else 0.5 if x == y else float(x > y)
            for x, y in zip(ratings[:n], ratings[n:], strict=True)
        ]

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        """A rating per candidate (higher is better), NaN where unreadable: the ranker form (rank.Ranker)."""
        if self.template.pairwise:
            raise contract.StageError(
                f"judge {self.spec.name!r}: template {self.spec.template!r} compares two responses; scoring "
                "candidates one by one needs template 'pointwise'"
            )
        flat = self._judge(
            [self.template.render(p, c) for p, cands in zip(prompts, candidates, strict=True) for c in cands]
        )
        out, start = [], 0
        for cands in candidates:
            out.append([float("nan") if v is None else v for v in flat[start : start + len(cands)]])
            start += len(cands)
        return out

    # -- requests ------------------------------------------------------------------------------------------
    def _judge(self, conversations: list[list[dict[str, str]]]) -> list[float | None]:
        """The template's reading of each conversation's answer: from the cache, else asked (once per distinct
        request, `maxConcurrency` at a time, each answer cached as it arrives)."""
        started = time.monotonic()
        requests = [{"model": self.spec.endpoint.model, "messages": m, **self.template.request} for m in conversations]
        keys = [request_key(self.spec.name, self.spec.endpoint.base_url, r) for r in requests]
        todo = {k: r for k, r in zip(keys, requests, strict=True) if self.cache.get(k) is None}
        self._count(cached=len(keys) - sum(1 for k in keys if k in todo))
        stop = threading.Event()
        if todo:
            workers = min(self.spec.max_concurrency, len(todo))
            with ThreadPoolExecutor(workers, thread_name_prefix=f"judge-{self.spec.name}") as pool:
                futures = [pool.submit(self._ask, k, r, stop) for k, r in todo.items()]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                errors = [f.exception() for f in done if f.exception() is not None]
                if errors:
                    stop.set()
                    for f in futures:
                        f.cancel()
                    raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])  # type: ignore[misc]
        values = []
        for k in keys:
            answer = self.cache.get(k)
            value = None if answer is None else self.template.read(answer)
            if answer is not None and value is None:
                self._count(failure="unreadable")
            values.append(value)
        self._count(seconds=time.monotonic() - started)
        return values

    def _ask(self, key: str, request: dict[str, Any], stop: threading.Event) -> None:
        try:
            self._ask_until_answered(key, request, stop)
        except Exception:
            stop.set()  # here, before the worker takes the next request: none is sent after a failure for good
            raise

    def _ask_until_answered(self, key: str, request: dict[str, Any], stop: threading.Event) -> None:
        import openai

        for attempt in range(self.spec.max_retries + 1):
            if stop.is_set():
                raise _Stopped
            self._spend_request()
            try:
                response = self.client.chat.completions.create(**request)
            except openai.APIStatusError as err:
                status = err.status_code
                if status in (401, 403, 404):
                    raise contract.StageError(self._refused(status, err)) from None
                if status != 429 and status < 500 and status not in (408, 409):
                    self._count(failure="rejected")
                    contract.warn(f"judge {self.spec.name!r}: a request was rejected: {self._scrub(err)}"[:300])
                    return
                delay, reason = retry_after(err.response.headers), f"HTTP {status}"
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                delay, reason = None, type(err).__name__
            else:
                self._keep(key, response)
                return
            if attempt == self.spec.max_retries:
                raise JudgeUnavailable(
                    f"judge {self.spec.name!r} at {self.spec.endpoint.base_url}: {reason} after "
                    f"{self.spec.max_retries} retries; judgments made so far are cached"
                )
            self._count(retries=1)
            stop.wait(delay if delay is not None else backoff(attempt))
        raise AssertionError("unreachable")

    def _keep(self, key: str, response: Any) -> None:
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content or "") if choice is not None else ""
        content = choice.logprobs.content if choice is not None and choice.logprobs else None
        top = [[t.token[:MAX_TOKEN], t.logprob] for t in content[0].top_logprobs[:MAX_ALTERNATIVES]] if content else []
        usage = response.usage
        tokens = [usage.prompt_tokens, usage.completion_tokens] if usage else [0, 0]
        self.cache.put(key, {"text": text[:MAX_TEXT], "top_logprobs": top, "tokens": tokens})
        self._count(judgments=1, prompt_tokens=tokens[0], completion_tokens=tokens[1])

    def _spend_request(self) -> None:
        with self._lock:
            if self.stats.requests >= self.spec.max_requests:
                raise contract.StageError(
                    f"judge {self.spec.name!r}: maxRequests {self.spec.max_requests} reached with "
                    f"{self.stats.judgments} new judgments ({len(self.cache)} cached in all); raise it and rerun: "
                    "cached judgments are not sent again"
                )
            self.stats.requests += 1

    def _count(self, failure: str | None = None, **add: float) -> None:
        with self._lock:
            for name, value in add.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)
            if failure is not None:
                self.stats.failures[failure] = self.stats.failures.get(failure, 0) + 1

    def _refused(self, status: int, err: Exception) -> str:
        where = f"judge {self.spec.name!r} at {self.spec.endpoint.base_url}"
        if status == 404:
            return (
                f"{where}: HTTP 404 for model {self.spec.endpoint.model!r}: no such model there, or a base URL "
                f"without its API path (e.g. /v1): {self._scrub(err)}"
            )
        secret = self.spec.endpoint.api_key_secret
        source = f"the key {secret.key!r} of Secret {secret.name!r}" if secret else "no API key (no apiKeySecret)"
        # The body is left out: some endpoints echo part of the key they refused.
        return f"{where}: HTTP {status}, the endpoint refused {source} for model {self.spec.endpoint.model!r}"

    def _scrub(self, err: Exception) -> str:
        """An error's text, without the API key should the endpoint have echoed it."""
        text = str(getattr(err, "message", None) or err)
        return text.replace(self._key, "***") if self._key else text


def retry_after(headers: Any) -> float | None:
    """The wait an HTTP answer asks for: `retry-after-ms` (OpenAI's), `Retry-After` in seconds or as an HTTP
    date; cut to MAX_RETRY_AFTER. None: no such header."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                continue
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return None


def backoff(attempt: int) -> float:
    """Exponential from BACKOFF_BASE, capped, with jitter so that concurrent requests do not retry in step."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * random.uniform(0.75, 1.25)
