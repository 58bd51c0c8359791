"""The train and generate stages measured on one GPU, next to what `idpo plan` promises.

    python bench/gpu_check.py --dry-run                    # CPU, a tiny Mistral, about half a minute (CI runs it)
    python bench/gpu_check.py                              # one GPU: ~1B and ~3B Mistral, under 8 minutes on an H200
    python bench/gpu_check.py --sizes 1b --modes lora --steps 4 --out /tmp/check.json

On the lent H200 (no TRL, datasets or pydantic there: they travel as wheels, requirements/gpu-check-wheels.txt
says which and how to download them into .whl/, which the call carries), from the repository root:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD/operator:$PWD/jobs PYTHONUNBUFFERED=1 \
        python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu-check.log

Models are Mistral-architecture configs with random weights (nothing is downloaded), saved once per size and
paired with the tiny BPE tokenizer of `idpo_jobs.tiny`; the vocabulary stays Mistral's 32000, so the embedding
and the LM head cost what they cost in the recipe. For each size:

- train, full and LoRA: the stage's own command (`python -m idpo_jobs.distributed train --config F`, a world of
  one) on synthetic pairs whose responses are longer than `--max-length`, so that every sequence is truncated to
  exactly that many tokens. `IDPO_TRAIN_PROFILE` makes the stage record each optimizer step's end and the CUDA
  allocator's peak; step times leave out loading, saving and the first `--warmup-steps` steps. The peak
  (`torch.cuda.max_memory_allocated`, loaded models included) is set beside `idpo_operator.memory.train_memory`
  for the same shape, batch, length and strategy (one process).
- generate: `idpo_jobs.generate.TransformersEngine` in bf16, one batch of `--gen-batches` prompts each, one
  sample per prompt, after a short warm-up at the same batch size; `torch.cuda.max_memory_allocated` per batch.

Model FLOPs per step: T = 2 x batch x maxLength tokens (DPO runs chosen and rejected, each a whole sequence)
times, per token, with N the parameters that multiply (all but the input embedding, a lookup) and
A = layers x heads x headDim (PaLM's count, Chowdhery et al. 2022, appendix B, attention not halved for causality):

- a forward: 2N + 4·A·maxLength; the policy's backward is twice its forward, the reference only runs forward:
  full fine-tuning 4 forwards = 8N + 16·A·maxLength per token;
- LoRA: the frozen base's backward computes activation gradients only (2N, attention's backward stays 8·A·maxLength),
  plus 6 FLOPs per adapter parameter: 6N + 16·A·maxLength + 6·N_lora per token;
- gradient checkpointing's second policy forward is hardware work, not model work: `hfu` counts it, `mfu` does not.

MFU divides by the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s by the datasheet, "about 990" in the lent
machine's notes; `--peak-tflops` for another GPU) and, as `mfu_of_matmul`, by the bf16 matrix rate measured here at
the start (those notes measured 769-798 TFLOP/s for an 8192³ product on an H200).

Each measurement that fails is recorded with its error and the script goes on; the exit status is 1 when any
failed. Writes `bench/results/gpu-<date>.json` (`--dry-run`: a temporary directory, unless `--out`) after every
measurement, so that a run stopped at its time limit keeps what it measured, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from train_distributed import launch, write_pairs

RESULTS = Path(__file__).parent / "results"
GB = 1e9  # decimal, as idpo plan prints
# Dense bf16 peaks by device name (datasheets; no sparsity). The H200's matrix units are the H100's.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# Mistral-7B's proportions (intermediate 3.5 x hidden, grouped-query attention with 8 KV heads, head 128, vocab
# 32000) at sizes that train with full parameters on one GPU. `tiny` is the dry run's.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128, vocab_size=32000),
    "3b": dict(hidden_size=3072, intermediate_size=10752, num_hidden_layers=24, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=32000),
}  # fmt: skip
TRAIN_GRACE_S = 90  # how long past --budget-s a train run that started in time may go on


# ---------------------------------------------------------------------------------------------
# Models and counts
# ---------------------------------------------------------------------------------------------
def model_config(size: str, tokenizer: Any, max_positions: int) -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        **SIZES[size],
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        sliding_window=None,  # as Mistral-7B-Instruct-v0.2
    )


def build_model(out: Path, size: str, tokenizer_dir: Path, max_positions: int, device: str) -> dict[str, Any]:
    """A random-weight Mistral of `size` saved in bf16 with the tokenizer; its shape and counts."""
    started = time.perf_counter()
    import torch
    from transformers import AutoTokenizer, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model_config(size, tokenizer, max_positions)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 3B weights on a GPU takes a second, on CPU cores a minute
        model = MistralForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    release()
    return {
        "params": params,
        "matmul_params": params - config.vocab_size * config.hidden_size,  # the input embedding is a lookup
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "build_s": round(time.perf_counter() - started, 1),
    }


def memory_shape(info: dict[str, Any]) -> Any:
    from idpo_operator.memory import ModelShape

    return ModelShape(
        float(info["params"]), info["hidden"], info["layers"], info["intermediate"], info["vocab"],
        info["heads"], info["kv_heads"], info["head_dim"],
    )  # fmt: skip


def step_flops(info: dict[str, Any], tokens: int, max_length: int, lora_params: float | None) -> tuple[float, float]:
    """(model FLOPs, gradient checkpointing's recomputation) of one DPO step over `tokens` (module docstring)."""
    n = info["matmul_params"]
    attention = info["layers"] * info["heads"] * info["head_dim"] * max_length
    forward = 2 * n + 4 * attention
    if lora_params is None:
        per_token = 3 * forward + forward  # policy forward and backward, reference forward
    else:
        per_token = forward + (2 * n + 8 * attention) + 6 * lora_params + forward
    return per_token * tokens, forward * tokens


@dataclass(frozen=True)
class Peaks:
    """What utilisation divides by, in FLOP/s: the datasheet's dense bf16 peak and the matrix rate measured here."""

    datasheet: float | None
    matmul: float | None


def datasheet_peak(device_name: str | None, given: float | None) -> tuple[float | None, str]:
    if given:
        return given * 1e12, "--peak-tflops"
    for key, tflops in PEAK_TFLOPS.items():
        if device_name and key in device_name:
            return tflops * 1e12, f"dense bf16 datasheet figure for {key}"
    return None, "unknown device (CPU, or not in PEAK_TFLOPS): pass --peak-tflops"


def matmul_rate(cuda: bool) -> dict[str, Any]:
    """The matrix rate this device reaches (bf16 8192³ on a GPU, fp32 512³ on CPU): MFU's practical ceiling."""
    import torch

    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (512, torch.float32, "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)  # random, not zeros: zeros multiply faster
    b = torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for k in range(23):
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if k >= 3:
            times.append(time.perf_counter() - start)
    del a, b
    release()
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "tflops": sig(2 * n**3 / statistics.median(times) / 1e12),
    }


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant figures: the tiny dry run's numbers are as readable as an H200's."""
    return float(f"{x:.{digits}g}")


def release() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------
def predicted_memory(info: dict[str, Any], args: argparse.Namespace, lora: bool) -> dict[str, Any]:
    """`idpo plan`'s train estimate for this shape on one process. The allocator never sees the CUDA
    context and its own slack, so `allocated_gb` (what `max_memory_allocated` is compared with) leaves that out."""
    from idpo_operator import memory

    estimate = memory.train_memory(
        f"random-{info['params'] / 1e9:.1f}b",
        memory_shape(info),
        processes_per_node=1,
        nodes=1,
        strategy="single",
        batch_size=args.batch,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        separate_reference=not lora,  # the stage's rule: LoRA's reference is the base with adapters off
        lora_rank=args.lora_rank if lora else None,
        lora_modules=["all-linear"] if lora else None,
    )
    total = estimate.total or 0.0
    return {
        "total_gb": sig(total / GB),
        "allocated_gb": sig((total - memory.RUNTIME) / GB),
        "items_gb": {item.name: sig(item.bytes / GB) for item in estimate.items},
    }


def write_rank_stage(stage: Path, args: argparse.Namespace, tokenizer_dir: Path) -> int:
    """Synthetic pairs as a finished rank stage; returns the fewest tokens of any response (> maxLength)."""
    from transformers import AutoTokenizer

    pairs = args.batch * args.steps
    write_pairs(stage, pairs, words=(args.max_length + 8, args.max_length + 64))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in (stage / "part-00000" / "pairs.jsonl").read_text().splitlines()]
    responses = [row[key][-1]["content"] for row in rows for key in ("chosen", "rejected")]
    return min(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)


def train(
    model_dir: Path, info: dict[str, Any], mode: str, args: argparse.Namespace, timeout: float, peaks: Peaks
) -> dict[str, Any]:
    from idpo_jobs.config import SUCCESS_FILE, LoraSpec, TrainConfig, TrainingSpec

    lora = mode == "lora"
    ws = Path(tempfile.mkdtemp(prefix=f"train-{mode}-", dir=args.workdir))
    shortest = write_rank_stage(ws / "rank", args, model_dir)
    if shortest < args.max_length:  # then T below would overcount
        raise RuntimeError(f"a synthetic response has {shortest} tokens, fewer than --max-length {args.max_length}")
    training = TrainingSpec(
        per_device_batch_size=args.batch,
        gradient_accumulation_steps=1,  # one micro-batch per optimizer step: a step is what the callback times
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        lora=LoraSpec(r=args.lora_rank, alpha=2 * args.lora_rank) if lora else None,
    )
    config = TrainConfig(
        run="gpu-check", iteration=1, workspace=str(ws), model=str(model_dir), reference_model=str(model_dir),
        input_dir=str(ws / "rank"), input_shards=1, training=training, termination_log=str(ws / "termination-log"),
    )  # fmt: skip
    profile = ws / "profile.json"
    try:
        proc, wall = launch(config, 1, env={"IDPO_TRAIN_PROFILE": str(profile)}, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"train stage exited {proc.returncode}: {proc.stderr[-1500:]}")
        summary = json.loads((config.stage_dir / SUCCESS_FILE).read_text())
        record = json.loads(profile.read_text())
    finally:
        shutil.rmtree(ws, ignore_errors=True)  # a 3B checkpoint is 6 GB of disk

    marks = [record["train_begin_time"], *record["step_end_times"]]
    steps = [b - a for a, b in itertools.pairwise(marks)]
    timed = steps[args.warmup_steps :]
    if not timed:
        raise RuntimeError(f"{len(steps)} steps ran, none after the {args.warmup_steps} warm-up steps")
    step_s = statistics.median(timed)
    tokens = 2 * args.batch * args.max_length
    from idpo_operator.memory import lora_params

    adapters = lora_params(memory_shape(info), args.lora_rank, ["all-linear"]) if lora else None
    model_flops, recompute = step_flops(info, tokens, args.max_length, adapters)
    measured = record.get("max_memory_allocated")
    predicted = predicted_memory(info, args, lora)
    ratio = measured / GB / predicted["allocated_gb"] if measured else None

    def utilisation(flops: float, ceiling: float | None) -> float | None:
        return sig(flops / step_s / ceiling) if ceiling else None

    return {
        "steps": len(steps),
        "step_s": [sig(s) for s in steps],
        "step_s_median": sig(step_s),
        "tokens_per_step": tokens,
        "tokens_per_s": sig(tokens / step_s),
        "model_tflop_per_step": sig(model_flops / 1e12),
        "recompute_tflop_per_step": sig(recompute / 1e12) if args.gradient_checkpointing else 0.0,
        "achieved_tflops": sig(model_flops / step_s / 1e12),
        "mfu": utilisation(model_flops, peaks.datasheet),
        "hfu": utilisation(model_flops + recompute, peaks.datasheet),
        "mfu_of_matmul": utilisation(model_flops, peaks.matmul),
        "memory": {
            "measured_max_allocated_gb": sig(measured / GB) if measured else None,
            "measured_max_reserved_gb": sig(record["max_memory_reserved"] / GB) if measured else None,
            "measured_at_train_begin_gb": sig(record["allocated_at_train_begin"] / GB) if measured else None,
            "predicted": predicted,
            "measured_over_predicted": sig(ratio) if ratio else None,
            "within_15_percent": abs(ratio - 1) <= 0.15 if ratio else None,
        },
        "stage_s": round(summary["completionTime"] - summary["startTime"], 1),
        "wall_s": round(wall, 1),
        "loss": summary["metrics"]["loss"],
        "strategy": summary["metrics"]["strategy"],
        "lora_params": adapters,
    }


# ---------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------
def count_new_tokens(engine: Any, counts: list[tuple[int, int]]) -> None:
    """Append to `counts`, for each `model.generate` call of the engine, the tokens it produced (each row's up to
    and including its first EOS) and its decoding steps. Counted from the ids: the tokenizer cannot re-read a
    random model's text (its 1024 tokens are a fraction of the 32000-token vocabulary)."""
    import torch

    generate = engine.model.generate
    eos = engine.tokenizer.pad_token_id  # the engine pads finished rows with it

    def counted(**kwargs: Any) -> Any:
        seqs = generate(**kwargs)
        new = seqs[:, kwargs["input_ids"].shape[1] :]
        ended = new == eos
        lengths = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, new.shape[1])
        counts.append((int(lengths.sum()), new.shape[1]))
        return seqs

    engine.model.generate = counted


