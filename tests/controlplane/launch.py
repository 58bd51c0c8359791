"""Starts one container process the way a container runtime would, as far as a process can.

    python launch.py PLAN.json      # run by the node agent, as root

In a mount and UTS namespace of its own it sets the pod's hostname, bind-mounts each volume (and
the pod's /etc/hosts and termination-message file) at its mountPath, gives /dev/shm a private
64 MiB tmpfs unless a volume is mounted there, makes the root filesystem read-only when the
container asks for it, drops to the pod's uid, gid and groups, and execs the command. Only the
standard library: it must run before anything else is importable.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
EXIT_START_ERROR = 128  # what a runtime reports for a container that could not start

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [s.encode() if s is not None else None for s in (source, target, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def mount_point(target: str, is_file: bool) -> None:
    """Create what a bind mount needs at `target` (on the host's root: an empty dir or file)."""
    if is_file:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)


def expose_image(mounts: list[dict], sources: dict[str, str]) -> None:
    """Bind the image's paths (interpreter, virtualenv, checkout) in place, read-only."""
    for m in mounts:
        os.makedirs(m["target"], exist_ok=True)
        mount(sources[m["source"]], m["target"], None, MS_BIND | MS_REC)
        mount(None, m["target"], None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    start_error = open(plan["startError"], "w")  # noqa: SIM115 -- held open: the root may be read-only by exec time
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below leaks to the host
    socket.sethostname(plan["hostname"])
    # Every source is held open first: a mount over /tmp (an emptyDir) must not hide the
    # volumes' own folders, which may live below it.
    sources = {m["source"]: f"/proc/self/fd/{os.open(m['source'], os.O_PATH)}" for m in plan["mounts"]}
    image = [m for m in plan["mounts"] if "mask" in m]
    mounts = sorted((m for m in plan["mounts"] if "mask" not in m), key=lambda m: m["target"].rstrip("/").count("/"))
    masks = sorted({m["mask"] for m in image if m["mask"]})
    for mask in masks:  # a directory the pod's user may not enter: an empty one in its place
        mount("image", mask, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    for m in mounts:
        mount_point(m["target"], os.path.isfile(sources[m["source"]]))
        mount(sources[m["source"]], m["target"], None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount(None, m["target"], None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    expose_image(image, sources)  # last: no volume hides them
    if not any(m["target"] == "/dev/shm" for m in mounts):
        mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    if plan.get("readOnlyRoot"):
        for mask in masks:
            mount(None, mask, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    os.setgroups(plan["groups"])
    os.setgid(plan["gid"])
    os.setuid(plan["uid"])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it: dies with the agent
    os.umask(0o022)
    try:
        os.chdir(plan["workingDir"])
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except OSError as err:  # the agent reports this as the container's StartError
        start_error.write(f"failed to start container: exec {plan['argv'][0]!r}: {err.strerror}")
        start_error.close()
        sys.exit(EXIT_START_ERROR)


if __name__ == "__main__":
    main(sys.argv[1])
