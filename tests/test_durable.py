"""Durable writes and resumable work, without stages: chunks a restarted shard skips, checkpoints a
restarted train stage resumes from, and what makes either one complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs import durable, resume
from idpo_jobs.config import RankConfig, RankingSpec, TrainConfig, TrainingSpec


def rank_config(tmp_path: Path, **ranking: Any) -> RankConfig:
    return RankConfig(
        run="r",
        iteration=1,
        workspace=str(tmp_path / "ws"),
        input_dir=str(tmp_path / "in"),
        input_shards=1,
        ranking=RankingSpec(**ranking),
    )


class Squares:
    """A chunk's work: each item squared; remembers what it computed, and can die at a chunk."""

    def __init__(self, die_at: int | None = None) -> None:
        self.computed: list[int] = []
        self.die_at = die_at

    def __call__(self, start: int, items: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if start == self.die_at:
            raise SystemExit("killed")
        self.computed.extend(items)
        return [{"x": x, "square": x * x} for x in items], {"odd": sum(x % 2 for x in items)}


def test_a_restarted_shard_skips_the_chunks_an_earlier_attempt_finished(tmp_path: Path) -> None:
    items = list(range(10))
    first = Squares(die_at=6)
    with pytest.raises(SystemExit):
        resume.chunked(tmp_path, "work-a", items, 3, first)
    assert first.computed == [0, 1, 2, 3, 4, 5]
    second = Squares()
    done = resume.chunked(tmp_path, "work-a", items, 3, second)
    assert second.computed == [6, 7, 8, 9] and done.resumed == 6
    assert [r["square"] for r in done.rows] == [x * x for x in items]
    assert sum(e["odd"] for e in done.extras) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"chunk-0000{k}" for k in range(4)]


def test_a_chunk_killed_before_its_marker_is_computed_again(tmp_path: Path, monkeypatch) -> None:
    write_marker = durable.write_marker

    def killed_at_chunk_one(directory: Path, content: dict[str, Any]) -> None:
        if directory.name == "chunk-00001":
            raise SystemExit("killed")
        write_marker(directory, content)

    with monkeypatch.context() as m:
        m.setattr(durable, "write_marker", killed_at_chunk_one)
        with pytest.raises(SystemExit):
            resume.chunked(tmp_path, "work-a", list(range(6)), 3, Squares())
    assert (tmp_path / "chunk-00001" / resume.CHUNK_ROWS).exists()  # renamed, never marked
    again = Squares()
    assert resume.chunked(tmp_path, "work-a", list(range(6)), 3, again).resumed == 3
    assert again.computed == [3, 4, 5]


def test_chunks_of_other_work_or_other_boundaries_are_computed_again(tmp_path: Path) -> None:
    resume.chunked(tmp_path, "work-a", list(range(6)), 3, Squares())
    other = Squares()
    assert resume.chunked(tmp_path, "work-b", list(range(6)), 3, other).resumed == 0
    assert other.computed == list(range(6))
    rechunked = Squares()
    assert resume.chunked(tmp_path, "work-b", list(range(6)), 2, rechunked).resumed == 0


@pytest.mark.parametrize(("prompts", "batch", "size"), [(256, 8, 256), (10, 8, 16), (1, 8, 8), (5, 1, 5)])
def test_a_chunk_never_splits_a_batch(prompts: int, batch: int, size: int) -> None:
    assert resume.chunk_size(prompts, batch) == size


def test_identity_ignores_what_does_not_change_the_work_and_follows_what_does(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "_SUCCESS.json").write_text("{}")
    inputs = {"generations": str(tmp_path / "in")}
    base = resume.identity(rank_config(tmp_path), inputs)
    same = rank_config(tmp_path, resources={"limits": {"cpu": 4}}).model_copy(update={"termination_log": "/x"})
    assert resume.identity(same, inputs) == base
    assert resume.identity(rank_config(tmp_path, batch_size=4), inputs) != base
    (tmp_path / "in" / "_SUCCESS.json").write_text('{"rerun": true}')  # the input was rebuilt
    assert resume.identity(rank_config(tmp_path), inputs) != base


