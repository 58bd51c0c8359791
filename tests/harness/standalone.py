"""The emulated cluster on its own, for trying the real-cluster path of the e2e suite:

    python -m tests.harness.standalone DIR &      # writes DIR/kubeconfig, serves until killed
    IDPO_E2E_KUBECONFIG=DIR/kubeconfig IDPO_E2E_IMAGE=any IDPO_E2E_NAMESPACE=e2e IDPO_E2E_PATIENCE=1 \\
        pytest tests/test_operator_e2e.py

The kubelet stand-in serves one namespace (`--namespace`, default e2e) and ignores images.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from kubernetes import config

from tests.harness.emulator import ServedEmulator
from tests.harness.kubelet import Kubelet


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.standalone")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--namespace", default="e2e")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kubeconfig = args.dir / "kubeconfig.tmp"
    with ServedEmulator(kubeconfig):
        api = config.new_client_from_config(str(kubeconfig))
        api.user_agent = "idpo-kubelet-stand-in"
        with Kubelet(api, args.namespace, args.dir):
            kubeconfig.rename(args.dir / "kubeconfig")  # appears only once everything serves
            stop.wait()


if __name__ == "__main__":
    main()
