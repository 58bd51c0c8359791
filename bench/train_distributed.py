"""Train-stage wall time at 1, 2, ... processes, through the Job's launcher (torchrun beyond one).

    python bench/train_distributed.py                                  # the tiny model on CPU: 1 and 2
    python bench/train_distributed.py --model DIR --processes 1 8 --pairs 2048 --batch 8 --strategy fsdp

Pairs are synthetic (random words; the bench measures throughput, not learning), written as a complete
rank stage so the train stage runs unchanged. Each run starts from nothing (a fresh workspace), so the
`wall_s` includes interpreter and torchrun start-up, as a Job's would; `stage_s` is the stage's own time
(`_SUCCESS.json`: model loading, training, saving), and `pairs_per_s` divides the pairs by it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from idpo_jobs.config import SUCCESS_FILE, TrainConfig, TrainingSpec
from idpo_jobs.tiny import WORDS, build_tiny_policy, tiny_prompts


def write_pairs(stage: Path, count: int, seed: int = 0, words: tuple[int, int] = (20, 60)) -> None:
    """`count` pairs as a complete rank stage in `stage`; each response has `words` (low, high) random words."""
    rng = random.Random(seed)
    part = stage / "part-00000"
    part.mkdir(parents=True)
    with (part / "pairs.jsonl").open("w") as out:
        for n in range(count):
            prompt = [{"role": "user", "content": rng.choice(tiny_prompts())}]

            def answer() -> list[dict[str, str]]:
                return [{"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(*words)))}]

            out.write(json.dumps({"prompt_id": f"p{n}", "chosen": prompt + answer(), "rejected": prompt + answer()}))
            out.write("\n")
    (part / SUCCESS_FILE).write_text(json.dumps({"stage": "rank", "metrics": {"pairs": count}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    config: TrainConfig, processes: int, env: dict[str, str] | None = None, timeout: float | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """The train stage of `config` as its Job runs it (the launcher; torchrun beyond one process), and its
    wall time. The config file goes into the workspace; `env` adds to this process's environment."""
    path = Path(config.workspace) / "train.json"
    config.dump(path)
    pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": str(processes), "PET_MASTER_ADDR": "127.0.0.1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "idpo_jobs.distributed", "train", "--config", str(path)],
        env={**os.environ, **pet, "PET_MASTER_PORT": str(free_port()), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.perf_counter() - started


def run(model: str, rank_dir: Path, processes: int, args: argparse.Namespace) -> dict[str, float]:
    ws = Path(tempfile.mkdtemp(prefix="bench-train-"))
    training = TrainingSpec(
        per_device_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        distributed={"strategy": args.strategy},
    )
    config = TrainConfig(
        run="bench", iteration=1, workspace=str(ws), model=model, reference_model=model,
        input_dir=str(rank_dir), input_shards=1, training=training,
    )  # fmt: skip
    proc, wall = launch(config, processes)
    if proc.returncode:
        raise SystemExit(f"{processes} processes failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((ws / "iter-1" / "train" / SUCCESS_FILE).read_text())
    stage_s = summary["completionTime"] - summary["startTime"]
    return {
        "processes": processes,
        "strategy": summary["metrics"]["strategy"],
        "steps": summary["metrics"]["steps"],
        "wall_s": round(wall, 1),
        "stage_s": round(stage_s, 1),
        "pairs_per_s": round(args.pairs / stage_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or HF id; default: the tiny model")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    model = args.model or str(build_tiny_policy(root / "policy"))
    write_pairs(root / "rank", args.pairs)
    for processes in args.processes:
        print(json.dumps(run(model, root / "rank", processes, args)), flush=True)


if __name__ == "__main__":
    main()
