"""`idpo`: run a manifest locally, show a run's status, build the tiny demo models.

idpo run examples/tiny.yaml           # the whole loop on this machine (CPU is fine)
idpo status                           # per-iteration table of the run in .idpo/
idpo status RUN -n NS                 # the same table for a run on the cluster (kubeconfig)
idpo make-tiny .idpo/tiny             # tiny policy, PairRM-format ranker and prompts
idpo crd -o crds/idpo.dev_iterativedporuns.yaml   # the CRD, generated from the spec models
idpo operator -n ml                   # the operator (kopf), watching namespace ml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from idpo_operator.spec import DEFAULT_STAGE_IMAGE, ManifestError, load_manifest

DEFAULT_ROOT = Path(".idpo")


def _run(args: argparse.Namespace) -> int:
    from idpo_operator.local import LocalRunner

    manifest = load_manifest(args.manifest)
    if args.policy:  # the user is the admin of their own machine: no policy unless they ask for one
        from idpo_operator import policy

        denied = policy.violations(manifest.spec, policy.load(args.policy))
        if denied:
            raise ManifestError(f"{args.manifest} is refused by {args.policy}:\n  " + "\n  ".join(denied))
    workdir = Path(args.workdir) if args.workdir else DEFAULT_ROOT / manifest.metadata.name
    print(f"run {manifest.metadata.name}: workdir {workdir}", file=sys.stderr)
    return LocalRunner(manifest, workdir).run()


def _find_workdir(given: str | None) -> Path:
    if given:
        return Path(given)
    found = sorted(p.parent for p in DEFAULT_ROOT.glob("*/status.json"))
    if len(found) != 1:
        names = ", ".join(str(p) for p in found) or "none"
        raise SystemExit(f"error: pass --workdir (runs under {DEFAULT_ROOT}/: {names})")
    return found[0]


def _cluster_status(name: str, namespace: str | None) -> dict:
    from kubernetes import client, config

    from idpo_operator.spec import GROUP, PLURAL, VERSION

    config.load_kube_config()
    namespace = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
    try:
        run = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as err:
        raise SystemExit(f"error: cannot read IterativeDPORun {namespace}/{name}: {err.reason}") from None
    return run.get("status") or {}


def _load_status(args: argparse.Namespace) -> tuple[dict, str]:
    """A run's status and name: RUN on the cluster of the kubeconfig, or a local run's status.json."""
    if args.run:
        return _cluster_status(args.run, args.namespace), args.run
    workdir = _find_workdir(args.workdir)
    try:
        return json.loads((workdir / "status.json").read_text()), workdir.name
    except FileNotFoundError:
        raise SystemExit(f"error: no status.json in {workdir}") from None


def _status(args: argparse.Namespace) -> int:
    from idpo_operator.table import render

    status, name = _load_status(args)
    print(json.dumps(status, indent=2) if args.json else render(status, name))
    return 0


def _report(args: argparse.Namespace) -> int:
    from idpo_jobs import report

    status, name = _load_status(args)
    html = args.format == "html" or (args.format is None and (args.output or "").endswith((".html", ".htm")))
    text = report.render_html(status, name) if html else report.render_markdown(status, name)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _crd(args: argparse.Namespace) -> int:
    from idpo_operator.crd import render

    if args.output:
        Path(args.output).write_text(render())
    else:
        sys.stdout.write(render())
    return 0


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from idpo_operator import apply, handlers, policy  # importing handlers registers them with kopf
    from idpo_operator.leader import default_namespace

    if args.kueue:
        handlers.watch_kueue()
    lease = (args.leader_election_namespace or default_namespace()) if args.leader_election else None
    handlers.options = apply.Settings(
        stage_image=args.stage_image,
        lease_namespace=lease,
        max_concurrent_stages=args.max_concurrent_stages,
        gpu_memory_gb=args.gpu_memory,
        job_ttl_seconds=args.finished_job_ttl or None,
        policy=policy.load(args.policy) if args.policy else policy.default(args.stage_image),
    )

    if args.metrics_port:
        from idpo_operator import metrics

        metrics.serve(args.metrics_port)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    kopf.run(
        standalone=True, namespaces=args.namespace, clusterwide=args.all_namespaces, liveness_endpoint=args.liveness
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    import yaml

    from idpo_operator import memory, render

    manifest = load_manifest(args.manifest)
    if args.output == "yaml":
        print(yaml.safe_dump_all(render.iteration_objects(manifest, args.stage_image), sort_keys=False), end="")
        return 0
    plan = memory.plan_memory(manifest.spec, gpu_memory=args.gpu_memory * memory.GB)
    print(memory.format_plan(plan))
    misfits = [s for s in plan.chosen() if s.fits(plan.gpu_memory) is False]
    for stage in misfits:
        print(f"warning: {stage.stage} ({stage.variant}) does not fit {args.gpu_memory:g} GB per GPU", file=sys.stderr)
    return 1 if misfits and args.strict else 0


def _make_tiny(args: argparse.Namespace) -> int:
    from idpo_jobs.tiny import build_tiny

    for name, path in build_tiny(args.dir, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idpo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a manifest on this machine")
    run.add_argument("manifest")
    run.add_argument("--workdir", help=f"default: {DEFAULT_ROOT}/<run name>")
    run.add_argument(
        "--policy", help="refuse what this policy file does not allow, as a cluster would (docs/security.md)"
    )
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="per-iteration table of a local run, or of RUN on the cluster")
    status.add_argument("run", nargs="?", help="an IterativeDPORun on the cluster of the current kubeconfig")
    status.add_argument("-n", "--namespace", help="with RUN; default: the kubeconfig context's namespace")
    status.add_argument("--workdir", help="a local run's workdir")
    status.add_argument("--json", action="store_true", help="print status.json")
    status.set_defaults(func=_status)
    rep = sub.add_parser("report", help="win rates, LC win rates, length, loss per iteration (HTML or markdown)")
    rep.add_argument("run", nargs="?", help="an IterativeDPORun on the cluster of the current kubeconfig")
    rep.add_argument("-n", "--namespace", help="with RUN; default: the kubeconfig context's namespace")
    rep.add_argument("--workdir", help="a local run's workdir")
    rep.add_argument("--format", choices=["html", "md"], help="default: html for an -o ending in .html, else md")
    rep.add_argument("-o", "--output", help="write to this file (an .html page embeds its plots)")
    rep.set_defaults(func=_report)
    crd = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the spec models")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    crd.set_defaults(func=_crd)
    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf) with the current kubeconfig")
    scope = op.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument(
        "--stage-image",
        default=os.environ.get("IDPO_STAGE_IMAGE", DEFAULT_STAGE_IMAGE),
        help=f"stage image for runs that name none (env IDPO_STAGE_IMAGE; default {DEFAULT_STAGE_IMAGE})",
    )
    op.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="act only while holding the Lease `idpo-operator`, so replicas never both write (default: on)",
    )
    op.add_argument("--leader-election-namespace", help="the Lease's namespace (default: POD_NAMESPACE)")
    op.add_argument(
        "--max-concurrent-stages",
        type=int,
        default=0,
        help="stage Jobs running at once across all runs; more wait as `Pending: waiting for capacity` (0: no cap)",
    )
    op.add_argument(
        "--gpu-memory",
        type=float,
        default=80,
        help="GB per GPU that each run's status.memoryPlan is checked against (default 80)",
    )
    op.add_argument(
        "--finished-job-ttl",
        type=int,
        default=3600,
        help="seconds a finished stage Job (and its pods) stays before Kubernetes deletes it; its record stays "
        "in the run's status (0: keep them; default 3600)",
    )
    op.add_argument(
        "--policy",
        help="what runs may ask for (YAML, docs/security.md; the chart mounts its `policy` values); default: "
        "the --stage-image repository only, the shipped rankers, no Secrets or service accounts",
    )
    op.add_argument(
        "--kueue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="watch Kueue's Workloads and LocalQueues, to say why a stage is queued or preempted (docs/kueue.md; "
        "without Kueue installed the watches wait; default: on)",
    )
    op.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    op.add_argument("--log-format", choices=["plain", "full", "json"], default="full", help="json for log pipelines")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=_operator)
    plan = sub.add_parser("plan", help="GPU memory per stage; -o yaml prints the objects of iteration 1")
    plan.add_argument("manifest")
    plan.add_argument("-o", "--output", choices=["text", "yaml"], default="text")
    plan.add_argument("--gpu-memory", type=float, default=80, help="GB per GPU to check against (default 80)")
    plan.add_argument("--strict", action="store_true", help="exit 1 when a stage does not fit")
    plan.add_argument("--stage-image", default=DEFAULT_STAGE_IMAGE, help="as the operator's --stage-image")
    plan.set_defaults(func=_plan)
    tiny = sub.add_parser("make-tiny", help="build the tiny demo models")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
