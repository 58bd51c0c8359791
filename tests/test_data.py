"""Prompt sources, JSONL errors and shard slicing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from idpo_jobs.config import PromptsSpec
from idpo_jobs.contract import StageError
from idpo_jobs.data import load_prompts, read_jsonl, shard_slice


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"q{i}"}) + "\n" for i in range(n)))
    return path


def spec(source: Path, **kw) -> PromptsSpec:
    return PromptsSpec(source=str(source), split_pattern=None, **kw)


def test_per_iteration_slices_are_disjoint_and_seeded(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", 30)
    s = spec(src, per_iteration=10, seed=3)
    slices = [{p["prompt_id"] for p in load_prompts(s, i)} for i in (1, 2, 3)]
    assert all(len(x) == 10 for x in slices) and len(set().union(*slices)) == 30
    assert load_prompts(s, 2) == load_prompts(s, 2)
    assert slices[0] != {p["prompt_id"] for p in load_prompts(spec(src, per_iteration=10, seed=4), 1)}


def test_running_out_of_prompts_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"iteration 3 needs prompts 20\.\.29"):
        load_prompts(spec(write_prompts(tmp_path / "p.jsonl", 25), per_iteration=10), 3)


def test_parquet_and_pvc_sources_and_hashed_ids(tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "data" / "p.parquet")
    s = PromptsSpec(source="pvc://data/p.parquet", column="text", split_pattern=None)
    monkeypatch.setenv("IDPO_PVC_ROOT", str(tmp_path))
    rows = load_prompts(s, 1)
    assert [r["prompt"] for r in rows] == ["a", "b"] and len(rows[0]["prompt_id"]) == 16


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(StageError, match=r"p\.jsonl:2: malformed JSON"):
        read_jsonl(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no prompts for iteration 1"), ('{"text": "x"}\n', "column 'prompt' .* columns present: text")],
    ids=["empty", "missing-column"],
)
def test_unusable_prompt_files_are_reported(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(StageError, match=message):
        load_prompts(spec(tmp_path / "p.jsonl"), 1)


def test_missing_prompt_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="does not exist"):
        load_prompts(spec(tmp_path / "nope.jsonl"), 1)


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 12])
def test_shards_cover_every_item_exactly_once(shards: int) -> None:
    items = list(range(10))
    parts = [shard_slice(items, k, shards) for k in range(shards)]
    assert [x for p in parts for x in p] == items


def test_dataset_sources_use_the_iteration_split_pattern(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    for n in (1, 2):  # the hub layout of a dataset with named splits, e.g. Snorkel's
        table = pa.table({"prompt": [f"it{n}-a", f"it{n}-b"], "prompt_id": [f"{n}a", f"{n}b"]})
        pq.write_table(table, data / f"train_iteration_{n}-00000-of-00001.parquet")
    s = PromptsSpec(source=str(tmp_path / "ds"))
    assert [r["prompt"] for r in load_prompts(s, 2)] == ["it2-a", "it2-b"]
    with pytest.raises(StageError, match="split 'train_iteration_3'"):
        load_prompts(s, 3)
