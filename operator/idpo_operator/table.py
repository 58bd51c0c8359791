"""The per-iteration table `idpo status` prints, from a status dict (local or cluster)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from idpo_jobs.winrate import value_of

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


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _evaluated(it: dict[str, Any]) -> dict[str, Any]:
    metrics = (it.get("stages", {}).get("evaluate") or {}).get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def axes_block(status: dict[str, Any]) -> list[str]:
    """Per iteration, each axis's own LC win rate against the base model (a gate's pass rate), and the mean
    length against the base model's: does each axis move, and does length stay put? Empty without axes."""
    iterations = [it for it in status.get("iterations", []) if isinstance(_evaluated(it).get("axes"), dict)]
    names = list(dict.fromkeys(n for it in iterations for n in _evaluated(it)["axes"]))
    if not names:
        return []

    def cell(figures: Any) -> str:
        if not isinstance(figures, dict):
            return "-"
        lc, passed = value_of(figures.get("lc_win_rate_vs_base")), figures.get("pass_rate")
        shown = [f"{lc:.3f}"] if isinstance(lc, int | float) else []
        shown += [f"pass {passed:.3f}"] if isinstance(passed, int | float) else []
        return " / ".join(shown) or "-"

    header = ["ITER", *(n.upper() for n in names), "LENGTH/BASE"]
    rows = []
    for it in iterations:
        metrics = _evaluated(it)
        ratio = _fmt(metrics.get("mean_length_ratio_vs_base"))
        rows.append([str(it["iteration"]), *(cell(metrics["axes"].get(n)) for n in names), ratio])
    return ["", "axes: LC win rate vs base (gates: pass rate)", *_aligned([header, *rows])]


def render(status: dict[str, Any], name: str = "") -> str:
    rows = [list(COLUMNS)] + [iteration_row(it) for it in status.get("iterations", [])]
    head = (
        f"{name + ': ' if name else ''}{status.get('phase', 'Pending')} — {status.get('message', '')}\n"
        f"iteration {status.get('currentIteration', '-')}/{status.get('iterationsTotal', '-')}"
        f", stage {status.get('currentStage', '-')}"
    )
    return head + "\n\n" + "\n".join([*_aligned(rows), *axes_block(status)])
