"""The cost of resuming the train stage: time and size of each checkpoint, and the work a kill wastes,
against the checkpoint interval (`training.checkpointEverySteps`).

    python bench/resume.py                                        # the tiny model on CPU, label `tiny-cpu`
    python bench/resume.py --model DIR --pairs 256 --batch 8 --intervals 8 32 --label mistral-1b

Pairs are synthetic (`train_distributed.write_pairs`), written as a complete rank stage, so the train stage
runs unchanged, through the Job's launcher. For each interval k:

- one attempt runs to its end: each save's time (the Trainer writing weights, AdamW moments, scheduler
  and RNG states, then our fsync, rename and marker) and size, from the stage's `idpo-checkpoint` lines;
  their share of the Trainer's loop (`train_runtime`, saves included), and the stage's own time
  (`_SUCCESS.json`: model loading too) beside that of a run without checkpoints (noisy on a shared machine);
- for each `--kill-at` step n, an attempt is killed with SIGKILL as step n ends (before that step's
  checkpoint, if one is due: the test suite's hook `tests/hooks/sitecustomize.py`, exact to the step)
  and a second attempt finishes the stage: the steps it did again, n - resumed_from_step, are the
  wasted work (between 1 and k; (k + 1) / 2 on average over kill points).

Results: bench/results/resume-<label>.json (and one JSON line per interval on stdout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from idpo_jobs.config import SUCCESS_FILE, TrainConfig, TrainingSpec
from idpo_jobs.tiny import build_tiny_policy
from train_distributed import launch, write_pairs

ROOT = Path(__file__).parents[1]
HOOKS = ROOT / "tests" / "hooks"
RESULTS = Path(__file__).parent / "results"
SAVED = re.compile(r"idpo-checkpoint step (\d+)/\d+: \S+ \(([\d.]+) MB in ([\d.]+)s\)")
RUNTIME = re.compile(r"'train_runtime': '([\d.]+)'")  # the Trainer's loop, saves included


def train(model: str, rank_dir: Path, args: argparse.Namespace, every: int | None, env: dict[str, str] | None = None):
    """One attempt of the train stage in `args.workspace`; its process and wall time."""
    training = TrainingSpec(
        per_device_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        gradient_checkpointing=False,
        checkpoint_every_steps=every,
        checkpoint_every_minutes=None,
    )
    config = TrainConfig(
        run="bench", iteration=1, workspace=str(args.workspace), model=model, reference_model=model,
        input_dir=str(rank_dir), input_shards=1, training=training,
    )  # fmt: skip
    return launch(config, 1, env=env, timeout=args.timeout)


def summary(workspace: Path) -> dict[str, Any]:
    return json.loads((workspace / "iter-1" / "train" / SUCCESS_FILE).read_text())


def fresh(args: argparse.Namespace, name: str) -> Path:
    args.workspace = Path(tempfile.mkdtemp(prefix=f"bench-resume-{name}-"))
    return args.workspace


def interval(model: str, rank_dir: Path, args: argparse.Namespace, every: int) -> dict[str, Any]:
    fresh(args, f"every-{every}")
    proc, _ = train(model, rank_dir, args, every)
    if proc.returncode:
        raise SystemExit(f"checkpointing every {every} failed:\n{proc.stderr[-3000:]}")
    done = summary(args.workspace)
    stage_s = done["completionTime"] - done["startTime"]
    saves = [(int(step), float(mb), float(s)) for step, mb, s in SAVED.findall(proc.stdout)]
    loop_s = float(RUNTIME.findall(proc.stdout)[-1])
    kills = []
    for n in args.kill_at:
        fresh(args, f"every-{every}-kill-{n}")
        hook = {"PYTHONPATH": f"{HOOKS}:{os.environ.get('PYTHONPATH', '')}", "IDPO_TEST_KILL_AT": f"progress:{n}"}
        killed, _ = train(model, rank_dir, args, every, env=hook)
        if killed.returncode != -9:  # SIGKILL
            raise SystemExit(f"the attempt to be killed at step {n} ended with {killed.returncode}")
        again, wall = train(model, rank_dir, args, every)
        if again.returncode:
            raise SystemExit(f"the attempt after a kill at step {n} failed:\n{again.stderr[-3000:]}")
        metrics = summary(args.workspace)["metrics"]
        kills.append(
            {
                "killed_at_step": n,
                "resumed_from_step": metrics["resumed_from_step"],
                "wasted_steps": n - metrics["resumed_from_step"],
                "second_attempt_wall_s": round(wall, 1),
            }
        )
    return {
        "checkpoint_every_steps": every,
        "saves": len(saves),
        "save_s_mean": round(statistics.fmean(s for _, _, s in saves), 3) if saves else None,
        "save_s_max": round(max(s for _, _, s in saves), 3) if saves else None,
        "checkpoint_mb": saves[-1][1] if saves else None,
        "save_s_total": round(sum(s for _, _, s in saves), 3),
        "train_loop_s": loop_s,
        "save_share_of_train_loop": round(sum(s for _, _, s in saves) / loop_s, 3),
        "stage_s": round(stage_s, 2),
        "kills": kills,
        "wasted_steps_mean": round(statistics.fmean(k["wasted_steps"] for k in kills), 2) if kills else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or HF id; default: the tiny model")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="per-device batch size: steps = pairs / batch")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--kill-at", type=int, nargs="+", default=[5, 10, 16, 17, 23, 27], help="steps to kill at")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per attempt")
    parser.add_argument("--label", default="tiny-cpu", help="names bench/results/resume-<label>.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-resume-data-"))
    model = args.model or str(build_tiny_policy(root / "policy"))
    write_pairs(root / "rank", args.pairs)
    fresh(args, "baseline")
    proc, _ = train(model, root / "rank", args, None)
    if proc.returncode:
        raise SystemExit(f"the run without checkpoints failed:\n{proc.stderr[-3000:]}")
    base = summary(args.workspace)
    baseline_s = base["completionTime"] - base["startTime"]
    steps = base["metrics"]["steps"]
    if any(not 0 < n < steps for n in args.kill_at):
        raise SystemExit(f"--kill-at must lie within the {steps} steps")
    results = []
    for every in args.intervals:
        results.append(interval(model, root / "rank", args, every))
        print(json.dumps(results[-1]), flush=True)

    import torch

    record = {
        "label": args.label,
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cuda": torch.cuda.is_available()},
        "torch": torch.__version__,
        "model": args.model or "tiny policy (idpo_jobs.tiny)",
        "pairs": args.pairs,
        "batch": args.batch,
        "max_length": args.max_length,
        "steps": steps,
        "stage_s_without_checkpoints": round(baseline_s, 2),
        "train_loop_s_without_checkpoints": float(RUNTIME.findall(proc.stdout)[-1]),
        "intervals": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"resume-{args.label}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
