"""What a stage process's start and exit cost, with and without what `contract.exit_after` does about them.

    python bench/startup.py                      # 6 rounds, each a process of every kind, one after the other
    python bench/startup.py --rounds 10 --out bench/results/startup.json

Each process imports what a train stage imports (torch, transformers' model classes, TRL's DPOTrainer),
loads the tiny policy and its tokenizer, and exits, in one of three ways:

- `plain`: imports as they come, then `sys.exit(0)` (the interpreter frees every module and object first);
- `lean`: `startup.skip_unused_imports()` first (transformers leaves scikit-learn and mistral-common out),
  then `sys.exit(0)`;
- `stage`: through `contract.exit_after`, as every stage process does: a lean start, no teardown.

The kinds alternate so that a machine's noise falls on all of them. Prints the mean CPU seconds (user +
system, from the child's rusage) and wall seconds of each kind, and what the start and the exit save.
(bench/results/exit.json is this benchmark before the lean start, when it compared `plain` and `stage`.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGE = """
import sys
from idpo_jobs import contract, startup

def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer  # noqa: F401

    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    AutoTokenizer.from_pretrained(sys.argv[1])
    return 0

if sys.argv[2] == "stage":
    contract.exit_after(main)
if sys.argv[2] == "lean":
    startup.skip_unused_imports()
sys.exit(main())
"""
KINDS = ("plain", "lean", "stage")


def one(model: Path, how: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-c", STAGE, str(model), how], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from idpo_jobs.tiny import ensure_tiny, tiny_cache

    model = ensure_tiny(tiny_cache()) / "policy"
    runs: dict[str, list[tuple[float, float]]] = {how: [] for how in KINDS}
    for _ in range(args.rounds):
        for how in KINDS:
            runs[how].append(one(model, how))
    result: dict[str, object] = {
        how: {
            "cpu_s": statistics.mean(c for c, _ in done),
            "wall_s": statistics.mean(w for _, w in done),
            "cpu_s_each": [round(c, 2) for c, _ in done],
        }
        for how, done in runs.items()
    }
    cpu = {how: statistics.mean(c for c, _ in done) for how, done in runs.items()}
    result["saved_cpu_s"] = {
        "lean_start": cpu["plain"] - cpu["lean"],
        "exit": cpu["lean"] - cpu["stage"],
        "both": cpu["plain"] - cpu["stage"],
    }
    result |= {"rounds": args.rounds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
