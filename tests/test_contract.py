"""The stage contract: atomic publication, idempotent reruns, termination log, shard index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs import contract
from idpo_jobs.config import PromptsSpec, RankConfig, RankingSpec


def rank_config(tmp_path: Path, shards: int = 2) -> RankConfig:
    return RankConfig(
        run="r",
        iteration=1,
        workspace=str(tmp_path / "ws"),
        shards=shards,
        termination_log=str(tmp_path / "termination"),
        input_dir=str(tmp_path / "in"),
        input_shards=1,
        ranking=RankingSpec(),
    )


def test_output_is_published_with_success_file_only_when_complete(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    config = rank_config(tmp_path)
    seen: dict[str, Any] = {}

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        seen["out"], seen["shard"] = out, shard
        (out / "pairs.jsonl").write_text("{}\n")
        assert not (config.stage_dir / "part-00001").exists()  # invisible while being written
        return {"pairs": 1}

    summary = contract.run_stage(config, compute, {"x": str(tmp_path)})
    final = config.stage_dir / "part-00001"
    assert seen["shard"] == 1 and seen["out"] != final
    assert (final / "pairs.jsonl").exists()
    assert json.loads((final / "_SUCCESS.json").read_text())["metrics"] == {"pairs": 1}
    assert summary["versions"]["torch"]
    assert json.loads((tmp_path / "termination").read_text())["metrics"] == {"pairs": 1}
    assert [p.name for p in config.stage_dir.iterdir()] == ["part-00001"]  # no temp leftovers


def test_a_failing_compute_leaves_no_directory_behind(tmp_path: Path) -> None:
    config = rank_config(tmp_path, shards=1)

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        (out / "half.jsonl").write_text("{")
        raise contract.StageError("boom")

    with pytest.raises(contract.StageError):
        contract.run_stage(config, compute, {})
    assert list(config.stage_dir.iterdir()) == []


def test_rerun_of_a_finished_stage_does_no_work(tmp_path: Path) -> None:
    config = rank_config(tmp_path, shards=1)
    calls = []

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        calls.append(shard)
        return {"pairs": 3}

    first = contract.run_stage(config, compute, {})
    (tmp_path / "termination").unlink()
    again = contract.run_stage(config, compute, {})
    assert calls == [0] and again == first
    assert (tmp_path / "termination").exists()  # the summary is reported again


def test_a_concurrent_twin_that_finished_first_wins(tmp_path: Path) -> None:
    config = rank_config(tmp_path, shards=1)

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        twin = config.stage_dir / "part-00000"
        twin.mkdir(parents=True)
        (twin / "_SUCCESS.json").write_text(json.dumps({"metrics": {"pairs": 9}}))
        return {"pairs": 1}

    assert contract.run_stage(config, compute, {})["metrics"] == {"pairs": 9}


@pytest.mark.parametrize("index", ["2", "-1", "x"])
def test_shard_index_outside_the_job_is_an_error(tmp_path: Path, monkeypatch, index: str) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
    with pytest.raises(contract.StageError, match="JOB_COMPLETION_INDEX"):
        contract.shard_index(rank_config(tmp_path, shards=2))


def test_termination_summary_fits_the_kubelet_limit(tmp_path: Path) -> None:
    config = rank_config(tmp_path)
    contract.write_termination_log(config, {"stage": "rank", "iteration": 1, "metrics": {"k": "x" * 10_000}})
    text = (tmp_path / "termination").read_text()
    assert len(text.encode()) <= contract.TERMINATION_LIMIT
    assert json.loads(text) == {"stage": "rank", "iteration": 1}


def test_termination_log_defaults_to_nothing_when_absent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("IDPO_TERMINATION_LOG", raising=False)
    monkeypatch.setattr(contract, "TERMINATION_LOG", str(tmp_path / "nope"))
    config = rank_config(tmp_path).model_copy(update={"termination_log": None})
    assert contract.termination_log_path(config) is None


def test_incomplete_input_is_named(tmp_path: Path) -> None:
    from idpo_jobs.config import Stage

    (tmp_path / "gen" / "part-00000").mkdir(parents=True)
    (tmp_path / "gen" / "part-00000" / "_SUCCESS.json").write_text("{}")
    with pytest.raises(contract.StageError, match="part-00001"):
        contract.require_input(tmp_path / "gen", 2, Stage.GENERATE)


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text("a")
    before = contract.fingerprint(f)
    f.write_text("b")
    assert contract.fingerprint(f) != before
    assert PromptsSpec  # the config module imports without torch


def test_stale_temp_dirs_of_killed_attempts_are_removed_but_outputs_kept(tmp_path: Path) -> None:
    stage = tmp_path / "iter-1" / "generate"
    for d in ("part-00000", ".part-00001.tmp-abc", "x/.part-00000.tmp-1"):
        (stage / d).mkdir(parents=True)
    (tmp_path / "iter-1" / ".train.tmp-9").mkdir()
    removed = contract.remove_stale_temps(tmp_path / "iter-1")
    assert sorted(p.name for p in removed) == [".part-00001.tmp-abc", ".train.tmp-9"]
    assert (stage / "part-00000").is_dir()


class RepositoryNotFoundError(OSError):
    """Stands in for huggingface_hub's (matched by class name: the hub is an optional import)."""


