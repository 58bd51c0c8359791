"""`idpo report`: does each iteration make the model better? A Markdown table or an HTML page with plots.

Pure functions over a run's status dict (local `status.json` or the resource's `.status`): each
iteration's `stages.evaluate.metrics` (win rates against the base model and the previous iteration,
with 95% intervals; see idpo_jobs.evaluate), `stages.rank.metrics` (chosen/rejected scores) and
`stages.train.metrics` (DPO loss, reward accuracy, and the training curves: the per-step loss, reward
margin and accuracy at up to 24 steps, `curve_*`, from the Trainer's log history), plus `bestIteration`
and `bestCheckpoint`. A run with `ranking.axes` also gets a table and a plot per axis (`metrics.axes` of the
evaluate and rank stages). An entry with iteration 0 is the base model's evaluation. The operator image has no
matplotlib: it is imported only to draw the HTML page's plots. The stages render the same report as an
MLflow artifact.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

from idpo_jobs.display import (
    code,
    html_text,
    interval,
    iteration_number,
    listing,
    mapping,
    markdown,
    number,
    printable,
)

NONE = "–"
# Evaluate metrics the report reads; `<key>_ci` holds [low, high] for the rates.
RATES = (
    "win_rate_vs_base",
    "lc_win_rate_vs_base",
    "win_rate_vs_previous",
    "lc_win_rate_vs_previous",
    "best_of_n_win_rate_vs_base",
)


def _metrics(stages: dict[str, Any], name: str) -> dict[str, Any]:
    return mapping(mapping(stages.get(name)).get("metrics"))


def _entries(status: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The well-formed `iterations[]` entries, by number: one of another shape is left out, not a crash."""
    found = [(n, e) for e in listing(mapping(status).get("iterations")) if (n := iteration_number(e)) is not None]
    return sorted(found, key=lambda pair: pair[0])


def iteration_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per iteration (base model first): the numbers the report shows, None where unknown
    (a metric that is not a finite number, an interval that is not a pair of them)."""
    rows = []
    for n, it in _entries(status):
        stages = mapping(it.get("stages"))
        evaluate, rank, train = (_metrics(stages, name) for name in ("evaluate", "rank", "train"))
        row: dict[str, Any] = {
            "iteration": n,
            "checkpoint": it.get("checkpoint"),
            "prompts": number(evaluate.get("prompts")),
            "mean_response_chars": number(evaluate.get("mean_response_chars")),
            "mean_length_ratio_vs_base": number(evaluate.get("mean_length_ratio_vs_base")),
            "best_of_n": number(evaluate.get("best_of_n")),
            "mean_chosen_score": number(rank.get("mean_chosen_score")),
            "mean_rejected_score": number(rank.get("mean_rejected_score")),
            "loss": number(train.get("loss")),
            "reward_accuracy": number(train.get("reward_accuracy")),
        }
        for key in RATES:
            row[key], row[f"{key}_ci"] = number(evaluate.get(key)), interval(evaluate.get(f"{key}_ci"))
        rows.append(row)
    return rows


def _number(value: float | None, digits: int) -> str:
    """Fixed-point, or in exponent form past a billion (a stage may report any finite number)."""
    if value is None:
        return NONE
    return f"{value:.{digits}f}" if abs(value) < 1e9 else f"{value:.{digits}g}"


def _rate(row: dict[str, Any], key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if value is None:
        return NONE
    return f"{_number(value, 3)} [{_number(ci[0], 3)}, {_number(ci[1], 3)}]" if ci else _number(value, 3)


def _scores(row: dict[str, Any]) -> str:
    chosen, rejected = row["mean_chosen_score"], row["mean_rejected_score"]
    return NONE if chosen is None else f"{_number(chosen, 3)} / {_number(rejected, 3)}"


Column = tuple[str, Callable[[dict[str, Any]], str]]


def columns(rows: list[dict[str, Any]], best: int | None) -> list[Column]:
    """The table's columns; best-of-N only when some iteration measured it."""
    cols: list[Column] = [
        ("Iteration", lambda r: f"{r['iteration']}{' (best)' if r['iteration'] == best else ''}"),
        ("Win rate vs base", lambda r: _rate(r, "win_rate_vs_base")),
        ("LC win rate vs base", lambda r: _rate(r, "lc_win_rate_vs_base")),
        ("Win rate vs previous", lambda r: _rate(r, "win_rate_vs_previous")),
        ("LC win rate vs previous", lambda r: _rate(r, "lc_win_rate_vs_previous")),
    ]
    if any(r["best_of_n_win_rate_vs_base"] is not None for r in rows):
        cols.append(("Best-of-N win rate vs base", lambda r: _rate(r, "best_of_n_win_rate_vs_base")))
    if any(r["mean_length_ratio_vs_base"] is not None for r in rows):
        cols.append(("Length vs base", lambda r: _number(r["mean_length_ratio_vs_base"], 2)))
    return [
        *cols,
        ("Mean length (chars)", lambda r: _number(r["mean_response_chars"], 1)),
        ("Chosen / rejected score", _scores),
        ("DPO loss", lambda r: _number(r["loss"], 4)),
        ("Reward accuracy", lambda r: _number(r["reward_accuracy"], 3)),
    ]


