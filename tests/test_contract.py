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
