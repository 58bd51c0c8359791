"""The embedded default: `idpo run MANIFEST` executes the plan on this machine.

Each stage runs as subprocesses of the same CLIs the Jobs run (one per shard, with
`JOB_COMPLETION_INDEX`), the workspace is a local directory, and `status.json` has the shape of
the custom resource's status. Completion is read from the workspace (`_SUCCESS.json`), so a rerun
resumes where the last one stopped. A failed stage is not retried locally: fix and rerun.

`tiny://` URIs (`tiny://policy`, `tiny://pairrm`, `tiny://prompts.jsonl`) name the tiny models,
built into `<workdir>/tiny` on first use, so the demo needs no download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from idpo_jobs import contract
from idpo_jobs.config import TINY_SCHEME, Stage, Workspace
from idpo_jobs.tiny import ensure_tiny
from tqdm import tqdm

from idpo_operator import plan
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec, Manifest
from idpo_operator.status import Phase, StageRecord, build_status, record_from_summaries, stage_status, timestamp

STATUS_FILE = "status.json"


def resolve_tiny(spec: IterativeDPORunSpec, cache: Path) -> IterativeDPORunSpec:
    """Replace `tiny://name` URIs by paths under `cache`, building the tiny models if needed."""
    uris = [spec.model.name, spec.prompts.source, spec.ranking.model or ""]
    if not any(u.startswith(TINY_SCHEME) for u in uris):
        return spec
    if not (cache / "_SUCCESS").exists():
        print(f"building tiny models in {cache} (first use)", file=sys.stderr)
    ensure_tiny(cache)

    def local(uri: str | None) -> str | None:
        return str(cache / uri[len(TINY_SCHEME) :]) if uri and uri.startswith(TINY_SCHEME) else uri

    data = spec.model_dump()
    data["model"]["name"] = local(spec.model.name)
    data["prompts"]["source"] = local(spec.prompts.source)
    data["ranking"]["model"] = local(spec.ranking.model)
    return IterativeDPORunSpec.model_validate(data)


class LocalRunner:
    def __init__(self, manifest: Manifest, workdir: Path, out: TextIO = sys.stderr) -> None:
        self.name = manifest.metadata.name
        self.workdir = workdir.resolve()
        self.spec = resolve_tiny(manifest.spec, self.workdir / "tiny")
        self.workspace = Workspace(self.workdir / "workspace")
        self.out = out
        self.previous = self._load_status()
        self.records: dict[StageKey, StageRecord] = {}

    # -- observation -----------------------------------------------------------------------
    def _load_status(self) -> dict[str, Any]:
        try:
            return json.loads((self.workdir / STATUS_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _previous_attempts(self, key: StageKey) -> int:
        return stage_status(self.previous, key).get("attempts", 0)

    def _shards(self, key: StageKey) -> int:
        return plan.stage_config(self.spec, self.name, self.workspace, key).shards

    def observe(self) -> list[StageKey]:
        """Completed stages, from the workspace; fills their records."""
        done = []
        for key in plan.all_stages(self.spec):
            summaries = contract.completed_parts(
                self.workspace.stage_dir(key.iteration, key.stage), self._shards(key), key.stage
            )
            if summaries is not None:
                record = record_from_summaries(key.stage, summaries, self._previous_attempts(key))
                stage_dir = self.workspace.stage_dir(key.iteration, key.stage)
                parts = contract.stage_parts(stage_dir, self._shards(key), key.stage)
                record.digests = [contract.part_digest(d) for d in parts]
                self.records[key] = record
                done.append(key)
        return done

    def early_stop(self) -> tuple[int, str] | None:
        evaluations = {k.iteration: r.metrics for k, r in self.records.items() if k.stage is Stage.EVALUATE}
        return plan.early_stop(self.spec, evaluations)

    def write_status(self) -> dict[str, Any]:
        stop = self.early_stop()
        spec = plan.truncated(self.spec, stop)
        status = build_status(spec, self.records, self.workspace, previous=self.previous, early_stop=stop)
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self.workdir / STATUS_FILE)
        self.previous = status
        return status

    # -- execution -------------------------------------------------------------------------
    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while (key := plan.next_stage(self.spec, self.observe())) is not None:
            if (stop := self.early_stop()) is not None and key.iteration > stop[0]:
                break  # evaluation.stopWhen: no further iteration
            if self.spec.suspend:
                self.write_status()
                print("run is suspended (spec.suspend: true); no stage started", file=self.out)
                return 0
            if not self.run_stage(key):
                status = self.write_status()
                print(f"\nrun failed: {status['message']}", file=self.out)
                return 1
        status = self.write_status()
        print(f"run {self.name} succeeded; final checkpoint: {status.get('latestCheckpoint')}", file=self.out)
        return 0

    def run_stage(self, key: StageKey) -> bool:
        source = plan.input_of(key)
        digests = self.records[source].digests if source in self.records else None
        config = plan.stage_config(self.spec, self.name, self.workspace, key, input_digests=digests)
        config_path = self.workdir / "configs" / f"iter-{key.iteration}-{key.stage.value}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config.dump(config_path)
        contract.remove_stale_temps(config.stage_dir.parent)  # left by a killed earlier attempt
        record = StageRecord(phase=Phase.RUNNING, attempts=self._previous_attempts(key) + 1, start_time=timestamp())
        self.records[key] = record
        self.write_status()

        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        bar = tqdm(
            total=0,
            desc=f"iter {key.iteration}/{self.spec.iterations} {key.stage.value:<8}",
            file=self.out,
            leave=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}]",
        )
        progress: dict[int, tuple[int, int]] = {}
        shards = [_Shard(key, k, config_path, logs, bar, progress) for k in range(config.shards)]
        codes = [s.wait() for s in shards]
        bar.close()

        failed = [s for s, code in zip(shards, codes, strict=True) if code != 0]
        if failed:
            record.phase = Phase.FAILED
            record.completion_time = timestamp()
            record.message = failed[0].failure()
            return False
        return True


class _Shard:
    """One stage process: its log file, its progress lines fed into the stage's bar."""

    def __init__(
        self,
        key: StageKey,
        shard: int,
        config_path: Path,
        logs: Path,
        bar: tqdm,
        progress: dict[int, tuple[int, int]],
    ) -> None:
        stem = f"iter-{key.iteration}-{key.stage.value}-{shard}"
        self.log_path = logs / f"{stem}.log"
        self.termination = logs / f"{stem}.termination.json"
        self.termination.unlink(missing_ok=True)
        env = {
            **os.environ,
            "JOB_COMPLETION_INDEX": str(shard),
            "IDPO_TERMINATION_LOG": str(self.termination),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.tail: deque[str] = deque(maxlen=15)
        self.shard, self.bar, self.progress = shard, bar, progress
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"idpo_jobs.{key.stage.value}", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("a", buffering=1) as log:  # line-buffered: readable live, kept on kill
            log.write(f"--- {timestamp()} start\n")
            for line in self.proc.stdout:
                log.write(line)
                if line.startswith(contract.PROGRESS_PREFIX):
                    _, done, total = line.split()
                    self.progress[self.shard] = (int(done), int(total))
                    self.bar.total = sum(t for _, t in self.progress.values())
                    self.bar.n = sum(d for d, _ in self.progress.values())
                    self.bar.refresh()
                elif line.strip():
                    self.tail.append(line.rstrip())

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        return code

    def failure(self) -> str:
        errors = [line for line in self.tail if line.startswith("error:")]
        detail = errors[-1].removeprefix("error: ") if errors else (self.tail[-1] if self.tail else "no output")
        return f"exit {self.proc.returncode}: {detail} (log: {self.log_path})"