def _summary(
    status: dict[str, Any], rows: list[dict[str, Any]], text: Callable[[Any], str], path: Callable[[Any], str]
) -> list[str]:
    """The lines under the table; `text` and `path` render a value from status as literal text of the format."""
    lines = []
    prompts = next((r["prompts"] for r in reversed(rows) if r["prompts"] is not None), None)
    if prompts is not None:
        lines.append(f"Held-out prompts: {prompts:g}. Intervals are 95% (Wilson; Wald on the logit scale for LC).")
    best, where = mapping(status).get("bestIteration"), mapping(status).get("bestCheckpoint")
    if best is not None:
        lines.append(f"Best iteration: {text(best)}" + (f" — checkpoint {path(where)}" if where else ""))
    return lines


CURVES = (("loss", "DPO loss"), ("reward_margin", "reward margin"), ("reward_accuracy", "reward accuracy"))
SPARKS = "▁▂▃▄▅▆▇█"


def training_curves(status: dict[str, Any]) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """Per iteration, each curve as (step, value) points, from the train stage's `curve_*` metrics; a point
    whose step or value is not a finite number is left out."""
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for n, it in _entries(status):
        metrics = _metrics(mapping(it.get("stages")), "train")
        steps = listing(metrics.get("curve_step"))
        if not steps:
            continue
        out[n] = {
            name: [
                (s, v)
                for s, v in zip(map(number, steps), map(number, listing(metrics.get(f"curve_{name}"))), strict=False)
                if s is not None and v is not None
            ]
            for name, _ in CURVES
        }
    return out


def _spark(points: list[tuple[float, float]]) -> str:
    values = [v / 2 for _, v in points]  # halved: the span of any two finite floats stays finite
    if not values:
        return NONE
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[round((v - low) / span * (len(SPARKS) - 1))] for v in values)


def _curve_cell(points: list[tuple[float, float]]) -> str:
    if not points:
        return NONE
    return f"{_number(points[0][1], 3)} → {_number(points[-1][1], 3)} {_spark(points)}"


def curves_markdown(status: dict[str, Any]) -> list[str]:
    """Per iteration: each curve from its first to its last logged step, and its shape."""
    found = training_curves(status)
    if not found:
        return []
    lines = ["## Training", "", "| iteration | steps | " + " | ".join(t for _, t in CURVES) + " |"]
    lines.append("|---:|---:|" + "|".join("---" for _ in CURVES) + "|")
    for iteration, curves in sorted(found.items()):
        steps = max((p[-1][0] for p in curves.values() if p), default=0)
        lines.append(f"| {iteration} | {steps:g} | " + " | ".join(_curve_cell(curves[n]) for n, _ in CURVES) + " |")
    return ["", *lines]