class OutOfMemoryError(RuntimeError):
    """Stands in for torch's CUDA out-of-memory error."""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (contract.StageError("no pairs"), contract.EXIT_BAD_INPUT),
        (ValueError("bad config"), contract.EXIT_BAD_INPUT),
        (FileNotFoundError("no such model"), contract.EXIT_BAD_INPUT),
        (RepositoryNotFoundError("404 mistralai/Nope"), contract.EXIT_BAD_INPUT),
        (OSError("x is not a local folder and is not a valid model identifier"), contract.EXIT_BAD_INPUT),
        (TimeoutError("hub timed out"), contract.EXIT_TRANSIENT),
        (ConnectionError("reset by peer"), contract.EXIT_TRANSIENT),
        (OutOfMemoryError("CUDA out of memory"), contract.EXIT_TRANSIENT),
        (OSError("Input/output error"), contract.EXIT_TRANSIENT),
        (RuntimeError("a bug"), contract.EXIT_FAILED),
    ],
    ids=[
        "stage-error",
        "value",
        "missing-file",
        "hub-404",
        "unknown-model",
        "timeout",
        "network",
        "oom",
        "io",
        "crash",
    ],
)
def test_stage_errors_are_told_apart_so_only_bad_input_is_never_retried(error: Exception, code: int) -> None:
    assert contract.exit_code(error) == code


def test_an_input_rebuilt_since_the_stage_was_planned_is_refused(tmp_path: Path) -> None:
    from idpo_jobs.config import Stage

    stage_dir = tmp_path / "generate"
    for k in (0, 1):
        part = stage_dir / f"part-0000{k}"
        part.mkdir(parents=True)
        (part / "_SUCCESS.json").write_text(json.dumps({"shard": k}))
    planned = [contract.part_digest(stage_dir / f"part-0000{k}") for k in (0, 1)]
    assert contract.require_input(stage_dir, 2, Stage.GENERATE, planned)  # what was planned: accepted
    (stage_dir / "part-00001" / "_SUCCESS.json").write_text(json.dumps({"shard": 1, "rerun": True}))
    with pytest.raises(contract.StageError, match="part 1 is not the one this stage was planned on"):
        contract.require_input(stage_dir, 2, Stage.GENERATE, planned)