def test_identity_of_training_ignores_the_checkpoint_interval() -> None:
    def config(**training: Any) -> TrainConfig:
        return TrainConfig(
            run="r",
            iteration=1,
            workspace="ws",
            model="m",
            reference_model="m",
            input_dir="in",
            input_shards=1,
            training=TrainingSpec(**training),
        )

    base = resume.identity(config(), {}, world_size=1)
    assert resume.identity(config(checkpoint_every_steps=5, checkpoint_every_minutes=None), {}, world_size=1) == base
    assert resume.identity(config(), {}, world_size=2) != base
    assert resume.identity(config(beta=0.2), {}, world_size=1) != base


def stage_checkpoint(store: resume.Checkpoints, step: int) -> None:
    staged = store.staging / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "optimizer.pt").write_bytes(b"x" * 100)


def test_only_the_newest_complete_checkpoint_is_kept(tmp_path: Path) -> None:
    store = resume.Checkpoints(tmp_path / ".train.work", "work-a")
    for step in (2, 4, 6):
        stage_checkpoint(store, step)
        saved = store.publish(step, 10, started=0.0)
        assert saved.marker["step"] == step and saved.marker["bytes"] == 100
    assert [c.step for c in store.complete()] == [6]
    assert sorted(p.name for p in store.work.iterdir()) == [".staging", "checkpoint-6"]


def test_a_resume_ignores_and_removes_checkpoints_that_are_incomplete_or_of_other_work(tmp_path: Path) -> None:
    work = tmp_path / ".train.work"
    store = resume.Checkpoints(work, "work-a")
    stage_checkpoint(store, 2)
    store.publish(2, 10, started=0.0)
    stage_checkpoint(store, 4)  # killed while the Trainer wrote it
    (work / "checkpoint-6").mkdir()  # killed after the rename, before the marker
    foreign = work / "checkpoint-8"
    foreign.mkdir()
    durable.write_marker(foreign, {"identity": "work-b", "step": 8})
    found = store.prepare()
    assert found is not None and found.step == 2 and found.path == work / "checkpoint-2"
    assert [p.name for p in work.iterdir()] == ["checkpoint-2"]
    assert resume.Checkpoints(tmp_path / "none", "work-a").prepare() is None


def test_publishing_onto_a_twins_complete_directory_keeps_the_twins(tmp_path: Path) -> None:
    twin = tmp_path / "part"
    twin.mkdir()
    (twin / "rows.jsonl").write_text("twin\n")
    durable.write_marker(twin, {"by": "twin"})
    ours = tmp_path / ".part.tmp-1"
    ours.mkdir()
    (ours / "rows.jsonl").write_text("ours\n")
    assert durable.publish(ours, twin, {"by": "us"}) is False
    assert json.loads((twin / "_SUCCESS.json").read_text()) == {"by": "twin"}


def test_publishing_onto_an_unmarked_directory_is_refused_as_transient(tmp_path: Path) -> None:
    from idpo_jobs import contract

    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "half").write_text("x")
    (tmp_path / ".part.tmp-1").mkdir()
    (tmp_path / ".part.tmp-1" / "whole").write_text("y")
    with pytest.raises(TimeoutError, match=r"exists without _SUCCESS\.json") as err:
        durable.publish(tmp_path / ".part.tmp-1", tmp_path / "part", {}, twin_wait_s=0.2)
    assert contract.exit_code(err.value) == contract.EXIT_TRANSIENT


def test_an_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    durable.write_atomic(tmp_path / "status.json", "{}")
    durable.write_atomic(tmp_path / "status.json", '{"a": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
    assert durable.read_marker(tmp_path) is None  # not a marker
