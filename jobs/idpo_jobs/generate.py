"""Generate stage: sample `responsesPerPrompt` responses per prompt from the current policy.

    python -m idpo_jobs.generate --config iter-1-generate.json

Shard k of K (`JOB_COMPLETION_INDEX`) takes a contiguous slice of this iteration's prompts and
writes `part-<k>/generations.jsonl` with `prompt_id`, `prompt`, `all_generated_responses`. It works in
chunks of `generation.chunkPrompts` prompts, each written to the shard's work directory when done, so an
attempt after a kill generates only the chunks that were not finished (`resume.chunked`).
Engines share one interface: `generate(prompt_token_ids, n) -> responses per prompt`.
"""

from __future__ import annotations

import array
import statistics
import zlib
from pathlib import Path
from typing import Any

from idpo_jobs import contract, data, resume, tracking
from idpo_jobs.config import GenerateConfig, GenerationSpec
from idpo_jobs.uris import resolve_uri

OUTPUT = "generations.jsonl"


def prompt_seed(seed: int, ids: list[int]) -> int:
    return (seed * 1_000_003 + zlib.crc32(array.array("q", ids).tobytes())) % 2**31


class Engine:
    """What both engines share: the tokenizer (for rendering prompts once), the spec and the seed.

    `generate(prompt_token_ids, n, offset, total)` returns n responses per prompt; `offset` is the
    position of the first prompt in the shard's list and `total` the list's length (for progress, and
    for seeds that depend on positions: a chunk samples what it would have sampled in one call).
    """

    def __init__(
        self,
        model: str,
        spec: GenerationSpec,
        seed: int,
        revision: str | None = None,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from idpo_jobs.models import load_tokenizer

        self.tokenizer = load_tokenizer(model, revision, chat_template, trust_remote_code)
        self.spec = spec
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.load(model, revision)

    def load(self, model: str, revision: str | None) -> None:
        raise NotImplementedError

    def generate(
        self, prompt_ids: list[list[int]], n: int, offset: int = 0, total: int | None = None
    ) -> list[list[str]]:
        raise NotImplementedError


class TransformersEngine(Engine):
    """Batched sampling with `model.generate`; the CPU, test and demo engine."""

    def load(self, model: str, revision: str | None) -> None:
        from idpo_jobs.models import load_causal_lm

        self.model = load_causal_lm(model, revision, self.spec.dtype, self.trust_remote_code).eval()

    def generate(
        self, prompt_ids: list[list[int]], n: int, offset: int = 0, total: int | None = None
    ) -> list[list[str]]:
        import torch

        spec, tok = self.spec, self.tokenizer
        total = total or offset + len(prompt_ids)
        out: list[list[str]] = []
        for start in range(0, len(prompt_ids), spec.batch_size):
            batch = prompt_ids[start : start + spec.batch_size]
            width = max(map(len, batch))
            # Left padding keeps every prompt's last token adjacent to its first generated one.
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            torch.manual_seed(self.seed + offset + start)  # same batches, same samples
            with torch.no_grad():
                seqs = self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    do_sample=True,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    max_new_tokens=spec.max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=tok.pad_token_id,
                )
            texts = tok.batch_decode(seqs[:, width:], skip_special_tokens=True)
            out.extend([t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(batch)))
            contract.report_progress(offset + min(start + spec.batch_size, len(prompt_ids)), total)
        return out


class VLLMEngine(Engine):
    """vLLM offline inference; the production engine on GPUs.

    Prompts go in as token ids rendered by the same chat-template code as the transformers
    engine, so vLLM's tokenizer cannot add a second BOS. The engine lives in the stage's own
    process: its GPU memory is released when the process exits, before ranking starts.
    """

    def load(self, model: str, revision: str | None) -> None:
        from vllm import LLM

        spec = self.spec
        kwargs: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "tensor_parallel_size": spec.tensor_parallel_size,
            "dtype": spec.dtype,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "seed": self.seed,
            "trust_remote_code": self.trust_remote_code,
            "enforce_eager": spec.enforce_eager,
        }
        if spec.max_model_length:
            kwargs["max_model_len"] = spec.max_model_length
        self.llm = LLM(**kwargs)

    def generate(
        self, prompt_ids: list[list[int]], n: int, offset: int = 0, total: int | None = None
    ) -> list[list[str]]:
        from vllm import SamplingParams

        spec = self.spec
        # One seed per prompt, from its tokens: a shared seed would give every prompt the same
        # random stream, and a seed from the position would change with batching and sharding.
        params = [
            SamplingParams(
                n=n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=spec.max_new_tokens,
                seed=prompt_seed(self.seed, ids),
            )
            for ids in prompt_ids
        ]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        contract.report_progress(offset + len(prompt_ids), total or offset + len(prompt_ids))
        return [[c.text.strip() for c in r.outputs] for r in results]


ENGINES: dict[str, type[Engine]] = {
    "transformers": TransformersEngine,
    "vllm": VLLMEngine,
}


def compute(config: GenerateConfig, out: Path, shard: int) -> dict[str, Any]:
    spec = config.generation
    prompts = data.shard_slice(data.load_prompts(config.prompts, config.iteration), shard, config.shards)
    model = resolve_uri(config.model)
    seed = spec.seed * 1000 + config.iteration  # a new sample each iteration, reproducible
    engines: list[Engine] = []  # loaded for the first chunk that is not finished: none on a full resume

    def generate_chunk(start: int, chunk: list[dict[str, str]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from idpo_jobs.models import render_prompt_ids

        if not engines:
            trust = config.trust_remote_code
            engines.append(ENGINES[spec.engine](model, spec, seed, config.revision, config.chat_template, trust))
        engine = engines[0]
        prompt_ids = render_prompt_ids(engine.tokenizer, [p["prompt"] for p in chunk])
        responses = engine.generate(prompt_ids, spec.responses_per_prompt, start, len(prompts))
        return [{**p, "all_generated_responses": r} for p, r in zip(chunk, responses, strict=True)], {}

    work = contract.work_dir(contract.output_dir(config, shard))
    ident = resume.identity(config, inputs(config), shard=shard)
    done = resume.chunked(work, ident, prompts, resume.chunk_size(spec.chunk_prompts, spec.batch_size), generate_chunk)
    rows = done.rows
    data.write_jsonl(out / OUTPUT, rows)
    lengths = [len(r) for row in rows for r in row["all_generated_responses"]]
    metrics = {
        "prompts": len(rows),
        "responses": len(lengths),
        "mean_response_chars": round(statistics.fmean(lengths), 2) if lengths else 0.0,
        "empty_responses": sum(1 for n in lengths if n == 0),
        "engine": spec.engine,
        "resumed_prompts": done.resumed,
    }
    tracker = tracking.current()
    tracker.metrics(metrics, step=config.iteration, prefix="generate/")
    tracker.distribution("generate/response_chars", [float(n) for n in lengths], step=config.iteration)
    return metrics


def inputs(config: GenerateConfig) -> dict[str, str]:
    return {
        "model": resolve_uri(config.model),
        "prompts": resolve_uri(config.prompts.source),
    }


def main() -> int:
    return contract.cli(GenerateConfig, compute, inputs)


if __name__ == "__main__":  # the guard matters: vLLM spawns worker processes that re-import this
    contract.exit_after(main)