# --- durable publication: fsync, rename, `_SUCCESS.json` last; leftovers; a full volume ----------------
def write_pairs(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
    (out / "pairs.jsonl").write_text("{}\n")
    return {"pairs": 1}


def test_success_file_is_written_last_into_the_directory_already_in_place(tmp_path: Path, monkeypatch) -> None:
    import os

    from idpo_jobs import durable

    config = rank_config(tmp_path, shards=1)
    final = config.stage_dir / "part-00000"
    renames: list[tuple[str, bool]] = []
    rename, write_marker = os.rename, durable.write_marker

    def recording_rename(src, dst) -> None:
        renames.append((Path(dst).name, (Path(src) / "_SUCCESS.json").exists()))
        rename(src, dst)

    def checking_write_marker(directory: Path, content: dict[str, Any]) -> None:
        assert directory == final and final.is_dir() and (final / "pairs.jsonl").exists()
        write_marker(directory, content)

    monkeypatch.setattr(os, "rename", recording_rename)
    monkeypatch.setattr(durable, "write_marker", checking_write_marker)
    contract.run_stage(config, write_pairs, {})
    assert renames == [("part-00000", False)]  # the directory moved without its marker
    assert contract.read_success(final)["metrics"] == {"pairs": 1}


def test_files_and_directories_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    import os

    config = rank_config(tmp_path, shards=1)
    events: list[tuple[str, str]] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording(name: str, call):
        def record(src, dst) -> None:
            events.append((name, str(dst)))
            call(src, dst)

        return record

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording("rename", rename))
    monkeypatch.setattr(os, "replace", recording("replace", replace))
    contract.run_stage(config, write_pairs, {})
    final = str(config.stage_dir / "part-00000")
    moved = events.index(("rename", final))
    before, after = events[:moved], events[moved + 1 :]
    synced = [Path(path) for kind, path in before if kind == "fsync"]
    assert [p.name for p in synced][:1] == ["pairs.jsonl"] and synced[-1].name.startswith(".part-00000.tmp-")
    assert ("fsync", str(config.stage_dir)) in after  # the rename itself is durable
    marker = events.index(("replace", f"{final}/_SUCCESS.json"))
    assert events[marker - 1][0] == "fsync" and events[marker + 1] == ("fsync", final)


def test_a_crash_between_the_rename_and_the_success_file_is_redone_by_the_next_attempt(
    tmp_path: Path, monkeypatch
) -> None:
    from idpo_jobs import durable
    from idpo_jobs.config import Stage

    config = rank_config(tmp_path, shards=1)
    final = config.stage_dir / "part-00000"
    calls: list[int] = []

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        calls.append(shard)
        return write_pairs(cfg, out, shard)

    def killed(directory: Path, content: dict[str, Any]) -> None:
        raise SystemExit("killed")  # not an Exception: nothing in the stage may catch it

    with monkeypatch.context() as m:
        m.setattr(durable, "write_marker", killed)
        with pytest.raises(SystemExit):
            contract.run_stage(config, compute, {})
    assert (final / "pairs.jsonl").exists() and contract.read_success(final) is None
    assert contract.completed_parts(config.stage_dir, 1, Stage.RANK) is None  # readers: absent
    with pytest.raises(contract.StageError, match="is incomplete"):
        contract.require_input(config.stage_dir, 1, Stage.RANK)
    contract.run_stage(config, compute, {})
    assert calls == [0, 0] and contract.read_success(final)["metrics"] == {"pairs": 1}
    assert [p.name for p in config.stage_dir.iterdir()] == ["part-00000"]


def test_a_half_written_success_file_reads_as_absent(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS.json").write_text('{"stage": "ra')
    assert contract.read_success(tmp_path) is None


def test_leftovers_of_this_part_are_removed_and_another_parts_temporary_directory_is_kept(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    config = rank_config(tmp_path)
    stage = config.stage_dir
    for leftover in ("part-00001", ".part-00001.tmp-killed", ".part-00000.tmp-running"):
        (stage / leftover).mkdir(parents=True)
        (stage / leftover / "pairs.jsonl").write_text("half")
    contract.run_stage(config, write_pairs, {})
    assert sorted(p.name for p in stage.iterdir()) == [".part-00000.tmp-running", "part-00001"]
    assert (stage / "part-00001" / "pairs.jsonl").read_text() == "{}\n"


def test_the_work_directory_is_removed_once_the_part_is_published(tmp_path: Path) -> None:
    config = rank_config(tmp_path, shards=1)
    work = contract.work_dir(config.stage_dir / "part-00000")
    assert work == config.stage_dir / ".part-00000.work"

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        (work / "chunk-00000").mkdir(parents=True)
        return write_pairs(cfg, out, shard)

    contract.run_stage(config, compute, {})
    assert not work.exists()
    work.mkdir()  # published, then killed before tidying up: the rerun that does nothing tidies
    contract.run_stage(config, compute, {})
    assert not work.exists()


def test_a_failed_attempt_reports_the_twin_that_completed_the_part_meanwhile(tmp_path: Path) -> None:
    config = rank_config(tmp_path, shards=1)

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        twin = config.stage_dir / "part-00000"
        twin.mkdir(parents=True)
        (twin / "_SUCCESS.json").write_text(json.dumps({"metrics": {"pairs": 9}}))
        raise FileNotFoundError("the work directory was removed by the twin")

    assert contract.run_stage(config, compute, {})["metrics"] == {"pairs": 9}


def test_a_full_volume_exits_28_with_volume_full_naming_the_claim_and_its_size(tmp_path: Path, monkeypatch) -> None:
    import errno
    import re
    import sys

    monkeypatch.setenv("IDPO_PVC_CLAIM", "models")
    monkeypatch.setenv("IDPO_PVC_ROOT", str(tmp_path))
    config = rank_config(tmp_path, shards=1)
    config.dump(tmp_path / "rank.json")
    target = str(tmp_path / "ws" / "pairs.jsonl")

    def compute(cfg: RankConfig, out: Path, shard: int) -> dict[str, Any]:
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(sys, "argv", ["rank", "--config", str(tmp_path / "rank.json")])
    assert contract.cli(RankConfig, compute, lambda c: {}) == contract.EXIT_VOLUME_FULL == 28
    summary = json.loads((tmp_path / "termination").read_text())
    assert summary["reason"] == "VolumeFull" and summary["stage"] == "rank"
    sizes = r"\(\d+\.\d GB, \d+\.\d GB free\)"
    pattern = rf"volume full: claim models {sizes} while writing {target}: No space left on device"
    assert re.fullmatch(pattern, summary["error"]), summary["error"]
    assert list(config.stage_dir.iterdir()) == []  # the temporary directory is gone too


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        OSError(122, "Disk quota exceeded"),
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos: No space left on device"),
    ],
    ids=["enospc", "edquot", "torch-writer"],
)
def test_a_full_volume_is_told_apart_from_a_transient_io_error(error: Exception) -> None:
    assert contract.exit_code(error) == contract.EXIT_VOLUME_FULL
    wrapped = RuntimeError("saving the checkpoint failed")
    wrapped.__cause__ = error
    assert contract.exit_code(wrapped) == contract.EXIT_VOLUME_FULL


