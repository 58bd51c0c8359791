"""The control plane's binaries, built from the pinned Go modules into a cache keyed by version.

`go.mod` here pins `k8s.io/kubernetes` (its staging modules replaced by their published `v0.x`
releases) and, through it, etcd's server module. `build()` compiles whatever the cache lacks and
returns the folder; a warm cache costs nothing. kubectl comes from the same modules, so its minor
version always matches the apiserver's.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

MODULE = Path(__file__).parent
# Binary name -> Go package, in this module's graph (see the `tool` block of go.mod).
PACKAGES = {
    "etcd": "./cmd/etcd",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
}


def kubernetes_version() -> str:
    found = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes (v\S+)", (MODULE / "go.mod").read_text(), re.MULTILINE)
    if not found:
        raise RuntimeError(f"{MODULE / 'go.mod'} does not require k8s.io/kubernetes")
    return found.group(1)


def cache_dir() -> Path:
    """`$IDPO_KUBE_CACHE` or ~/.cache/idpo/kube, then `<version>-<hash of the module files>`."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "cmd/etcd/main.go"):
        digest.update((MODULE / name).read_bytes())
    base = Path(os.environ.get("IDPO_KUBE_CACHE") or Path.home() / ".cache" / "idpo" / "kube")
    return base / f"{kubernetes_version()}-{digest.hexdigest()[:10]}"


def _ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    stamp = "k8s.io/component-base/version"
    return " ".join(
        [
            "-s -w",  # no debug info: smaller binaries, faster links
            f"-X {stamp}.gitVersion={version}",
            f"-X {stamp}.gitMajor={major}",
            f"-X {stamp}.gitMinor={minor}",
            f"-X {stamp}.gitTreeState=clean",
        ]
    )


def build(log: bool = True) -> Path:
    """Build the binaries the cache lacks (minutes, once per machine); return the cache folder."""
    target = cache_dir()
    missing = [name for name in PACKAGES if not (target / name).is_file()]
    if not missing:
        return target
    if shutil.which("go") is None:
        raise RuntimeError("building the control plane needs Go (1.26 or newer) on PATH")
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if log:
        print(f"building {', '.join(missing)} into {target} (a cold build takes minutes)", flush=True)
    with tempfile.TemporaryDirectory(dir=target) as staging:
        subprocess.run(
            [
                *("go", "build", "-trimpath", "-ldflags", _ldflags(kubernetes_version())),
                *("-o", staging + "/"),
                *(PACKAGES[name] for name in missing),
            ],
            cwd=MODULE,
            check=True,
        )
        for name in missing:  # rename into place: a half-built cache is never used
            os.replace(Path(staging) / name, target / name)
    if log:
        print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return target


def path(name: str) -> Path:
    """One binary of a built cache; fails with the command to run if the cache is cold."""
    binary = cache_dir() / name
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing: run `python -m tests.controlplane build`")
    return binary
