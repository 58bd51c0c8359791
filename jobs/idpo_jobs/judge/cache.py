"""The judgment cache: every answer a judge gave, on the claim, so a retried or preempted stage never pays twice.

One JSONL file per judge. A line holds a request's key and the answer (text, first token's alternatives,
tokens used), appended and fsynced as soon as the answer arrives: a stage killed mid-way keeps every
judgment it had paid for. The key is the hash of the judge's name and endpoint with the whole request
(model, messages, parameters), so it covers the template, the prompt, both responses and their order,
and a changed template or model never reads an old answer. A line torn by a kill, or interleaved by two
writers on a network volume, does not parse and is judged again. Answers are read back through the
template's parser, so the cache keeps what the endpoint said, not what an older parser made of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def request_key(judge: str, base_url: str, request: dict[str, Any]) -> str:
    body = json.dumps([judge, base_url, request], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


class JudgmentCache:
    """`<directory>/<judge>.jsonl`; None as the directory: nothing kept (a local check, a benchmark)."""

    def __init__(self, directory: Path | None, judge: str) -> None:
        self.path = directory / f"{judge}.jsonl" if directory is not None else None
        self._answers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._torn = False  # the file ends inside a line: the next append starts a new one
        if self.path is not None and self.path.exists():
            text = self.path.read_text(errors="replace")
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                    self._answers[row["key"]] = row["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # torn by a kill: judged again

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._answers.get(key)

    def put(self, key: str, answer: dict[str, Any]) -> None:
        line = json.dumps({"key": key, "answer": answer}, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            self._answers[key] = answer
            if self.path is None:
                return
            if self._torn:
                line, self._torn = "\n" + line, False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One write per line on an O_APPEND descriptor: lines from concurrent writers do not overwrite each other.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