EXITING = """
import atexit, logging, sys, threading, time
from pathlib import Path
from idpo_jobs import contract

out = Path(sys.argv[1])
teardown = type("Teardown", (), {"__del__": lambda self: (out / "teardown").touch()})()  # freed by CPython's teardown

def main() -> int:
    atexit.register(lambda: (out / "atexit").touch())  # a library's, registered while the stage runs
    logging.basicConfig(stream=open(out / "log", "w"))
    logging.getLogger("stage").warning("kept")
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").touch())).start()
    print("unflushed", end="")
    if sys.argv[2] == "raise":
        raise RuntimeError("boom")
    return int(sys.argv[2])

contract.exit_after(main)
"""


@pytest.mark.parametrize("status", [0, 2, 75])
def test_exit_after_keeps_the_status_the_atexit_handlers_threads_and_output_but_skips_the_teardown(
    tmp_path: Path, status: int
) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", EXITING, str(tmp_path), str(status)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == "unflushed"
    assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists()
    assert (tmp_path / "log").read_text() == "WARNING:stage:kept\n"
    assert not (tmp_path / "teardown").exists()  # what the interpreter's teardown would have run


def test_a_main_that_raises_exits_the_ordinary_way(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", EXITING, str(tmp_path), "raise"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "RuntimeError: boom" in done.stderr
    assert (tmp_path / "atexit").exists() and (tmp_path / "teardown").exists()


STARTING = """
import json, sys
from idpo_jobs import contract

def main() -> int:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    from trl import DPOTrainer  # noqa: F401

    AutoTokenizer.from_pretrained(sys.argv[2])  # a Mistral-family tokenizer, as the tiny models' is
    print(json.dumps({name: name in sys.modules for name in ("sklearn", "scipy", "mistral_common", "trl")}))
    return 0

if sys.argv[1] == "stage":
    contract.exit_after(main)
sys.exit(main())
"""


def test_a_stage_process_loads_transformers_and_trl_without_the_optional_packages_no_stage_uses(
    tiny: dict[str, Path],
) -> None:
    import json
    import subprocess
    import sys

    def imported(how: str) -> dict[str, bool]:
        command = [sys.executable, "-c", STARTING, how, str(tiny["policy"])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    installed = {"sklearn": True, "scipy": True, "mistral_common": True, "trl": True}
    assert imported("plain") == installed  # installed, so transformers loads them
    assert imported("stage") == installed | {"sklearn": False, "scipy": False, "mistral_common": False}
