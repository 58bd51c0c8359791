"""The operator at platform scale: N concurrent runs of K iterations on the local control plane.

    python bench/operator_scale.py --runs 100                  # after `python -m tests.controlplane build`
    python bench/operator_scale.py --runs 500 --iterations 1
    python bench/operator_scale.py --runs 100 --operator-src DIR   # another checkout's operator, to compare
    python bench/operator_scale.py --runs 100 --cluster-wide --churn 2000   # unrelated Jobs churning elsewhere

Pods complete in `--pod-seconds` without running anything (the node agent's fast-pods mode, with a canned
stage summary), so what is measured is the operator and the control plane. Everything is read from the
apiserver's audit log (microsecond timestamps), as the API saw it:
- hand-off latency, two ways: a stage's Job seen Complete by the bench's own Job watch -> the next
  stage's Job seen created by that watch (the operator's part), and a stage's pod reported Succeeded
  (the node agent's last pod status write) -> the next Job created (the audit log; the Job
  controller's reaction included); p50/p90/p99;
- time to first Job: the run created -> its first Job created;
- API writes by the operator's identity only (the chart's ServiceAccount), per stage transition (a
  stage's start, a hand-off, a run's end) and per run, by verb and resource;
- CPU seconds and peak RSS of the operator, and CPU seconds of each control-plane process.
With `--churn N`, N unrelated Jobs (a pod each) are created, completed and deleted in another namespace
while the runs go, as other teams' work would: an operator that receives them pays for them.
Results go to bench/results/operator_scale-<runs>x<iterations>-<label>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from tests.controlplane.plane import ControlPlane  # noqa: E402
from tests.harness import chart  # noqa: E402
from tests.harness.cluster import kubectl_binary  # noqa: E402

NAMESPACE = "bench"
CHURN_NAMESPACE = "churn"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
NODE_AGENT = "idpo-node-agent"  # its client certificate's name (tests/controlplane/pki.py)
FINALIZERS = {"apiGroups": ["idpo.dev"], "resources": ["iterativedporuns/finalizers"], "verbs": ["update"]}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICKS  # incl. children


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stamp(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def manifest(name: str, iterations: int, evaluation: bool | None) -> dict[str, Any]:
    """`evaluation`: None for an operator that predates it; else whether each iteration is evaluated."""
    body = {
        "apiVersion": "idpo.dev/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"name": "pvc://m"},
            "prompts": {"source": "pvc://p.jsonl", "perIteration": 8},
            "iterations": iterations,
            "generation": {"engine": "transformers"},
            "ranking": {"ranker": "function", "function": "rewards:starts_with_s", "model": None},
            "storage": {"existingClaim": "shared"},
        },
    }
    if evaluation is not None:
        body["spec"]["evaluation"] = {"enabled": evaluation}
    return body


class JobWatch:
    """The bench's own watch on the runs' Jobs: when each was first seen, and first seen complete."""

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import client, config, watch

        self.api = client.BatchV1Api(config.new_client_from_config(str(kubeconfig)))
        self.watch = watch.Watch()
        self.created: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:  # a watch ends after the server's timeout: watch again (re-listed Jobs keep their times)
            for event in self.watch.stream(self.api.list_namespaced_job, NAMESPACE):
                now, job = time.time(), event["object"]
                name = job.metadata.name
                self.created.setdefault(name, now)
                done = {c.type for c in (job.status.conditions or []) if c.status == "True"}
                if done & {"Complete", "SuccessCriteriaMet"}:
                    self.completed.setdefault(name, now)

    def handoffs(self) -> list[float]:
        out = []
        by_run = collections.defaultdict(list)
        for name, when in self.created.items():
            by_run[name.rsplit("-i", 1)[0]].append((when, name))
        for jobs in by_run.values():
            jobs.sort()
            out += [b[0] - self.completed[a[1]] for a, b in itertools.pairwise(jobs) if a[1] in self.completed]
        return out


def churn(kubectl: Any, count: int, stop: threading.Event) -> int:
    """Create `count` unrelated Jobs in CHURN_NAMESPACE in batches, delete them, again, until `stop`."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "other-team-", "labels": {"team": "other"}},
        "spec": {
            "ttlSecondsAfterFinished": 5,
            "template": {
                "metadata": {"labels": {"team": "other"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "work", "image": "busybox", "command": ["true"]}],
                },
            },
        },
    }
    made, batch = 0, 100
    while not stop.is_set() and made < count:
        kubectl("create", "-n", CHURN_NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all([job] * batch))
        made += batch
    return made


