"""The per-iteration table `idpo status` prints, from a status dict (local or cluster)."""

from __future__ import annotations

import datetime as dt
from typing import Any

COLUMNS = (
    "ITER",
    "PHASE",
    "STAGE",
    "DURATION",
    "PROMPTS",
    "PAIRS",
    "DROPPED",
    "CHOSEN",
    "REJECTED",
    "LOSS",
    "ACC",
    "MARGIN",
    "CHECKPOINT",
)


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def iteration_row(it: dict[str, Any]) -> list[str]:
    stages = it.get("stages", {})
    gen = stages.get("generate", {}).get("metrics", {})
    rank = stages.get("rank", {}).get("metrics", {})
    train = stages.get("train", {}).get("metrics", {})
    running = next((name for name, s in stages.items() if s.get("phase") != "Succeeded"), "-")
    durations = [_seconds(s.get("startTime"), s.get("completionTime")) for s in stages.values()]
    known = [d for d in durations if d is not None]

    def side(kind: str) -> str:
        score, chars = rank.get(f"mean_{kind}_score"), rank.get(f"mean_{kind}_chars")
        return "-" if score is None else f"{_fmt(score)} / {_fmt(chars, 4)}ch"

    return [
        str(it["iteration"]),
        it.get("phase", "-"),
        running,
        _duration(sum(known) if known else None),
        _fmt(gen.get("prompts")),
        _fmt(rank.get("pairs")),
        _fmt(rank.get("dropped_ties")),
        side("chosen"),
        side("rejected"),
        _fmt(train.get("loss")),
        _fmt(train.get("reward_accuracy")),
        _fmt(train.get("reward_margin")),
        it.get("checkpoint", "-"),
    ]


def render(status: dict[str, Any], name: str = "") -> str:
    rows = [list(COLUMNS)] + [iteration_row(it) for it in status.get("iterations", [])]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    head = (
        f"{name + ': ' if name else ''}{status.get('phase', 'Pending')} — {status.get('message', '')}\n"
        f"iteration {status.get('currentIteration', '-')}/{status.get('iterationsTotal', '-')}"
        f", stage {status.get('currentStage', '-')}"
    )
    return head + "\n\n" + "\n".join(lines)