AXIS_COLUMNS = (
    ("Win rate vs base", "win_rate_vs_base"),
    ("LC win rate vs base", "lc_win_rate_vs_base"),
    ("Win rate vs previous", "win_rate_vs_previous"),
    ("LC win rate vs previous", "lc_win_rate_vs_previous"),
)


def _axes(stages: dict[str, Any], name: str) -> dict[str, Any]:
    found = _metrics(stages, name).get("axes")
    return found if isinstance(found, dict) else {}


def axis_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per iteration and axis (`ranking.axes`): the axis's own evaluation of the iteration (win
    rates, and a gate's pass rate) and what it thought of the pairs the rank stage chose. Values of another
    shape read as unknown."""
    rows = []
    for n, it in _entries(status):
        stages = mapping(it.get("stages"))
        evaluated, ranked = _axes(stages, "evaluate"), _axes(stages, "rank")
        for axis in dict.fromkeys([*evaluated, *ranked]):
            figures, scores = mapping(evaluated.get(axis)), mapping(ranked.get(axis))
            row = {"iteration": n, "axis": axis, "pass_rate": number(figures.get("pass_rate"))}
            row |= {k: number(scores.get(k)) for k in ("mean_chosen_score", "mean_rejected_score", "dropped_prompts")}
            rows.append(row | _rates_of(figures))  # an axis's rate is [value, low, high]
    return rows


AXES_NOTE = (
    "Per axis: its own win rates (95% intervals), a gate's pass rate, its mean score of the chosen and rejected "
    "responses, and the prompts a gate dropped (docs/ranking.md)."
)


def axes_table(status: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-axis table's titles and cells: each axis's own judgement of each iteration, so each can be seen
    to move. No rows for a run without `ranking.axes`."""
    titles = ["Iteration", "Axis", *(t for t, _ in AXIS_COLUMNS), "Pass rate", "Chosen / rejected score", "Dropped"]
    cells = [
        [
            str(r["iteration"]),
            printable(r["axis"], 32),
            *(_rate(r, key) for _, key in AXIS_COLUMNS),
            _number(r["pass_rate"], 3),
            _scores(r),
            _number(r["dropped_prompts"], 0),
        ]
        for r in axis_rows(status)
    ]
    return titles, cells


def _named_markdown(heading: str, titles: list[str], cells: list[list[str]], note: str) -> list[str]:
    """A per-axis or per-judge table in Markdown; its second column, a name, is status text (escaped)."""
    if not cells:
        return []
    lines = [f"## {heading}", "", "| " + " | ".join(titles) + " |", "|" + "|".join("---:" for _ in titles) + "|"]
    cells = [[row[0], markdown(row[1], 32), *row[2:]] for row in cells]
    return ["", *lines, *("| " + " | ".join(row) + " |" for row in cells), "", note]


def axes_markdown(status: dict[str, Any]) -> list[str]:
    return _named_markdown("Axes", *axes_table(status), AXES_NOTE)


def _rates_of(figures: dict[str, Any]) -> dict[str, Any]:
    """An axis's or judge's rates, each [value, low, high], as a row's `key` and `key_ci` (None when unknown)."""
    row: dict[str, Any] = {}
    for _, key in AXIS_COLUMNS:
        figure = figures.get(key)
        whole = isinstance(figure, list) and len(figure) == 3
        row[key], row[f"{key}_ci"] = (number(figure[0]), interval(figure[1:])) if whole else (None, None)
        if row[key] is None:
            row[f"{key}_ci"] = None
    return row


JUDGE_COUNTS = ("ties_vs_base", "ties_vs_previous", "calls", "cached", "failures", "tokens")
JUDGES_NOTE = (
    "Per LLM judge (evaluation.judges): its win rates against the base model's and the previous iteration's "
    "responses, both orders per prompt (95% intervals), ties, and what it cost: requests sent, answers read from "
    "the cache, failed judgments (left out of the rates), tokens (docs/evaluation.md)."
)