def analyse(audit: Path, operator_user: str, runs: int) -> dict[str, Any]:
    created_runs: dict[str, float] = {}
    job_created: dict[str, float] = {}
    job_done: dict[str, float] = {}
    calls: collections.Counter[str] = collections.Counter()
    by_resource: collections.Counter[str] = collections.Counter()
    for line in audit.read_text().splitlines():
        event = json.loads(line)
        ref, user, verb = event.get("objectRef") or {}, event["user"]["username"], event["verb"]
        when = stamp(event["stageTimestamp"])
        if ref.get("namespace") not in (NAMESPACE, None):
            continue
        if user == operator_user and ref.get("namespace") == NAMESPACE:
            calls[verb] += 1
            resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            by_resource[f"{verb} {resource}"] += 1
        if ref.get("resource") == "iterativedporuns" and verb == "create" and not ref.get("subresource"):
            created_runs[ref["name"]] = when
        elif ref.get("resource") == "jobs" and verb == "create" and user == operator_user:
            job_created.setdefault(ref["name"], when)
        elif ref.get("resource") == "pods" and ref.get("subresource") == "status" and user == NODE_AGENT:
            job = ref["name"].rsplit("-", 2)[0]  # `<job>-<index>-<suffix>`: an Indexed Job's pod
            job_done[job] = max(job_done.get(job, 0.0), when)  # its last word: the pod succeeded
    handoffs, first = [], []
    for run, created in created_runs.items():
        jobs = sorted((t, name) for name, t in job_created.items() if name.startswith(f"{run}-i"))
        if jobs:
            first.append(jobs[0][0] - created)
        handoffs += [b[0] - job_done[a[1]] for a, b in itertools.pairwise(jobs) if a[1] in job_done]
    jobs = len(job_created)
    transitions = jobs + len(created_runs)  # each stage's start (a hand-off, or the first) and each run's end
    writes = sum(n for v, n in calls.items() if v in WRITES)
    return {
        "handoffs": len(handoffs),
        "pod_to_job_seconds": quantiles(handoffs),
        "first_job_seconds": {q: round(percentile(first, v), 3) for q, v in (("p50", 0.5), ("p99", 0.99))},
        "operator_calls": dict(calls),
        "operator_writes_per_transition": round(writes / max(transitions, 1), 2),
        "operator_writes_per_run": {
            k.removeprefix("create ").removeprefix("patch "): round(n / max(len(created_runs), 1), 2)
            for k, n in by_resource.most_common()
            if k.split()[0] in WRITES
        },
        "operator_calls_by_resource": dict(by_resource.most_common()),
        "runs_seen": len(created_runs),
    }


