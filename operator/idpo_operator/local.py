"""The embedded default: `idpo run MANIFEST` executes the plan on this machine.

Each stage runs as subprocesses of the same command a Job runs (`resources.stage_command`; one per
shard, with `JOB_COMPLETION_INDEX`; train through the torchrun launcher with the same `PET_*`
variables, so `training.distributed.processesPerNode: 2` trains on two local processes), the
workspace is a local directory, and `status.json` has the shape of the custom resource's status. What
runs next is `rules.next_step`'s answer, as for the operator. Completion is read from the workspace
(`_SUCCESS.json`), so a rerun resumes where the last one stopped. A failed stage is not retried
within a run: fix and rerun.

`tiny://` URIs (`tiny://policy`, `tiny://pairrm`, `tiny://prompts.jsonl`) name the tiny models,
built into `<workdir>/tiny` on first use, so the demo needs no download.
"""

from __future__ import annotations

import json
import os
import socket
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

from idpo_operator import plan, resources, rules
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec, Manifest
from idpo_operator.status import Phase, StageRecord, build_status, parse_previous, record_from_summaries, timestamp

STATUS_FILE = "status.json"


def resolve_tiny(spec: IterativeDPORunSpec, cache: Path) -> IterativeDPORunSpec:
    """Replace `tiny://name` URIs by paths under `cache`, building the tiny models if needed."""
    uris = [spec.model.name, spec.prompts.source, spec.ranking.model or ""]
    uris += [a.model or "" for a in spec.ranking.axes or []]
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
    for axis in data["ranking"]["axes"] or []:
        axis["model"] = local(axis["model"])
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
        return parse_previous(self.previous).records.get(key, StageRecord(attempts=0)).attempts

    def _shards(self, key: StageKey) -> int:
        return plan.stage_config(self.spec, self.name, self.workspace, key).shards

    def observe(self) -> dict[StageKey, StageRecord]:
        """The records of the completed stages (from the workspace) and of a stage that failed."""
        failed = {k: r for k, r in self.records.items() if r.phase == Phase.FAILED}
        self.records = {}
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
        self.records |= failed
        return self.records

    def write_status(self) -> dict[str, Any]:
        step = rules.next_step(self.spec, self.records)
        previous = parse_previous(self.previous)
        status = build_status(step.spec, self.records, self.workspace, previous=previous, early_stop=step.early_stop)
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self.workdir / STATUS_FILE)
        self.previous = status
        return status

    # -- execution -------------------------------------------------------------------------
    def heldout_problem(self) -> str | None:
        """Why evaluation cannot have a held-out set from the run's prompts: checked on the data before any
        stage runs (a cluster run learns it from its first stage, the base model's evaluation)."""
        if not self.spec.evaluation.enabled:
            return None
        from idpo_jobs import evaluate

        config = plan.stage_config(self.spec, self.name, self.workspace, StageKey(plan.BASE, Stage.EVALUATE))
        try:
            evaluate.heldout_prompts(config)  # type: ignore[arg-type]
        except contract.StageError as err:
            return str(err)
        return None

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if problem := self.heldout_problem():
            print(f"run refused: {problem}", file=self.out)
            return 2
        while (step := rules.next_step(self.spec, self.observe())).start is not None:
            self.run_stage(step.start)
        status = self.write_status()
        if step.stop is rules.Stop.SUSPENDED:
            print("run is suspended (spec.suspend: true); no stage started", file=self.out)
        elif step.stop is rules.Stop.FAILED:
            print(f"\nrun failed: {status['message']}", file=self.out)
            return 1
        else:
            print(f"run {self.name} succeeded; final checkpoint: {status.get('latestCheckpoint')}", file=self.out)
        return 0

    def run_stage(self, key: StageKey) -> None:
        """Run one stage to its end; a failure is recorded for `rules.next_step` to stop on."""
        source = plan.input_of(key)
        digests = self.records[source].digests if source in self.records else None
        reported = {k: r.metrics for k, r in self.records.items()}
        tracking = plan.tracking_config(self.spec, self.name, key, reported)
        config = plan.stage_config(self.spec, self.name, self.workspace, key, input_digests=digests, tracking=tracking)
        config_path = self.workdir / "configs" / f"iter-{key.iteration}-{key.stage.value}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config.dump(config_path)
        contract.remove_stale_temps(config.stage_dir.parent)  # left by a killed earlier attempt
        record = StageRecord(phase=Phase.RUNNING, attempts=self._previous_attempts(key) + 1, start_time=timestamp())
        self.records[key] = record
        self.write_status()
        failure = self.execute(key, config_path, config.shards)
        if failure is not None:
            record.phase, record.completion_time, record.message = Phase.FAILED, timestamp(), failure

    def execute(self, key: StageKey, config_path: Path, shards: int) -> str | None:
        """Run the stage's processes, one per shard, with the command its Job runs; why it failed, or None."""
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
        # With this process's interpreter flags, not a pod's isolated mode: the environment here is the
        # user's own (PYTHONPATH may name the module of their function ranker).
        flags = tuple(subprocess._args_from_interpreter_flags())
        command = resources.stage_command(key.stage, str(config_path), sys.executable, flags)
        env = self._torchrun_env() if key.stage is Stage.TRAIN else {}
        processes = [_Shard(key, k, command, env, logs, bar, progress) for k in range(shards)]
        codes = [p.wait() for p in processes]
        bar.close()
        failed = [p for p, code in zip(processes, codes, strict=True) if code != 0]
        return failed[0].failure() if failed else None

    def _torchrun_env(self) -> dict[str, str]:
        """A Job's PET_* variables for this machine: one node, the rendezvous on loopback at a free port."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return {**resources.torchrun_env(self.spec, "127.0.0.1", port), "PET_NNODES": "1", "PET_NODE_RANK": "0"}


class _Shard:
    """One stage process: its log file, its progress lines fed into the stage's bar."""

    def __init__(
        self,
        key: StageKey,
        shard: int,
        command: list[str],
        extra_env: dict[str, str],
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
            contract.TERMINATION_LOG_ENV: str(self.termination),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **extra_env,
        }
        self.tail: deque[str] = deque(maxlen=15)
        self.shard, self.bar, self.progress = shard, bar, progress
        self.proc = subprocess.Popen(
            command,
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
