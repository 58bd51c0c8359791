"""Runs a command with folders mounted at fixed paths, as a pod's Secret volumes would be.

    python -m tests.controlplane.secretmount --scratch DIR SOURCE:TARGET [...] -- COMMAND [ARG ...]

Kueue's manager reads its metrics serving certificate from a fixed path (/etc/kueue/metrics/certs)
whenever its internal certificate management is off, metrics served or not; in a cluster that path
is a Secret volume. Here, in a mount namespace of its own (nothing leaks to the host), each SOURCE
is bind-mounted read-only at TARGET. A TARGET whose folders do not exist is made on a private
overlay of its nearest existing ancestor (the overlay's writes go to a tmpfs on DIR), with the mounts
below that ancestor bound back in place. Then it execs COMMAND: the same pid, so the caller's process
handling (process group, parent-death signal) holds. Needs root, as the node agent does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.controlplane.launch import (
    CLONE_NEWNS,
    MS_BIND,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    _check,
    libc,
    mount,
)

O_PATH = 0o10000000


def submounts(folder: Path) -> list[Path]:
    """The outermost mount points strictly below `folder`, from this process's mount table."""
    points: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        point = Path(raw.encode().decode("unicode_escape"))  # spaces and tabs come octal-escaped
        if point != folder and point.is_relative_to(folder):
            points.append(point)
    return [p for p in points if not any(p != q and p.is_relative_to(q) for q in points)]


def overlay(folder: Path, scratch: Path) -> None:
    """Make `folder` writable here and only here: an overlay whose writes go to a tmpfs."""
    kept = {point: os.open(point, O_PATH) for point in submounts(folder)}  # held: the overlay hides them
    mount("scratch", str(scratch), "tmpfs", 0, "mode=700")
    upper, work = scratch / "upper", scratch / "work"
    upper.mkdir()
    work.mkdir()
    mount("overlay", str(folder), "overlay", 0, f"lowerdir={folder},upperdir={upper},workdir={work}")
    for point, fd in kept.items():
        mount(f"/proc/self/fd/{fd}", str(point), None, MS_BIND | MS_REC)
        os.close(fd)


def main(argv: list[str]) -> None:
    if "--" not in argv or argv[:1] != ["--scratch"]:
        sys.exit(__doc__)
    split = argv.index("--")
    scratch, binds, command = Path(argv[1]), argv[2:split], argv[split + 1 :]
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for n, bind in enumerate(binds):
        source, target = (Path(part) for part in bind.split(":", 1))
        if not target.is_dir():
            existing = next(p for p in target.parents if p.is_dir())
            (scratch / str(n)).mkdir(parents=True, exist_ok=True)
            overlay(existing, scratch / str(n))
            target.mkdir(parents=True)
        mount(str(source), str(target), None, MS_BIND)
        mount(None, str(target), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