def quantiles(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        q: round(percentile(values, v), 3) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    }
    out["mean"] = round(statistics.fmean(values), 3) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--pod-seconds", type=float, default=1.0)
    parser.add_argument("--operator-src", help="a checkout whose operator/ and jobs/ to run instead of this one")
    parser.add_argument("--label", default="current")
    parser.add_argument("--evaluate", action="store_true", help="evaluate each iteration (5 stages, not 3)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--cluster-wide", action="store_true", help="the operator watches every namespace (-A)")
    parser.add_argument("--churn", type=int, default=0, help="unrelated Jobs to create and delete elsewhere meanwhile")
    parser.add_argument("--idle-seconds", type=float, default=60, help="with --runs 0 and no churn: how long to idle")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="idpo-bench-"))
    images = ["busybox", "ghcr.io/idpo-dev/idpo-jobs:0.1.0"]  # the churn's image, and the stages'
    with ControlPlane(work / "admin.kubeconfig", fast_pods=args.pod_seconds, images=images) as plane:
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}

        def kubectl(*a: str, stdin: str | None = None) -> str:
            out = subprocess.run([kubectl_binary(), *a], input=stdin, capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(out.stderr)
            return out.stdout

        source = Path(args.operator_src) if args.operator_src else ROOT
        kubectl("apply", "-f", str(source / "crds"))  # each operator with its own CRD and chart RBAC
        for attempt in range(20):  # a CRD just applied may have no conditions yet: kubectl wait then errs
            try:
                kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        kubectl("create", "namespace", NAMESPACE)
        kubectl("create", "namespace", CHURN_NAMESPACE)
        kubectl("create", "namespace", chart.RELEASE_NAMESPACE)
        rendered = helm.Chart.load(source / "charts" / "idpo").render(
            None, name=chart.RELEASE, namespace=chart.RELEASE_NAMESPACE
        )
        docs = [
            d for text in rendered.values() for d in yaml.safe_load_all(text) if d and d["kind"] in chart.RBAC_KINDS
        ]
        for role in (d for d in docs if d["kind"] == "ClusterRole"):
            role["rules"].append(FINALIZERS)  # older charts lack it; without it no Job can be created
        kubectl("apply", "-n", chart.RELEASE_NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(docs))
        ns, account = chart.service_account(docs)
        token = kubectl("create", "token", account, "-n", ns, "--duration=24h").strip()
        operator_config = plane.token_kubeconfig(work / "operator.kubeconfig", token)
        claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shared"}}
        claim["spec"] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(claim))

        operator_env = {**env, "KUBECONFIG": str(operator_config), "POD_NAMESPACE": ns}  # the Lease's namespace
        operator_env["PYTHONPATH"] = os.pathsep.join([str(source / "operator"), str(source / "jobs")])
        log = (work / "operator.log").open("w")
        scope = ["-A"] if args.cluster_wide else ["-n", NAMESPACE]
        if (source / "operator" / "idpo_operator" / "policy.py").exists():  # the bench's runs rank with a function
            (work / "policy.yaml").write_text("functionModules: null\n")
            scope += ["--policy", str(work / "policy.yaml")]
        operator = subprocess.Popen(
            [sys.executable, "-m", "idpo_operator", "operator", *scope, "--log-format", "plain"],
            env=operator_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        try:
            time.sleep(3)  # the operator lists and starts its watches
            plane_cpu = {name: cpu_seconds(pid) for name, pid in plane.pids().items()}
            operator_cpu = cpu_seconds(operator.pid)
            started = time.monotonic()
            knows_evaluation = "evaluation:" in (source / "crds" / "idpo.dev_iterativedporuns.yaml").read_text()
            evaluation = args.evaluate if knows_evaluation else None
            watch = JobWatch(plane.kubeconfig)
            stop_churn = threading.Event()
            churned: list[int] = []
            if args.churn:
                threading.Thread(target=lambda: churned.append(churn(kubectl, args.churn, stop_churn))).start()
            bodies = [manifest(f"run-{i:04d}", args.iterations, evaluation) for i in range(args.runs)]
            if bodies:
                kubectl("create", "-f", "-", stdin=yaml.safe_dump_all(bodies))
            phases: list[str] = []
            while True:
                if args.runs:
                    phases = kubectl("get", "idpo", "-n", NAMESPACE, "-o", "jsonpath={.items[*].status.phase}").split()
                    done = sum(p in ("Succeeded", "Failed") for p in phases)
                    if done == args.runs:
                        break
                elif args.churn:  # no runs: the operator idles while the other team's Jobs come and go
                    left = kubectl("get", "jobs", "-n", CHURN_NAMESPACE, "-o", "name").split()
                    if churned and not left:
                        break
                elif time.monotonic() - started > args.idle_seconds:
                    break
                if time.monotonic() - started > args.timeout:
                    raise RuntimeError(f"did not finish in {args.timeout:.0f} s")
                time.sleep(2)
            wall = time.monotonic() - started
            stop_churn.set()
            result = {
                "runs": args.runs,
                "iterations": args.iterations,
                "pod_seconds": args.pod_seconds,
                "label": args.label,
                "cluster_wide": args.cluster_wide,
                "churn_jobs": churned[0] if churned else 0,
                "wall_seconds": round(wall, 1),
                "failed_runs": sum(p == "Failed" for p in phases),
                "operator_cpu_seconds": round(cpu_seconds(operator.pid) - operator_cpu, 2),
                "operator_peak_rss_mb": round(peak_rss_mb(operator.pid), 1),
                "control_plane_cpu_seconds": {
                    name: round(cpu_seconds(pid) - plane_cpu[name], 2) for name, pid in plane.pids().items()
                },
            }
        finally:
            operator.terminate()
            operator.wait(30)
        result["handoff_seconds"] = quantiles(watch.handoffs())  # Job complete -> next Job created
        result |= analyse(plane.audit_log, f"system:serviceaccount:{ns}:{account}", args.runs)
        result["operator_cpu_ms_per_handoff"] = round(
            1000 * result["operator_cpu_seconds"] / max(result["handoffs"], 1), 2
        )
        result["operator_cpu_ms_per_second"] = round(1000 * result["operator_cpu_seconds"] / wall, 2)
    out = ROOT / "bench" / "results" / f"operator_scale-{args.runs}x{args.iterations}-{args.label}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
