"""torch's intra-op threads when several stage processes share a few cores (the test suite's case).

    python bench/threads.py                  # 2 x cores copies at once, 1 thread vs torch's default
    python bench/threads.py --copies 8 --threads 1 2 4

Each copy is a fresh process doing what a tiny stage does on the CPU (DPO-sized train steps on the tiny
policy, then sampling); all copies of one setting run at the same time, settings one after the other.
Prints, per setting, the mean CPU seconds and wall seconds of a copy. With more busy threads than cores,
OpenMP's spin-waiting turns idle time into CPU time the other processes needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORK = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
opt = torch.optim.AdamW(model.parameters(), 1e-4)
x = torch.randint(0, 1000, (4, 64))
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(int(sys.argv[2])):
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
with torch.no_grad():
    model.generate(x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=32, do_sample=True)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(json.dumps({"cpu_s": cpu, "wall_s": time.perf_counter() - started, "threads": torch.get_num_threads()}))
"""


def run_setting(model: Path, copies: int, threads: int | None, steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORK, str(model), str(steps)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(copies)
    ]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {
        "threads": results[0]["threads"],
        "cpu_s_per_copy": sum(r["cpu_s"] for r in results) / copies,
        "wall_s_per_copy": sum(r["wall_s"] for r in results) / copies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--copies", type=int, default=2 * cores)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: torch's default")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    from idpo_jobs.tiny import build_tiny_policy

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_policy(Path(tmp) / "policy")
        rows = [run_setting(model, args.copies, t or None, args.steps) for t in args.threads]
    load = os.getloadavg()[0]
    for row in rows:
        print(
            f"threads={row['threads']:2d}  copies={args.copies}  cpu {row['cpu_s_per_copy']:6.1f} s/copy  "
            f"wall {row['wall_s_per_copy']:6.1f} s/copy"
        )
    base = rows[0]["cpu_s_per_copy"]
    print("cpu ratio to the first setting:", ", ".join(f"{r['cpu_s_per_copy'] / base:.1f}" for r in rows))
    if args.out:
        summary = {
            "cores": cores,
            "copies": args.copies,
            "load_1m": load,
            "rows": rows,
        }
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
