"""The control plane's binaries, built from the pinned Go modules into a cache keyed by version.

`go.mod` here pins `k8s.io/kubernetes` (its staging modules replaced by their published `v0.x`
releases) and, through it, etcd's server module. `build()` compiles whatever the cache lacks and
returns the folder; a warm cache costs nothing. kubectl comes from the same modules, so its minor
version always matches the apiserver's.

Kueue is a module of its own (`kueue/go.mod`: `sigs.k8s.io/kueue` with its own dependency graph,
which pins other `k8s.io/*` versions than Kubernetes'). `build_kueue()` compiles its manager into a
cache folder of its own and copies beside it the manifests a start reads (CRDs, webhooks, RBAC),
so a start needs no Go tooling.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


KUEUE_MODULE = MODULE / "kueue"
KUEUE_PACKAGE = "sigs.k8s.io/kueue/cmd/kueue"  # the manager: controllers, scheduler and webhooks
# Folders of Kueue's module that a start reads (see kueuesetup.py), copied into the cache as they are.
KUEUE_MANIFESTS = ("config/components/crd", "config/components/webhook", "config/components/rbac")


def _required(module: Path, path: str) -> str:
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(path)} (v\S+)", (module / "go.mod").read_text(), re.MULTILINE)
    if not found:
        raise RuntimeError(f"{module / 'go.mod'} does not require {path}")
    return found.group(1)


def kubernetes_version() -> str:
    return _required(MODULE, "k8s.io/kubernetes")


def kueue_version() -> str:
    return _required(KUEUE_MODULE, "sigs.k8s.io/kueue")


def _cache(module: Path, files: tuple[str, ...], version: str) -> Path:
    digest = hashlib.sha256()
    for name in files:
        digest.update((module / name).read_bytes())
    base = Path(os.environ.get("IDPO_KUBE_CACHE") or Path.home() / ".cache" / "idpo" / "kube")
    return base / f"{version}-{digest.hexdigest()[:10]}"


def cache_dir() -> Path:
    """`$IDPO_KUBE_CACHE` or ~/.cache/idpo/kube, then `<version>-<hash of the module files>`."""
    return _cache(MODULE, ("go.mod", "go.sum", "cmd/etcd/main.go"), kubernetes_version())


def kueue_cache_dir() -> Path:
    """Beside the Kubernetes binaries: `kueue-<version>-<hash of kueue/go.mod and go.sum>`."""
    return _cache(KUEUE_MODULE, ("go.mod", "go.sum"), f"kueue-{kueue_version()}")


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


@contextmanager
def _building(target: Path) -> Iterator[None]:
    """One build of a cache folder at a time on this machine: a parallel test run's workers (or two
    checkouts) that find it cold wait for the first one's build instead of building it again."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(log: bool = True) -> Path:
    """Build the binaries the cache lacks (minutes, once per machine); return the cache folder."""
    target = cache_dir()
    if all((target / name).is_file() for name in PACKAGES):
        return target
    with _building(target):
        return _build(target, log)


def _build(target: Path, log: bool) -> Path:
    missing = [name for name in PACKAGES if not (target / name).is_file()]
    if not missing:
        return target  # built meanwhile, by whoever held the lock
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


def _copy_files(source: Path, target: Path) -> None:
    """The files of `source`, without the module cache's read-only modes."""
    for file in sorted(source.rglob("*")):
        if file.is_file():
            (target / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target / file.relative_to(source))


def build_kueue(log: bool = True) -> Path:
    """Build Kueue's manager and copy its manifests if the cache lacks them (minutes, once per
    machine); return the folder: `kueue` and `config/components/{crd,webhook,rbac}/`."""
    target = kueue_cache_dir()
    if _kueue_built(target):
        return target
    with _building(target):
        return _build_kueue(target, log)


def _kueue_built(target: Path) -> bool:
    return (target / "kueue").is_file() and all((target / folder).is_dir() for folder in KUEUE_MANIFESTS)


def _build_kueue(target: Path, log: bool) -> Path:
    if _kueue_built(target):
        return target  # built meanwhile, by whoever held the lock
    if shutil.which("go") is None:
        raise RuntimeError("building Kueue needs Go (1.26 or newer) on PATH")
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if log:  # on stderr: `$(python -m tests.controlplane build)` is the Kubernetes folder alone
        print(f"building Kueue {kueue_version()} into {target} (cold: minutes)", file=sys.stderr, flush=True)
    ldflags = f"-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion={kueue_version()}"  # what its log reports
    with tempfile.TemporaryDirectory(dir=target) as staging:
        subprocess.run(
            ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", staging + "/", KUEUE_PACKAGE],
            cwd=KUEUE_MODULE,
            check=True,
        )
        source = subprocess.run(
            ["go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kueue"],
            cwd=KUEUE_MODULE,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for folder in KUEUE_MANIFESTS:
            _copy_files(Path(source) / folder, Path(staging) / folder)
        for folder in KUEUE_MANIFESTS:  # moved into place whole: a half-built cache is never used
            shutil.rmtree(target / folder, ignore_errors=True)
            (target / folder).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(staging) / folder, target / folder)
        os.replace(Path(staging) / "kueue", target / "kueue")
    if log:
        print(f"built Kueue in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return target


def path(name: str) -> Path:
    """One binary of a built cache; fails with the command to run if the cache is cold."""
    binary = cache_dir() / name
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing: run `python -m tests.controlplane build`")
    return binary