def judges_table(status: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-judge table's titles and cells: each LLM judge's view of each iteration. No rows without judges."""
    titles = ["Iteration", "Judge", *(t for t, _ in AXIS_COLUMNS), "Ties (base / previous)", "Calls", "Cached"]
    titles += ["Failures", "Tokens"]
    cells = []
    for n, it in _entries(status):
        found = _metrics(mapping(it.get("stages")), "evaluate").get("judges")
        for judge, figures in (found if isinstance(found, dict) else {}).items():
            figures = mapping(figures)
            row = _rates_of(figures)
            counts = {k: number(figures.get(k)) for k in JUDGE_COUNTS}
            ties = f"{_number(counts['ties_vs_base'], 0)} / {_number(counts['ties_vs_previous'], 0)}"
            cells.append(
                [str(n), printable(judge, 32), *(_rate(row, key) for _, key in AXIS_COLUMNS), ties]
                + [_number(counts[k], 0) for k in ("calls", "cached", "failures", "tokens")]
            )
    return titles, cells


def judges_markdown(status: dict[str, Any]) -> list[str]:
    return _named_markdown("LLM judges", *judges_table(status), JUDGES_NOTE)


def _html_table(titles: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in titles)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(status: dict[str, Any], name: str = "") -> str:
    """A per-iteration Markdown table of win rates (with intervals), length, scores and DPO training metrics,
    and the training curves of each iteration."""
    rows = iteration_rows(status)
    cols = columns(rows, mapping(status).get("bestIteration"))
    lines = [f"# Evaluation{': ' + markdown(name) if name else ''}", ""]
    lines.append("| " + " | ".join(title for title, _ in cols) + " |")
    lines.append("|" + "|".join("---:" for _ in cols) + "|")
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]
    body = [*lines, "", *_summary(status, rows, markdown, code), *axes_markdown(status), *judges_markdown(status)]
    body += curves_markdown(status)
    return "\n".join(body).rstrip() + "\n"


def _figure() -> Any:
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed
    except ImportError:
        raise ImportError("the HTML report needs matplotlib: pip install 'matplotlib>=3.8'") from None
    return Figure


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plot_curves(status: dict[str, Any]) -> bytes | None:
    """The training curves of every iteration, one line per iteration, a panel per curve; None without any."""
    found = training_curves(status)
    if not found:
        return None
    fig = _figure()(figsize=(11, 3.4), layout="constrained")
    for ax, (name, title) in zip(fig.subplots(1, len(CURVES)), CURVES, strict=True):
        for iteration, curves in sorted(found.items()):
            if curves[name]:
                ax.plot(*zip(*curves[name], strict=True), ".-", label=f"iteration {iteration}")
        ax.set(title=f"Training: {title}", xlabel="step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    return _png(fig)


def _errorbars(ax: Any, points: list[tuple[int, float, Any]], style: str, label: str) -> None:
    """Values with their [low, high] intervals (the value itself where there is none)."""
    if not points:
        return
    xs, ys, cis = zip(*[(x, y, ci or (y, y)) for x, y, ci in points], strict=True)
    lows, highs = zip(*cis, strict=True)
    below = [y - lo for y, lo in zip(ys, lows, strict=True)]
    above = [hi - y for y, hi in zip(ys, highs, strict=True)]
    ax.errorbar(xs, ys, yerr=[below, above], fmt=style, capsize=3, label=label)


def _plot_axes(status: dict[str, Any]) -> bytes | None:
    """A panel per axis: its win rate and LC win rate against the base model per iteration (and a gate's pass
    rate); None for a run without `ranking.axes`."""
    rows = axis_rows(status)
    names = list(dict.fromkeys(r["axis"] for r in rows))
    if not names:
        return None
    columns = min(len(names), 4)
    lines = -(-len(names) // columns)
    fig = _figure()(figsize=(3.2 * columns + 1, 3.0 * lines), layout="constrained")
    panels = fig.subplots(lines, columns, squeeze=False).flatten()
    for ax, name in zip(panels, names, strict=False):
        mine = [r for r in rows if r["axis"] == name]
        for key, label, style in (
            ("win_rate_vs_base", "win rate vs base", "o-"),
            ("lc_win_rate_vs_base", "LC win rate vs base", "s-"),
        ):
            _errorbars(ax, [(r["iteration"], r[key], r[f"{key}_ci"]) for r in mine if r[key] is not None], style, label)
        passed = [(r["iteration"], r["pass_rate"]) for r in mine if r["pass_rate"] is not None]
        if passed:
            ax.plot(*zip(*passed, strict=True), "d--", label="pass rate")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set(ylim=(0, 1.05), title="axis " + printable(name, 32).replace("$", r"\$"), xlabel="iteration")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    for ax in panels[len(names) :]:
        ax.set_visible(False)
    if panels[0].get_legend_handles_labels()[0]:
        panels[0].legend(fontsize=8, loc="lower right")
    return _png(fig)


def _plot(rows: list[dict[str, Any]]) -> bytes:
    """Four panels as one PNG: win rates with intervals, mean length, DPO loss, reward accuracy."""
    fig = _figure()(figsize=(11, 7.5), layout="constrained")
    (rates, length), (loss, accuracy) = fig.subplots(2, 2, sharex=True)
    for key, label, style in (
        ("win_rate_vs_base", "win rate vs base", "o-"),
        ("lc_win_rate_vs_base", "LC win rate vs base", "s-"),
        ("lc_win_rate_vs_previous", "LC win rate vs previous", "^--"),
        ("best_of_n_win_rate_vs_base", "best-of-N win rate vs base", "d:"),
    ):
        _errorbars(rates, [(r["iteration"], r[key], r[f"{key}_ci"]) for r in rows if r[key] is not None], style, label)
    rates.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    rates.set(ylim=(0, 1), title="Held-out win rates (95% intervals)", ylabel="win rate")
    if rates.get_legend_handles_labels()[0]:
        rates.legend(fontsize=8, loc="lower right")
    for ax, key, title in (
        (length, "mean_response_chars", "Mean response length (chars)"),
        (loss, "loss", "DPO loss"),
        (accuracy, "reward_accuracy", "Reward accuracy"),
    ):
        points = [(r["iteration"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
    for ax in (rates, length, loss, accuracy):
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    return _png(fig)


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
    "th{background:#f4f4f4}img{max-width:100%}"
)


def _html_code(value: Any) -> str:
    return f"<code>{html_text(value)}</code>"


def render_html(status: dict[str, Any], name: str = "") -> str:
    """A self-contained HTML page: the plots as an embedded base64 PNG, then the table of render_markdown."""
    rows = iteration_rows(status)
    cols = columns(rows, mapping(status).get("bestIteration"))
    title = f"Evaluation{': ' + html_text(name) if name else ''}"
    image = base64.b64encode(_plot(rows)).decode()
    trained = _plot_curves(status)
    curves = (
        f'<h2>Training</h2>\n<img src="data:image/png;base64,{base64.b64encode(trained).decode()}" '
        'alt="per-step DPO loss, reward margin and reward accuracy of each iteration">\n'
        if trained
        else ""
    )
    plotted = _plot_axes(status)
    per_axis = (
        f'<h2>Axes</h2>\n<img src="data:image/png;base64,{base64.b64encode(plotted).decode()}" '
        f'alt="per axis: win rate and LC win rate against the base model of each iteration">\n'
        f"{_html_table(*axes_table(status))}\n<p>{html.escape(AXES_NOTE)}</p>\n"
        if plotted
        else ""
    )
    judged = judges_table(status)
    per_judge = f"<h2>LLM judges</h2>\n{_html_table(*judged)}\n<p>{html.escape(JUDGES_NOTE)}</p>\n" if judged[1] else ""
    table = _html_table([t for t, _ in cols], [[cell(r) for _, cell in cols] for r in rows])
    notes = "".join(f"<p>{line}</p>" for line in _summary(status, rows, html_text, _html_code))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
        f'<img src="data:image/png;base64,{image}" alt="win rates, mean length, DPO loss and reward accuracy '
        f'per iteration">\n{table}\n{notes}\n'
        f"{per_axis}{per_judge}{curves}</body></html>\n"
    )
