"""Where a model or data field points, as a stage process sees it.

A field names a Hugging Face id, a local path, `pvc://<path>` on the run's volume (or KServe's
`pvc://<claim>/<path>`), or `tiny://<name>`, the tiny models built on the volume on first use.
Kept out of `config` (the bottom module), because resolving `tiny://` builds models.
"""

from __future__ import annotations

import os

from idpo_jobs.config import PVC_CLAIM_ENV, PVC_SCHEME, TINY_DIR, TINY_SCHEME, volume_root


def resolve_uri(uri: str) -> str:
    """`pvc://a/b` -> `<volume>/a/b`; `tiny://x` -> the tiny models on the volume, built there on
    first use (seconds); anything else (HF id, local path) is returned unchanged."""
    if uri.startswith(PVC_SCHEME):
        path = uri[len(PVC_SCHEME) :].lstrip("/")
        claim = os.environ.get(PVC_CLAIM_ENV)
        if claim and path.startswith(f"{claim}/"):
            path = path[len(claim) + 1 :]
        return str(volume_root() / path)
    if uri.startswith(TINY_SCHEME):
        from idpo_jobs.tiny import ensure_tiny

        return str(ensure_tiny(volume_root() / TINY_DIR) / uri[len(TINY_SCHEME) :])
    return uri
