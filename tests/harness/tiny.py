"""The tiny models, built once per machine for every worker and plane of a parallel run."""

from __future__ import annotations

import fcntl
from pathlib import Path


def tiny_models() -> Path:
    """`idpo run`'s versioned cache of the tiny models (idpo_jobs.tiny): the first caller builds them under a
    lock, the others (other workers) wait and read them."""
    from idpo_jobs.tiny import ensure_tiny, tiny_cache

    root = tiny_cache()
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f".{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_tiny(root)
