"""The e2e suite's real-cluster path (`IDPO_E2E_KUBECONFIG`), kept working without a real cluster:
a nested pytest runs two e2e stories against the emulated cluster served on its own, so the suite
sees only a kubeconfig, as it would with a real one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_the_e2e_suite_runs_against_a_cluster_it_knows_only_by_kubeconfig(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    served = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.standalone", str(tmp_path / "cluster")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        kubeconfig = tmp_path / "cluster" / "kubeconfig"
        deadline = time.monotonic() + 60
        while not kubeconfig.exists():
            assert served.poll() is None and time.monotonic() < deadline, "the standalone cluster did not start"
            time.sleep(0.2)
        stories = ["tests/test_operator_e2e.py", "-k", "goes_through_every_stage or the_crd_let_through"]
        inner = subprocess.run(
            [sys.executable, "-m", "pytest", "-qp", "no:cacheprovider", f"--basetemp={tmp_path}/inner", *stories],
            cwd=ROOT,
            env={
                **env,
                "IDPO_E2E_KUBECONFIG": str(kubeconfig),
                "IDPO_E2E_IMAGE": "registry.example/idpo-jobs:e2e",
                "IDPO_E2E_NAMESPACE": "e2e",
                "IDPO_E2E_PATIENCE": "1",
            },
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        served.terminate()
        served.wait(30)
    assert inner.returncode == 0, inner.stdout[-4000:] + inner.stderr[-2000:]
    assert "2 passed" in inner.stdout
