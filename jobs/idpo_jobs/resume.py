"""Resume inside a stage (DESIGN §9): what a killed attempt finished, kept for the next attempt.

A retry, an eviction, a preemption or a lost node restarts a stage's pod from its command. Without
this, every restart starts from zero. Each part keeps its resumable work in its work directory on the
claim (`contract.work_dir`: `iter-1/.train.work/`, `iter-1/generate/.part-00003.work/`), which survives
attempts, is never read as output and is removed once the part is published:

- `Chunks`: generate and rank write each finished chunk of their prompts as `chunk-<k>/`; a restarted
  shard reads the finished ones instead of computing them again;
- `Checkpoints`: train saves resumable Trainer checkpoints (weights, optimizer, scheduler, RNG states,
  the step, hence the data position) as `checkpoint-<step>/`; a restarted stage resumes from the newest.

Both are published like stage outputs (`durable.publish`): a piece without its `_SUCCESS.json` is
absent, and is removed. Each piece records the `identity` of the work it belongs to (the config that
decides its content and its inputs' fingerprints): after a spec fix or a rebuilt input, an attempt starts
afresh instead of mixing old pieces into new work.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from idpo_jobs import contract, data, durable
from idpo_jobs.config import StageConfig

T = TypeVar("T")
CHUNK_ROWS = "rows.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's own name for `checkpoint-<step>`
STAGING = ".staging"  # the Trainer's output_dir: it writes `checkpoint-<step>` there, not in place
# Complete checkpoints kept: the newest only. A new one is written beside it and the old one removed once
# the new one is complete, so at most two are on the claim at any time (a 7B full-parameter checkpoint with
# its AdamW moments is ~90 GB).
KEEP_CHECKPOINTS = 1
# Fields that do not change what the work computes: where the summary goes, the digests the inputs'
# fingerprints cover, pod resources, how often to checkpoint.
_NOT_IDENTITY = {"terminationLog", "inputDigests", "resources", "checkpointEverySteps", "checkpointEveryMinutes"}


def identity(config: StageConfig, inputs: dict[str, str], **extra: Any) -> str:
    """What a piece of resumable work belongs to: the stage's config (less `_NOT_IDENTITY`), the
    fingerprints of its inputs, and `extra` (e.g. the training world size)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _NOT_IDENTITY}
        return value

    wire = {
        "config": strip(config.to_wire()),
        "inputs": {name: contract.fingerprint(path) for name, path in sorted(inputs.items())},
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(wire, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clear_temps(work: Path) -> None:
    for path in work.glob(".*.tmp-*"):
        durable.remove(path)


# ---------------------------------------------------------------------------------------------
# Generate and rank: finished chunks of a shard's prompts
# ---------------------------------------------------------------------------------------------
def chunk_size(prompts: int, batch: int) -> int:
    """`prompts` rounded up to a multiple of `batch`: a chunk never splits a batch, so chunked work
    batches (and, for the transformers engine, seeds) exactly as unchunked work would."""
    return -(-prompts // batch) * batch


@dataclass
class Chunked:
    """A shard's rows, chunk by chunk in order, and how many of its items came from finished chunks."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0


ChunkCompute = Callable[[int, list[T]], tuple[list[dict[str, Any]], dict[str, Any]]]


def chunked(work: Path, ident: str, items: Sequence[T], size: int, compute: ChunkCompute[T]) -> Chunked:
    """`compute(start, items[start:start + size])` for every chunk not finished by an earlier attempt.

    `compute` returns the chunk's rows and a small dict of its own counts (e.g. ties); each chunk is
    published as `work/chunk-<k>/` (rows and counts) as soon as it is done. `work` is made for the first
    chunk done: an attempt that fails before (bad input) leaves nothing."""
    _clear_temps(work)
    out = Chunked()
    bounds = [(start, min(start + size, len(items))) for start in range(0, len(items), size)]
    for k, (start, stop) in enumerate(bounds):
        final = work / f"chunk-{k:05d}"
        marker = durable.read_marker(final)
        expected = {"identity": ident, "start": start, "stop": stop}
        if marker is not None and {key: marker.get(key) for key in expected} == expected:
            out.rows.extend(data.read_jsonl(final / CHUNK_ROWS))
            out.extras.append(marker.get("extra", {}))
            out.resumed += stop - start
            continue
        durable.remove(final)  # incomplete, or of other work
        rows, extra = compute(start, list(items[start:stop]))
        work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=work))
        try:
            data.write_jsonl(tmp / CHUNK_ROWS, rows)
            if not durable.publish(tmp, final, {**expected, "rows": len(rows), "extra": extra}):
                rows = data.read_jsonl(final / CHUNK_ROWS)  # a twin's, identical by construction
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"idpo-chunk {k + 1}/{len(bounds)}: items {start}..{stop - 1} written", flush=True)
        out.rows.extend(rows)
        out.extras.append(extra)
    if out.resumed:
        print(f"resumed: {out.resumed} of {len(items)} items were in finished chunks of an earlier attempt", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Train: resumable Trainer checkpoints
# ---------------------------------------------------------------------------------------------
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    marker: dict[str, Any]


class Checkpoints:
    """The train stage's checkpoints in its work directory, as the rank-0 process manages them.

    The Trainer writes `checkpoint-<step>` into `staging` (every rank writes its part: RNG states, and
    under FSDP its shards); `publish` moves it into the work directory and marks it complete.
    """

    def __init__(self, work: Path, ident: str) -> None:
        self.work = work
        self.identity = ident
        self.staging = work / STAGING

    def complete(self) -> list[Checkpoint]:
        """The complete checkpoints of this work, oldest first."""
        found = []
        for path in self.work.glob(f"{CHECKPOINT_PREFIX}*"):
            match = _STEP.match(path.name)
            marker = durable.read_marker(path) if match else None
            if marker is not None and marker.get("identity") == self.identity:
                found.append(Checkpoint(int(match.group(1)), path, marker))  # type: ignore[union-attr]
        return sorted(found, key=lambda c: c.step)

    def prepare(self) -> Checkpoint | None:
        """Remove what cannot be resumed from (the staging area of a killed save, a checkpoint without its
        marker, one of other work) and return the newest complete checkpoint, if any."""
        if not self.work.is_dir():
            return None
        keep = {c.path for c in self.complete()}
        for path in self.work.iterdir():
            if path not in keep:
                print(f"removing {path}: not a complete checkpoint of this work", flush=True)
                durable.remove(path)
        newest = self.complete()
        return newest[-1] if newest else None

    def publish(self, step: int, max_steps: int, started: float) -> Checkpoint:
        """Mark the Trainer's `staging/checkpoint-<step>` complete as `work/checkpoint-<step>`, then drop
        older ones beyond KEEP_CHECKPOINTS."""
        name = f"{CHECKPOINT_PREFIX}{step}"
        staged, final = self.staging / name, self.work / name
        marker = {"identity": self.identity, "step": step, "max_steps": max_steps, "bytes": durable.tree_bytes(staged)}
        durable.publish(staged, final, {**marker, "seconds": round(time.perf_counter() - started, 3)})
        for old in self.complete()[:-KEEP_CHECKPOINTS]:
            durable.remove(old.path)
        return Checkpoint(step, final, durable.read_marker(final) or marker)
