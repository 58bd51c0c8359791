"""Prompt sources and the JSONL files stages hand to each other.

Formats (DESIGN §5): generations carry `prompt_id`, `prompt`, `all_generated_responses`; ranked
pairs add `all_rm_scores` and `chosen`/`rejected` message lists (the Snorkel / TRL layout).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from idpo_jobs.config import FILE_SUFFIXES, PromptsSpec
from idpo_jobs.contract import StageError
from idpo_jobs.uris import resolve_uri

T = TypeVar("T")


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise StageError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with Path(path).open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def shard_slice(items: Sequence[T], shard: int, shards: int) -> list[T]:
    """Contiguous, disjoint slices that together cover `items` exactly once."""
    n = len(items)
    return list(items[n * shard // shards : n * (shard + 1) // shards])


def _file_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    if not path.exists():
        raise StageError(f"prompt file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), str(path)
    return read_jsonl(path), str(path)


def _dataset_rows(spec: PromptsSpec, split: str) -> tuple[list[dict[str, Any]], str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot load this"
        raise StageError(f"cannot load dataset {spec.source!r} split {split!r}: {err}") from None
    return ds.to_list(), f"{spec.source}[{split}]"


def load_prompts(spec: PromptsSpec, iteration: int) -> list[dict[str, str]]:
    """This iteration's prompts as `{prompt_id, prompt}` rows, in a stable order."""
    source = resolve_uri(spec.source)
    is_file = source.endswith(FILE_SUFFIXES)
    if is_file:
        rows, origin = _file_rows(Path(source))
    else:
        rows, origin = _dataset_rows(spec, spec.split_for(iteration))

    if spec.per_iteration is not None:
        order = list(range(len(rows)))
        random.Random(spec.seed).shuffle(order)
        lo, hi = (iteration - 1) * spec.per_iteration, iteration * spec.per_iteration
        if hi > len(rows):
            raise StageError(
                f"prompts.perIteration={spec.per_iteration}: iteration {iteration} needs prompts "
                f"{lo}..{hi - 1} but {origin} has only {len(rows)}"
            )
        rows = [rows[i] for i in order[lo:hi]]
    if spec.limit is not None:
        rows = rows[: spec.limit]

    prompts = []
    for n, row in enumerate(rows):
        text = row.get(spec.column)
        if not isinstance(text, str) or not text.strip():
            have = ", ".join(sorted(row)) or "none"
            raise StageError(
                f"{origin} row {n}: column {spec.column!r} (prompts.column) is missing or not a "
                f"non-empty string; columns present: {have}"
            )
        pid = row.get(spec.id_column) if spec.id_column else None
        prompts.append({"prompt_id": str(pid) if pid is not None else prompt_id(text), "prompt": text})
    if not prompts:
        raise StageError(f"no prompts for iteration {iteration} in {origin}")
    return prompts
