"""`python -m tests.controlplane build | up --kubeconfig F [--nodes K] [--gpus N] [--fast-pods S]
[--image IMAGE[=TARGET] ...] [--layer IMAGE=DIR ...] [--kueue]`."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from tests.controlplane import binaries, images
from tests.controlplane.plane import ControlPlane


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build (or reuse) the binaries and Kueue; print the binaries' folder")
    up = commands.add_parser("up", help="start a control plane and a node agent; stop on Ctrl-C")
    up.add_argument("--kubeconfig", required=True, type=Path, help="admin kubeconfig, written once a node is Ready")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu per node")
    up.add_argument("--fast-pods", type=float, help="pods succeed after this many seconds, without running")
    images.add_arguments(up)
    up.add_argument("--kueue", action="store_true", help="start Kueue's manager too (built on first use)")
    args = parser.parse_args()
    if args.command == "build":
        kube = binaries.build()
        binaries.build_kueue()
        print(kube)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with ControlPlane(
        args.kubeconfig,
        nodes=args.nodes,
        gpus=args.gpus,
        fast_pods=args.fast_pods,
        images=args.image,
        layers=args.layer,
        kueue=args.kueue,
    ):
        print(f"export KUBECONFIG={args.kubeconfig.resolve()}   # Ctrl-C stops the cluster", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