def generate(model_dir: Path, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """{"records": one per batch size}; an error at one batch size is recorded there and the next one runs."""
    import torch
    from idpo_jobs.config import GenerationSpec
    from idpo_jobs.generate import TransformersEngine
    from idpo_jobs.models import render_prompt_ids
    from idpo_jobs.tiny import tiny_prompts

    cuda = torch.cuda.is_available()
    spec = GenerationSpec(engine="transformers", max_new_tokens=args.max_new_tokens, dtype="bfloat16")
    started = time.perf_counter()
    engine = TransformersEngine(str(model_dir), spec, seed=0)
    loaded = time.perf_counter() - started
    counts: list[tuple[int, int]] = []
    count_new_tokens(engine, counts)
    prompts = tiny_prompts()
    records = []
    for batch in args.gen_batches:
        record: dict[str, Any] = {
            "batch_size": batch,
            "max_new_tokens": args.max_new_tokens,
            "load_s": round(loaded, 1),
        }
        records.append(record)
        if time.perf_counter() > deadline:
            record["error"] = "skipped: past --budget-s"
            continue
        try:
            ids = render_prompt_ids(engine.tokenizer, (prompts * (batch // len(prompts) + 1))[:batch])
            engine.spec = spec.model_copy(update={"batch_size": batch, "max_new_tokens": min(8, args.max_new_tokens)})
            engine.generate(ids, 1)  # warm-up at this batch: kernels picked and memory cached for its shapes
            engine.spec = spec.model_copy(update={"batch_size": batch})
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            counts.clear()
            start = time.perf_counter()
            engine.generate(ids, 1)  # returns decoded text: the GPU has finished
            seconds = time.perf_counter() - start
            tokens, steps = sum(c[0] for c in counts), sum(c[1] for c in counts)
            record |= {
                "prompt_tokens_mean": round(statistics.fmean(map(len, ids)), 1),
                "new_tokens": tokens,
                "seconds": sig(seconds),
                "tokens_per_s": sig(tokens / seconds),
                "decode_steps_per_s": sig(steps / seconds),
                "peak_allocated_gb": sig(torch.cuda.max_memory_allocated() / GB) if cuda else None,
            }
        except Exception as err:  # the next batch size may still fit
            record["error"] = describe(err)
            release()
    del engine
    release()
    return {"records": records}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def describe(err: BaseException) -> str:
    traceback.print_exception(err, file=sys.stderr)
    return f"{type(err).__name__}: {err}"[-2000:]


def attempt(record: dict[str, Any], measure: Callable[[], dict[str, Any]], deadline: float) -> dict[str, Any]:
    """Fill `record` from `measure`, or with the error that stopped it: one failure never ends the run."""
    if time.perf_counter() > deadline:
        record["error"] = "skipped: past --budget-s"
        return record
    try:
        record |= measure()
    except Exception as err:
        record["error"] = describe(err)
        release()
    return record


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    names = ("torch", "transformers", "trl", "datasets", "peft", "accelerate", "tokenizers", "pydantic", "pyarrow")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device: dict[str, Any] = {"cuda": cuda, "cpu_count": os.cpu_count()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device |= {
            "name": props.name,
            "memory_gb": round(props.total_memory / GB, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
        }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        revision = commit.stdout.strip() or None
    except OSError:
        revision = None
    return {"python": platform.python_version(), "versions": versions, "device": device, "commit": revision}


def output_path(args: argparse.Namespace, date: str) -> Path:
    name = f"gpu-{date}.json"
    if args.out:
        out = Path(args.out)
        return out / name if out.is_dir() or args.out.endswith("/") else out
    return Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) / name if args.dry_run else RESULTS / name


def first_line(text: str) -> str:
    return text.strip().splitlines()[0][:90] if text.strip() else "?"


def table(result: dict[str, Any]) -> str:
    def cell(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"{'train':<6} {'mode':<5} {'step s':>8} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'plan GB':>8} {'ratio':>6}"
    ]
    for r in result["train"]:
        if "error" in r:
            lines.append(f"{r['size']:<6} {r['mode']:<5} error: {first_line(r['error'])}")
            continue
        m = r["memory"]
        lines.append(
            f"{r['size']:<6} {r['mode']:<5} {r['step_s_median']:>8.3f} {r['tokens_per_s']:>10,.0f} "
            f"{cell(r['mfu'], '.3f'):>6} {cell(m['measured_max_allocated_gb'], '.3g'):>8} "
            f"{m['predicted']['allocated_gb']:>8.3g} {cell(m['measured_over_predicted'], '.2f'):>6}"
        )
    lines.append(f"{'gen':<6} {'batch':>5} {'tokens/s':>10} {'seconds':>8} {'peak GB':>8}")
    for r in result["generate"]:
        if "error" in r:
            lines.append(f"{r['size']:<6} {r['batch_size']:>5} error: {first_line(r['error'])}")
            continue
        lines.append(
            f"{r['size']:<6} {r['batch_size']:>5} {r['tokens_per_s']:>10,.1f} {r['seconds']:>8.2f} "
            f"{cell(r['peak_allocated_gb'], '.3g'):>8}"
        )
    lines.append("plan GB: idpo plan's estimate without its 1.5 GB for the CUDA context and allocator slack")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, the tiny shape, a few steps (what CI runs)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="default: 1b 3b (dry run: tiny)")
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--steps", type=int, help="optimizer steps per train run (default 10; dry run 3)")
    parser.add_argument("--warmup-steps", type=int, help="first steps left out of the timing (default 2; dry run 1)")
    parser.add_argument("--batch", type=int, help="pairs per step (default 8, the recipe's; dry run 2)")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default 1024, the recipe's; dry run 64)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8, 64], help="prompts per batch")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per response (default 128; dry run 8)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak; default: by device name")
    parser.add_argument("--budget-s", type=float, default=420, help="start no measurement after this many seconds")
    parser.add_argument("--workdir", help="where models and stage outputs go (default: a temporary directory)")
    parser.add_argument("--out", help="result file, or a directory for gpu-<date>.json")
    args = parser.parse_args(argv)
    defaults = (
        {"sizes": ["tiny"], "steps": 3, "warmup_steps": 1, "batch": 2, "max_length": 64, "max_new_tokens": 8}
        if args.dry_run
        else {
            "sizes": ["1b", "3b"],
            "steps": 10,
            "warmup_steps": 2,
            "batch": 8,
            "max_length": 1024,
            "max_new_tokens": 128,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Report:
    """The result document, rewritten after every record: a run stopped at its time limit leaves what it measured."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {**head, "models": [], "train": [], "generate": []}
        self.started = time.perf_counter()

    def add(self, section: str, record: dict[str, Any]) -> dict[str, Any]:
        self.doc[section].append(record)
        self.save()
        return record

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.doc, indent=2) + "\n")

    def failures(self) -> list[dict[str, Any]]:
        records = [self.doc["matmul"], *self.doc["models"], *self.doc["train"], *self.doc["generate"]]
        return [r for r in records if "error" in r]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stage subprocesses inherit it: CPU even on a GPU machine
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("error: no CUDA device; --dry-run runs the same code on CPU", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget_s
    date = datetime.date.today().isoformat()
    own_workdir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    head = {"date": date, "dry_run": args.dry_run, **environment(cuda)}
    head["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    datasheet, source = datasheet_peak(head["device"].get("name"), args.peak_tflops)
    head["peak_tflops"] = {"value": datasheet / 1e12 if datasheet else None, "source": source}
    head["matmul"] = attempt({}, functools.partial(matmul_rate, cuda), deadline)
    report = Report(output_path(args, date), head)
    peaks = Peaks(datasheet, head["matmul"]["tflops"] * 1e12 if "tflops" in head["matmul"] else None)
    try:
        from idpo_jobs.tiny import build_tiny_policy

        tokenizer_dir = build_tiny_policy(Path(args.workdir) / "tiny")  # for its tokenizer; the model goes unused
        for size in args.sizes:
            check_size(report, size, tokenizer_dir, args, cuda, deadline, peaks)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
        report.save()
    print(table(report.doc))
    print(f"wrote {report.path} ({report.doc['elapsed_s']:.0f} s)")
    return 1 if report.failures() else 0


def check_size(
    report: Report,
    size: str,
    tokenizer_dir: Path,
    args: argparse.Namespace,
    cuda: bool,
    deadline: float,
    peaks: Peaks,
) -> None:
    """Build one size, train it in every mode, generate with it."""
    model_dir = Path(args.workdir) / f"model-{size}"
    positions = max(4096, args.max_length + args.max_new_tokens + 512)
    build = functools.partial(build_model, model_dir, size, tokenizer_dir, positions, "cuda" if cuda else "cpu")
    built = report.add("models", attempt({"size": size}, build, deadline))
    for mode in args.modes:
        record: dict[str, Any] = {"size": size, "mode": mode, "batch": args.batch, "max_length": args.max_length}
        if "error" in built:
            record["error"] = "model not built"
        else:
            # A run that starts inside the budget may finish past it: stopping it there would waste it.
            timeout = max(deadline - time.perf_counter(), 0.0) + TRAIN_GRACE_S
            attempt(record, functools.partial(train, model_dir, built, mode, args, timeout, peaks), deadline)
        report.add("train", record)
    if "error" in built:
        generated = {"error": "model not built"}
    else:
        generated = attempt({}, functools.partial(generate, model_dir, args, deadline), deadline)
    records = generated.get("records") or [{"batch_size": b, "error": generated["error"]} for b in args.gen_batches]
    for record in records:
        report.add("generate", {"size": size, **record})
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
