"""Durable writes on the claim: what a kill, a lost node or an object-store volume cannot half-do.

A rename is atomic on a POSIX filesystem, but it is not durable until its directory is fsynced, and the
files it moves may still sit in the page cache of a node that is about to be lost. On an object-store
FUSE volume (gcsfuse, s3fs, blobfuse) a directory rename is a copy and a delete: for a while the new
name exists and is not whole. So a directory is published in four steps, and only the last makes it
complete:

1. every file and directory inside it is fsynced;
2. it is renamed into place, and the parent directory is fsynced;
3. its marker (`_SUCCESS.json`) is written into it last: a temporary file, fsynced, renamed, and the
   directory fsynced again;
4. readers (`read_marker`) treat a directory without a readable marker as absent.

Stage outputs (`contract.run_stage`), train checkpoints and generate/rank chunks (`resume`) all go
through `publish`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from idpo_jobs.config import SUCCESS_FILE

# A directory fsync that the filesystem does not support (some FUSE and network filesystems answer
# EINVAL): the rename is as durable as that filesystem makes it, and nothing better is possible.
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}
# How long a publisher that lost the rename to a twin waits for the twin's marker.
TWIN_WAIT_S = 10.0


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of `path` (names created, renamed or removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first, `root` last."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(top) / name
            if not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(top))
        del dirs  # the walk is bottom-up: they are synced already


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole or not at all, durably."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_marker(directory: Path, content: dict[str, Any]) -> None:
    """The marker that makes `directory` complete; written last."""
    write_atomic(directory / SUCCESS_FILE, json.dumps(content, indent=2, default=str))


def read_marker(directory: Path) -> dict[str, Any] | None:
    """`directory`'s marker, or None: missing, or not (yet) whole JSON, means incomplete."""
    try:
        content = json.loads((directory / SUCCESS_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return content if isinstance(content, dict) else None


def publish(tmp: Path, final: Path, marker: dict[str, Any], twin_wait_s: float = TWIN_WAIT_S) -> bool:
    """Move the finished directory `tmp` to `final` and mark it complete; False when a twin published
    `final` first (then `tmp` is left for the caller to remove, and the twin's marker stands).

    A `final` that exists without a marker after `twin_wait_s` is refused with a TimeoutError (transient:
    the next attempt removes it as a leftover)."""
    fsync_tree(tmp)
    try:
        os.rename(tmp, final)  # onto an empty directory it succeeds, onto a non-empty one it fails
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
            raise
        deadline = time.monotonic() + twin_wait_s
        while read_marker(final) is None:
            if time.monotonic() >= deadline:
                died = "an attempt died while publishing it"
                raise TimeoutError(f"{final} exists without {SUCCESS_FILE}: {died}") from None
            time.sleep(0.1)
        return False
    fsync_dir(final.parent)
    write_marker(final, marker)
    return True


def remove(path: Path) -> None:
    """Delete a directory tree (or a file) if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
