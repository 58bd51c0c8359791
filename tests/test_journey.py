"""What docs/testing.md promises a newcomer, run as they would run it: `python -m tests.controlplane up`
in one terminal, then only kubectl and `idpo` against the kubeconfig it writes. The same cluster
also serves the e2e suite in its `IDPO_E2E_KUBECONFIG` mode, which any other cluster would use."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from idpo_operator.spec import DEFAULT_STAGE_IMAGE

from tests.harness.cluster import e2e_layer, kubectl_binary

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
# The e2e suite's own stage image (the Dockerfile's `e2e` target), beside the plain one a newcomer's runs get.
E2E_IMAGE = "localhost/idpo-jobs-e2e:dev"


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("journey") / "kubeconfig"
    images = ["--image", DEFAULT_STAGE_IMAGE, "--image", f"{E2E_IMAGE}={e2e_layer()}"]
    up = subprocess.Popen(
        [sys.executable, "-m", "tests.controlplane", "up", "--kubeconfig", str(path), *images],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert up.poll() is None, f"`up` exited: {up.stdout.read() if up.stdout else ''}"
            assert time.monotonic() < deadline, "`up` wrote no kubeconfig in time"
            time.sleep(0.2)
        yield path
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C: `up` stops what it started
        assert up.wait(60) == 0
    server = yaml.safe_load(path.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").split(":")
    with pytest.raises(ConnectionRefusedError):  # the apiserver went with it
        socket.create_connection((host, int(port)), timeout=5)


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_five_minute_journey_ends_with_a_succeeded_run(kubeconfig: Path, tmp_path: Path) -> None:
    assert kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds")).returncode == 0
    deadline = time.monotonic() + 60  # `kubectl wait` errs while the new CRD has no conditions: retry it
    while (established := kubectl(kubeconfig, "wait", "--for=condition=Established", "crd", "--all")).returncode:
        assert time.monotonic() < deadline, established.stderr
        time.sleep(0.5)
    log = (tmp_path / "operator.log").open("w")
    operator = subprocess.Popen(
        [sys.executable, "-m", "idpo_operator", "operator", "-A"],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        applied = kubectl(kubeconfig, "apply", "-f", str(ROOT / "examples" / "tiny.yaml"))
        assert applied.returncode == 0, applied.stderr
        deadline = time.monotonic() + 900
        phase = ""
        while phase not in ("Succeeded", "Failed"):
            assert time.monotonic() < deadline, (tmp_path / "operator.log").read_text()[-3000:]
            time.sleep(2)
            phase = kubectl(kubeconfig, "get", "idpo", "tiny", "-o", "jsonpath={.status.phase}").stdout
        row = kubectl(kubeconfig, "get", "idpo", "tiny").stdout.splitlines()[-1].split()
        assert row[:3] == ["tiny", "Succeeded", "2/2"] and row[-2] == "True", row  # ... WinRate, Ready, Age
        assert 0 <= float(row[3]) <= 1  # iteration 2's length-controlled win rate against the base
    finally:
        os.killpg(operator.pid, signal.SIGTERM)
        operator.wait(30)


def manifests() -> list[Path]:
    """Every YAML manifest a user may copy: examples/, crds/, and the yaml blocks of docs/."""
    return sorted([*(ROOT / "examples").glob("*.yaml"), *(ROOT / "crds").glob("*.yaml"), *(ROOT / "docs").glob("*.md")])


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_in_examples_and_docs_passes_server_side_validation(
    kubeconfig: Path, path: Path, tmp_path: Path
) -> None:
    assert kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds")).returncode == 0
    text = path.read_text()
    if path.suffix == ".md":
        blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
        docs = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and "kind" in d]
        # Other projects' kinds (a KServe InferenceService in the serving hand-off) need their CRDs.
        docs = [d for d in docs if d["apiVersion"].split("/")[0] in ("v1", "idpo.dev", "batch", "apps")]
        if not docs:
            return
        text = yaml.safe_dump_all(docs)
    target = tmp_path / "manifest.yaml"
    target.write_text(text)
    checked = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", str(target))
    assert checked.returncode == 0, checked.stderr


def test_the_e2e_suite_runs_on_a_cluster_it_knows_only_by_kubeconfig(kubeconfig: Path, tmp_path: Path) -> None:
    inner = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-qp", "no:cacheprovider", f"--basetemp={tmp_path}/inner"),
            *("tests/test_operator_e2e.py", "-k", "retried_and_counted or refused_by_the_crd"),
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "IDPO_E2E_KUBECONFIG": str(kubeconfig),
            "IDPO_E2E_IMAGE": E2E_IMAGE,  # the e2e image the local node agent has
            "IDPO_E2E_PATIENCE": "1",
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert inner.returncode == 0, inner.stdout[-4000:] + inner.stderr[-2000:]
    ran = re.search(r"(\d+) passed", inner.stdout)
    assert ran and int(ran.group(1)) >= 4 and "skipped" not in inner.stdout, inner.stdout[-2000:]
