"""Faults and slowness on demand, for the resume and durable-write tests: on PYTHONPATH (a stage's
`runtime.env` on the cluster), it changes a stage process only through these variables.

- IDPO_TEST_PROGRESS_DELAY=S: sleep S seconds at each progress report (a batch generated or ranked, a
  train step), so that a test can kill the stage mid-way;
- IDPO_TEST_PROGRESS_LOG=FILE: append `<stage> <pid> <done> <total>` to FILE at each report (the work
  each attempt did);
- IDPO_TEST_KILL_AT=WHERE: SIGKILL this process at WHERE: `marker:<name>` just before the completeness
  marker of a directory named <name> (or whose path ends with <name>, e.g. `<axis>/chunk-00002`) is written
  (after its rename), `save:<name>` inside the Trainer's
  save of <name> (the weights written, the optimizer not yet), `progress:<n>` at the report of n done;
- IDPO_TEST_ENOSPC=NAME: writing a JSONL file named NAME fails with ENOSPC, as on a full volume.
"""

import os

_DELAY = float(os.environ.get("IDPO_TEST_PROGRESS_DELAY") or 0)
_LOG = os.environ.get("IDPO_TEST_PROGRESS_LOG")
_KILL = os.environ.get("IDPO_TEST_KILL_AT", "")
_ENOSPC = os.environ.get("IDPO_TEST_ENOSPC")


def _die() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


if _DELAY or _LOG or _KILL.startswith("progress:"):
    import sys
    import time

    from idpo_jobs import contract

    _report = contract.report_progress

    def _slow_report(done: int, total: int) -> None:
        if _LOG:
            # `python -m idpo_jobs.<stage>`, or the train launcher's `python -m idpo_jobs.train` in-process
            stage = next((s for s in ("generate", "rank", "train", "evaluate") if s in sys.argv[0]), "?")
            os.makedirs(os.path.dirname(_LOG) or ".", exist_ok=True)
            with open(_LOG, "a") as log:
                log.write(f"{stage} {os.getpid()} {done} {total}\n")
                log.flush()
                os.fsync(log.fileno())
        _report(done, total)
        if f"progress:{done}" == _KILL:
            _die()
        time.sleep(_DELAY)

    contract.report_progress = _slow_report

if _KILL.startswith("marker:"):
    from idpo_jobs import durable

    _write_marker = durable.write_marker

    def _killing_write_marker(directory, content):
        where = _KILL.removeprefix("marker:")
        if directory.name == where or directory.as_posix().endswith(f"/{where}"):
            _die()
        _write_marker(directory, content)

    durable.write_marker = _killing_write_marker

if _KILL.startswith("save:"):
    import transformers

    _save_optimizer = transformers.Trainer._save_optimizer_and_scheduler

    def _killing_save_optimizer(self, output_dir):
        if os.path.basename(output_dir) == _KILL.removeprefix("save:"):
            _die()
        _save_optimizer(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = _killing_save_optimizer

if _ENOSPC:
    import errno

    from idpo_jobs import data

    _write_jsonl = data.write_jsonl

    def _full_write_jsonl(path, rows):
        if os.path.basename(str(path)) == _ENOSPC:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return _write_jsonl(path, rows)

    data.write_jsonl = _full_write_jsonl
