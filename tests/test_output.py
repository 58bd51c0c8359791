"""What `idpo status` and `idpo report` print of a run's status, which is not trusted text: a stage reports
any metric it likes, and anyone who may write the status subresource can put anything there. Whatever
status holds, both render it (no crash), escaped: no terminal control sequence, no markup of its own."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idpo_jobs import report
from idpo_operator.table import render

ESCAPE = "\x1b[2J\x1b[31m"  # clear the screen, then red
BIDI = "\u202e"  # right-to-left override: what follows reads backwards
HOSTILE = f"pvc://c/{ESCAPE}x\r\n|<img src=x onerror=alert(1)>*_`[a](b)`{BIDI}"
OUR_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "img", "table", "thead", "tbody"}
OUR_TAGS |= {"tr", "th", "td", "p", "code"}
STAGES = ("generate", "rank", "train", "evaluate")
METRICS = (
    "win_rate_vs_base",
    "win_rate_vs_base_ci",
    "lc_win_rate_vs_base",
    "lc_win_rate_vs_base_ci",
    "best_of_n_win_rate_vs_base",
    "prompts",
    "mean_response_chars",
    "mean_chosen_score",
    "mean_rejected_score",
    "loss",
    "reward_accuracy",
    "curve_step",
    "curve_loss",
    "pairs",
)


def unsafe(text: str, allowed: str = "\n") -> list[str]:
    """Characters a terminal or a reader would act on: controls, lone surrogates, separators, bidi marks."""
    return [
        c
        for c in text
        if c not in allowed
        and (unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or unicodedata.bidirectional(c) in BIDI_CONTROLS)
    ]


BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def outside_code(text: str) -> str:
    """Markdown text without its code spans, whose content is literal (a `<` there is no tag)."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text)


def cells(line: str) -> int:
    """The number of cell separators of a Markdown table row (escaped characters aside)."""
    return re.sub(r"\\.", "", line).count("|")


def hostile_status() -> dict[str, Any]:
    evaluate = {"win_rate_vs_base": "0.9", "win_rate_vs_base_ci": [0.5], "lc_win_rate_vs_base": float("nan")}
    evaluate |= {"prompts": HOSTILE, "mean_response_chars": {"nested": [HOSTILE]}}
    train = {"loss": [1, 2], "curve_step": [1, "2", None, 3], "curve_loss": [0.7, 0.6, float("inf"), 1e308]}
    return {
        "phase": HOSTILE,
        "message": HOSTILE,
        "currentStage": HOSTILE,
        "bestIteration": HOSTILE,
        "bestCheckpoint": HOSTILE,
        "iterations": [
            {"iteration": 1, "checkpoint": HOSTILE, "stages": {"evaluate": {"metrics": evaluate}, HOSTILE: {}}},
            {"iteration": 2, "phase": HOSTILE, "stages": {"train": {"metrics": train, "startTime": HOSTILE}}},
            {"iteration": "3", "stages": []},
            "junk",
        ],
    }


def test_idpo_status_shows_escape_codes_and_markup_as_text() -> None:
    table = render(hostile_status(), f"run{ESCAPE}")
    assert unsafe(table) == []
    assert "\\x1b[2J\\x1b[31m" in table and "\\r\\n" in table and "\\u202e" in table
    assert len(table.splitlines()) == 3 + 1 + 2  # head, blank, columns, the two well-formed iterations


def test_the_markdown_report_escapes_values_and_tolerates_any_metric() -> None:
    text = report.render_markdown(hostile_status(), "run<b>")
    assert unsafe(text) == [] and "<" not in outside_code(text)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len({cells(line) for line in rows[:4]}) == 1  # the evaluation table: no cell split by a value
    assert "run&lt;b&gt;" in text and "Best iteration: pvc://c/\\\\x1b" in text
    first = dict(zip(rows[0].split(" | "), rows[2].split(" | "), strict=True))
    assert first["Win rate vs base"] == "–"  # a string is no win rate, and a one-element interval no interval
    # The code span holds a backtick run, so its fence is longer; nothing in it is markup.
    assert "checkpoint ``" in text and HOSTILE.replace("`", "") not in text


def test_the_html_report_escapes_values_and_tolerates_any_metric() -> None:
    page = report.render_html(hostile_status(), "run<b>")
    assert unsafe(page) == []
    assert set(re.findall(r"</?([a-zA-Z0-9]+)", page)) <= OUR_TAGS
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


hostile_text = st.text(
    alphabet=st.sampled_from(list("\x1b\x9b[]31m\r\n\t\x07\x00\u202e\u2066\u2028<>&|`*_~\\\"'/a1.- é"))
    | st.characters(),
    max_size=40,
)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)
number_or_junk = st.floats() | st.integers(-5, 10**6) | junk
metric = number_or_junk | st.lists(number_or_junk, max_size=3)
stage = st.fixed_dictionaries(
    {},
    optional={
        "phase": st.sampled_from(["Succeeded", "Running", "Failed"]) | junk,
        "startTime": st.just("2026-01-01T00:00:00Z") | junk,
        "completionTime": st.just("2026-01-01T00:01:05Z") | junk,
        "metrics": st.dictionaries(st.sampled_from(METRICS) | hostile_text, metric, max_size=8) | junk,
    },
)
entry = st.fixed_dictionaries(
    {"iteration": st.integers(0, 4) | junk},
    optional={
        "phase": junk,
        "checkpoint": hostile_text | junk,
        "stages": st.dictionaries(st.sampled_from(STAGES) | hostile_text, stage | junk, max_size=4) | junk,
    },
)
status_doc = (
    st.fixed_dictionaries(
        {},
        optional={
            key: junk | hostile_text
            for key in ("phase", "message", "currentIteration", "iterationsTotal", "currentStage", "bestCheckpoint")
        }
        | {"bestIteration": st.integers(0, 4) | junk, "iterations": st.lists(entry | junk, max_size=4) | junk},
    )
    | junk
)


@given(status=status_doc, name=hostile_text)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_status_renders_as_a_table_and_markdown_with_nothing_unescaped(status: Any, name: str) -> None:
    table = render(status, name)
    assert unsafe(table) == []
    text = report.render_markdown(status, name)
    assert unsafe(text) == [] and "<" not in outside_code(text)
    evaluation, *training = text.split("\n## Training\n")
    for part in (evaluation, *training):  # each table's rows have its header's cells, whatever the values
        rows = [line for line in part.splitlines() if line.startswith("|")]
        assert len({cells(r) for r in rows}) == 1
    iterations = status.get("iterations") if isinstance(status, dict) else None
    good = [e for e in iterations if _numbered(e)] if isinstance(iterations, list) else []
    assert len(table.splitlines()) == 4 + len(good)
    assert len([line for line in evaluation.splitlines() if line.startswith("|")]) == 2 + len(good)


def _numbered(entry: Any) -> bool:
    n = entry.get("iteration") if isinstance(entry, dict) else None
    return isinstance(n, int) and not isinstance(n, bool)


@given(status=status_doc, name=hostile_text)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_status_renders_as_an_html_page_with_only_its_own_tags(status: Any, name: str) -> None:
    page = report.render_html(status, name)
    assert unsafe(page) == []
    assert set(re.findall(r"</?([a-zA-Z0-9]+)", page)) <= OUR_TAGS
