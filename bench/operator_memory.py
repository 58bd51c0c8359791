"""The operator's memory per run, whatever a spec holds: N suspended runs whose spec carries S bytes.

    python bench/operator_memory.py --runs 40 --env-bytes 1048576       # after `python -m tests.controlplane build`
    python bench/operator_memory.py --runs 40 --env-bytes 1048576 --operator-src DIR --label main

Starts the local control plane and the operator under the chart's RBAC (tests/harness/cluster.py), reads
the operator's resident memory (VmRSS) once it has seen the empty namespace, applies N suspended runs
whose `runtime.env` holds one value of `--env-bytes` bytes (the issue's 40 x 1 MiB), waits until each
run's status is written, and reads it again. `--operator-src` runs another checkout's operator (its
`operator/` and `jobs/` first on PYTHONPATH) against the same CRD. Results:
bench/results/operator_memory-<runs>x<bytes>-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.cluster import Cluster, local_target  # noqa: E402
from tests.test_operator_e2e import run_manifest  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settle(pid: int, seconds: float = 10.0) -> float:
    """The operator's RSS once it stopped moving (a few seconds without a change of 1 MB)."""
    last, since = rss_mb(pid), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(1)
        now = rss_mb(pid)
        if abs(now - last) > 1:
            last, since = now, time.monotonic()
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--env-bytes", type=int, default=1 << 20)
    parser.add_argument("--operator-src", help="another checkout whose operator to measure")
    parser.add_argument("--label", default="now")
    args = parser.parse_args()
    if args.operator_src:
        src = Path(args.operator_src)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(src / "operator"), str(src / "jobs")])
    with tempfile.TemporaryDirectory() as tmp:
        target = local_target(Path(tmp))
        try:
            with Cluster(target, Path(tmp), "memory") as cluster:
                assert cluster.operator is not None
                pid = cluster.operator.pid
                before = settle(pid)
                runtime = {"image": cluster.image, "env": [{"name": "BLOB", "value": "x" * args.env_bytes}]}
                for n in range(args.runs):
                    # `create`: `apply` would copy the spec into an annotation, which holds 256 KiB at most.
                    doc = yaml.safe_dump(run_manifest(f"big-{n}", suspend=True, runtime=runtime))
                    created = cluster.kubectl("create", "-f", "-", stdin=doc)
                    assert created.returncode == 0, created.stderr[:500]
                phases = {}
                for n in range(args.runs):
                    status = cluster.wait(f"big-{n}", lambda s: "phase" in s, timeout=120)
                    phases[status["phase"]] = phases.get(status["phase"], 0) + 1
                after = settle(pid)
        finally:
            target.plane.stop()
    result = {
        "runs": args.runs,
        "env_bytes": args.env_bytes,
        "label": args.label,
        "operator_rss_mb_before": round(before, 1),
        "operator_rss_mb_after": round(after, 1),
        "per_run_kb": round((after - before) * 1024 / max(args.runs, 1), 1),
        "phases": phases,
    }
    out = ROOT / "bench" / "results" / f"operator_memory-{args.runs}x{args.env_bytes}-{args.label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
