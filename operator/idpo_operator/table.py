"""The per-iteration table `idpo status` prints, from a status dict (local or cluster).

Every value comes from status, which is not trusted text: each goes through `display.printable` (no
terminal escape sequence or line break reaches the screen), and a field of the wrong shape reads as
absent (idpo_jobs.display).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from idpo_jobs.display import iteration_number, listing, mapping, number, printable
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


def _seconds(start: Any, end: Any) -> float | None:
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    try:
        parse = dt.datetime.fromisoformat
        return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()
    except (ValueError, TypeError):  # not a timestamp, or one with and one without a zone
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else printable(value, 40)


def iteration_row(it: dict[str, Any]) -> list[str]:
    stages = {name: mapping(s) for name, s in mapping(it.get("stages")).items()}
    gen, rank, train = (mapping(stages.get(name, {}).get("metrics")) for name in ("generate", "rank", "train"))
    running = next((printable(name, 40) for name, s in stages.items() if s.get("phase") != "Succeeded"), "-")
    durations = [_seconds(s.get("startTime"), s.get("completionTime")) for s in stages.values()]
    known = [d for d in durations if d is not None and abs(d) < 1e12]

    def side(kind: str) -> str:
        score, chars = rank.get(f"mean_{kind}_score"), rank.get(f"mean_{kind}_chars")
        return "-" if score is None else f"{_fmt(score)} / {_fmt(chars, 4)}ch"

    return [
        str(iteration_number(it)),
        printable(it.get("phase", "-"), 40),
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
        printable(it.get("checkpoint") or "-"),
    ]


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _evaluated(it: Any) -> dict[str, Any]:
    return mapping(mapping(mapping(mapping(it).get("stages")).get("evaluate")).get("metrics"))


def _per_name_block(status: dict[str, Any], block: str, cell: Any, title: str) -> list[str]:
    """A column per axis or judge (`block`), a row per evaluated iteration, and the length ratio. Empty without."""
    entries = [it for it in listing(status.get("iterations")) if iteration_number(it) is not None]
    iterations = [it for it in entries if isinstance(_evaluated(it).get(block), dict)]
    names = list(dict.fromkeys(n for it in iterations for n in _evaluated(it)[block]))
    if not names:
        return []
    header = ["ITER", *(printable(n, 32).upper() for n in names), "LENGTH/BASE"]
    rows = []
    for it in iterations:
        metrics = _evaluated(it)
        ratio = _fmt(metrics.get("mean_length_ratio_vs_base"))
        rows.append([str(iteration_number(it)), *(cell(metrics[block].get(n)) for n in names), ratio])
    return ["", title, *_aligned([header, *rows])]


def axes_block(status: dict[str, Any]) -> list[str]:
    """Per iteration, each axis's own LC win rate against the base model (a gate's pass rate), and the mean
    length against the base model's: does each axis move, and does length stay put? Empty without axes."""

    def cell(figures: Any) -> str:
        if not isinstance(figures, dict):
            return "-"
        lc, passed = value_of(figures.get("lc_win_rate_vs_base")), figures.get("pass_rate")
        shown = [f"{lc:.3f}"] if number(lc) is not None else []
        shown += [f"pass {passed:.3f}"] if number(passed) is not None else []
        return " / ".join(shown) or "-"

    return _per_name_block(status, "axes", cell, "axes: LC win rate vs base (gates: pass rate)")


def judges_block(status: dict[str, Any]) -> list[str]:
    """Per iteration, each LLM judge's LC win rate against the base model and its failed judgments: does the
    independent judge agree with the ranker? Empty without judges."""

    def cell(figures: Any) -> str:
        if not isinstance(figures, dict):
            return "-"
        lc, failures = value_of(figures.get("lc_win_rate_vs_base")), number(figures.get("failures"))
        shown = [f"{lc:.3f}"] if number(lc) is not None else []
        shown += [f"{failures:g} failed"] if failures else []
        return " / ".join(shown) or "-"

    return _per_name_block(status, "judges", cell, "judges: LC win rate vs base (failed judgments)")


def render(status: dict[str, Any], name: str = "") -> str:
    status = mapping(status)
    entries = [it for it in listing(status.get("iterations")) if iteration_number(it) is not None]
    rows = [list(COLUMNS)] + [iteration_row(it) for it in entries]
    field = lambda key, default="-": printable(status.get(key, default), 500)  # noqa: E731
    head = (
        f"{printable(name) + ': ' if name else ''}{field('phase', 'Pending')} — {field('message', '')}\n"
        f"iteration {field('currentIteration')}/{field('iterationsTotal')}, stage {field('currentStage')}"
    )
    return head + "\n\n" + "\n".join([*_aligned(rows), *axes_block(status), *judges_block(status)])
