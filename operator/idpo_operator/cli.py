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


def _status(args: argparse.Namespace) -> int:
    from idpo_operator.table import render

    if args.run:
        status = _cluster_status(args.run, args.namespace)
        print(json.dumps(status, indent=2) if args.json else render(status, args.run))
        return 0
    workdir = _find_workdir(args.workdir)
    try:
        status = json.loads((workdir / "status.json").read_text())
    except FileNotFoundError:
        print(f"error: no status.json in {workdir}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status, workdir.name))
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

    import idpo_operator.handlers  # noqa: F401  (registers the handlers)
    from idpo_operator import apply

    apply.settings.stage_image = args.stage_image

    if args.metrics_port:
        from idpo_operator import metrics

        metrics.serve(args.metrics_port)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    kopf.run(
        standalone=True, namespaces=args.namespace, clusterwide=args.all_namespaces, liveness_endpoint=args.liveness
    )
    return 0


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
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="per-iteration table of a local run, or of RUN on the cluster")
    status.add_argument("run", nargs="?", help="an IterativeDPORun on the cluster of the current kubeconfig")
    status.add_argument("-n", "--namespace", help="with RUN; default: the kubeconfig context's namespace")
    status.add_argument("--workdir", help="a local run's workdir")
    status.add_argument("--json", action="store_true", help="print status.json")
    status.set_defaults(func=_status)
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
    op.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    op.add_argument("--log-format", choices=["plain", "full", "json"], default="full", help="json for log pipelines")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=_operator)
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
