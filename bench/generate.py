"""Generation throughput: the transformers and vLLM engines on the same model, prompts and sampling.

    python bench/generate.py                       # the tiny model, built on the spot (CPU)
    python bench/generate.py --model DIR --prompts 256 --n 5 --max-new-tokens 256   # e.g. on a GPU

Both engines run in this one process, one after the other, through the same `Engine` interface the
generate stage uses. Engine start-up (model load; vLLM's engine process and warm-up) is reported apart
from generation. Tokens are counted by re-tokenizing the responses with the model's tokenizer, so
both engines are measured by the same rule. Prints tokens/s per engine and the vLLM/transformers ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from idpo_jobs.config import GenerationSpec
from idpo_jobs.generate import ENGINES
from idpo_jobs.models import render_prompt_ids
from idpo_jobs.tiny import build_tiny_policy, tiny_prompts


def measure(engine_name: str, model: str, spec: GenerationSpec, prompts: list[str], n: int) -> dict[str, float]:
    started = time.perf_counter()
    engine = ENGINES[engine_name](model, spec, seed=0)
    ids = render_prompt_ids(engine.tokenizer, prompts)
    engine.generate(ids[:2], n)  # warm-up: first-call compilation and allocation are not throughput
    ready = time.perf_counter()
    responses = engine.generate(ids, n)
    elapsed = time.perf_counter() - ready
    tokens = sum(len(engine.tokenizer(r, add_special_tokens=False)["input_ids"]) for rs in responses for r in rs)
    return {
        "startup_s": round(ready - started, 2),
        "generate_s": round(elapsed, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or HF id; default: the tiny model")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers engine batch")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.2, help="vLLM memory share (of host RAM on its CPU backend)"
    )
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"], choices=sorted(ENGINES))
    args = parser.parse_args()

    model = args.model or str(build_tiny_policy(Path(tempfile.mkdtemp()) / "policy"))
    prompts = (tiny_prompts() * (args.prompts // len(tiny_prompts()) + 1))[: args.prompts]
    spec = GenerationSpec(
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    results = {name: measure(name, model, spec, prompts, args.n) for name in args.engines}
    print(
        json.dumps(
            {
                "model": model,
                "prompts": args.prompts,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "results": results,
            },
            indent=2,
        )
    )
    if {"transformers", "vllm"} <= results.keys():
        ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        print(f"vllm / transformers generation throughput: {ratio:.2f}x")


if __name__ == "__main__":  # vLLM's engine process re-imports this module
    main()
