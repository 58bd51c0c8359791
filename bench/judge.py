"""The cost of LLM judging at evaluation size: requests, tokens and seconds, and how they grow with prompts.

    python bench/judge.py                                   # the tiny judge on vLLM's CPU server, label tiny-cpu
    python bench/judge.py --base-url http://judge:8000/v1 --model NAME --label llama-70b   # a served judge

One evaluation judges each iteration's responses against two baselines (the base model's and the previous
iteration's) in both orders: 4 requests per held-out prompt with the `alpaca-eval` template. For each
prompt count, a judge with an empty cache judges that (the cost of one evaluation), then a second judge
reads the same judgments from the cache (what a retried stage pays: nothing). Without `--base-url`,
the tiny judge is built and served by vLLM's OpenAI server on 127.0.0.1 (tests/harness/vllm_server.py),
which is reported apart (`build_and_start_s`). Responses are the tiny set's kind: 3-12 random words.

Results: bench/results/judge-<label>.json (and one JSON line per measurement on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))  # the test harness starts the server, as for the tests

from idpo_jobs.config import JudgeSpec  # noqa: E402
from idpo_jobs.judge import Judge  # noqa: E402
from idpo_jobs.tiny import WORDS, build_tiny_judge, tiny_prompts  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def responses(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def evaluation(spec: JudgeSpec, prompts: int, cache: Path | None) -> dict[str, Any]:
    """One evaluation's judging: ours against the base's and the previous iteration's, both orders."""
    held_out = (tiny_prompts() * (prompts // len(tiny_prompts()) + 1))[:prompts]
    ours, base, previous = responses(prompts, 1), responses(prompts, 2), responses(prompts, 3)
    judge = Judge(spec, cache)
    cached_before = len(judge.cache) > 0
    started = time.perf_counter()
    vs_base = judge.compare(held_out, ours, base)
    vs_previous = judge.compare(held_out, ours, previous)
    elapsed = time.perf_counter() - started
    stats = judge.stats
    readable = sum(p is not None for p in vs_base + vs_previous)
    return {
        "prompts": prompts,
        "max_concurrency": spec.max_concurrency,
        "cached_before": cached_before,
        "seconds": round(elapsed, 2),
        "requests": stats.requests,
        "cached": stats.cached,
        "readable_comparisons": readable,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "requests_per_s": round(stats.requests / elapsed, 2) if stats.requests else None,
        "seconds_per_prompt": round(elapsed / prompts, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="an OpenAI-compatible endpoint; default: the tiny judge served here")
    parser.add_argument("--model", default="tiny-judge")
    parser.add_argument("--template", default="alpaca-eval", choices=["alpaca-eval", "pairwise", "pointwise"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4])
    parser.add_argument("--label", default="tiny-cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    server, startup = None, None  # startup: the tiny judge built and served
    if args.base_url is None:
        from tests.harness.vllm_server import VLLMServer

        started = time.perf_counter()
        server = VLLMServer(build_tiny_judge(work / "judge"), work / "server", name=args.model).start()
        startup = round(time.perf_counter() - started, 1)
        args.base_url = f"{server.url}/v1"
    rows = []
    load = os.getloadavg()
    try:
        for concurrency in args.concurrency:
            for prompts in args.prompts:
                endpoint = {"baseUrl": args.base_url, "model": args.model}
                spec = JudgeSpec.model_validate(
                    {"name": "bench", "endpoint": endpoint, "template": args.template, "maxConcurrency": concurrency}
                )
                cache = work / f"cache-{concurrency}-{prompts}"
                for _ in ("paid", "cached"):
                    rows.append(evaluation(spec, prompts, cache))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    result = {
        "label": args.label,
        "template": args.template,
        "model": args.model,
        "build_and_start_s": startup,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m": [load[0], os.getloadavg()[0]],
        },
        "evaluations": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"judge-{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
