"""What a stage process's exit costs: CPython's teardown against `contract.exit_after`'s.

    python bench/exit.py                      # 6 rounds, each a pair of processes run one after the other
    python bench/exit.py --rounds 10 --out bench/results/exit.json

Each process imports what a train stage imports (torch, transformers' model classes, TRL's DPOTrainer),
loads the tiny policy, and exits: with `sys.exit(0)` (the interpreter frees every module and object
first) or through `contract.exit_after` (the atexit handlers run, the teardown does not). The two kinds
alternate so that a machine's noise falls on both. Prints the mean CPU seconds (user + system, from the
child's rusage) and wall seconds of each kind, and their difference.
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
from idpo_jobs import contract

def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer  # noqa: F401

    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    return 0

if sys.argv[2] == "teardown":
    sys.exit(main())
contract.exit_after(main)
"""


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
    runs: dict[str, list[tuple[float, float]]] = {"teardown": [], "exit_after": []}
    for _ in range(args.rounds):
        for how in runs:
            runs[how].append(one(model, how))
    result = {
        how: {
            "cpu_s": statistics.mean(c for c, _ in done),
            "wall_s": statistics.mean(w for _, w in done),
            "cpu_s_each": [round(c, 2) for c, _ in done],
        }
        for how, done in runs.items()
    }
    result["saved_cpu_s"] = result["teardown"]["cpu_s"] - result["exit_after"]["cpu_s"]
    result["rounds"] = args.rounds
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
