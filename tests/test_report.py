"""`idpo report`: the per-iteration table and the HTML page with plots, from a run's status."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from typing import Any

import pytest
from idpo_jobs import report

CHECKPOINT = "pvc://data/idpo/tiny-1a2b3c4d/iter-2/train/model"


def evaluation(iteration: int, win: float, lc: float, chars: float) -> dict[str, Any]:
    if iteration == 0:
        return {"prompts": 200, "mean_response_chars": chars, "generator": "tiny-iter-0"}
    return {
        "prompts": 200,
        "mean_response_chars": chars,
        "win_rate_vs_base": win,
        "win_rate_vs_base_ci": [round(win - 0.07, 4), round(win + 0.06, 4)],
        "lc_win_rate_vs_base": lc,
        "lc_win_rate_vs_base_ci": [round(lc - 0.08, 4), round(lc + 0.07, 4)],
        "win_rate_vs_previous": 0.58,
        "win_rate_vs_previous_ci": [0.511, 0.646],
        "lc_win_rate_vs_previous": 0.55,
        "lc_win_rate_vs_previous_ci": [0.47, 0.628],
    }


def iteration(n: int, win: float, lc: float, chars: float, loss: float | None, acc: float | None) -> dict[str, Any]:
    stages: dict[str, Any] = {"evaluate": {"phase": "Succeeded", "metrics": evaluation(n, win, lc, chars)}}
    if n:
        stages["rank"] = {"phase": "Succeeded", "metrics": {"mean_chosen_score": 2.5 + n, "mean_rejected_score": -1.25}}
        stages["train"] = {"phase": "Succeeded", "metrics": {"loss": loss, "reward_accuracy": acc}}
    return {"iteration": n, "phase": "Succeeded", "stages": stages}


@pytest.fixture
def status() -> dict[str, Any]:
    return {
        "phase": "Succeeded",
        "iterations": [
            iteration(2, 0.683, 0.641, 612.5, 0.6114, 0.78),
            iteration(0, 0, 0, 540.0, None, None),
            iteration(1, 0.612, 0.598, 575.25, 0.6842, 0.66),
        ],
        "bestIteration": 2,
        "bestCheckpoint": CHECKPOINT,
    }


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_the_markdown_table_has_one_row_per_iteration_with_the_numbers(status) -> None:
    rows = table_rows(report.render_markdown(status, "tiny"))
    header, _, base, first, second = rows
    assert header[:3] == ["Iteration", "Win rate vs base", "LC win rate vs base"]
    assert "Best-of-N win rate vs base" not in header  # no iteration measured it
    cell = dict(zip(header, second, strict=True))
    assert cell["Iteration"] == "2 (best)"
    assert cell["Win rate vs base"] == "0.683 [0.613, 0.743]"
    assert cell["LC win rate vs base"] == "0.641 [0.561, 0.711]"
    assert cell["LC win rate vs previous"] == "0.550 [0.470, 0.628]"
    assert cell["Mean length (chars)"] == "612.5"
    assert cell["Chosen / rejected score"] == "4.500 / -1.250"
    assert (cell["DPO loss"], cell["Reward accuracy"]) == ("0.6114", "0.780")
    assert base[0] == "0" and base[1] == "–" and base[header.index("Mean length (chars)")] == "540.0"
    assert first[0] == "1"


def test_the_markdown_names_the_best_iteration_and_its_checkpoint(status) -> None:
    text = report.render_markdown(status)
    assert f"Best iteration: 2 — checkpoint `{CHECKPOINT}`" in text
    assert "Held-out prompts: 200" in text


def test_best_of_n_gets_a_column_once_measured(status) -> None:
    metrics = status["iterations"][0]["stages"]["evaluate"]["metrics"]
    metrics |= {"best_of_n": 4, "best_of_n_win_rate_vs_base": 0.8, "best_of_n_win_rate_vs_base_ci": [0.74, 0.85]}
    header, *_, second = table_rows(report.render_markdown(status))
    assert dict(zip(header, second, strict=True))["Best-of-N win rate vs base"] == "0.800 [0.740, 0.850]"


def test_a_run_without_evaluations_still_renders(status) -> None:
    for it in status["iterations"]:
        it["stages"].pop("evaluate")
    status.pop("bestIteration")
    text = report.render_markdown(status)
    assert len(table_rows(text)) == 5 and "Best iteration" not in text


def test_the_html_page_embeds_the_plots_as_a_png_and_the_table(status) -> None:
    page = report.render_html(status, "tiny <run>")
    match = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    assert base64.b64decode(match.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<td>0.683 [0.613, 0.743]</td>" in page and "<td>2 (best)</td>" in page
    assert "tiny &lt;run&gt;" in page and "<run>" not in page  # names are escaped
    assert "http" not in page.replace(CHECKPOINT, "")  # self-contained: nothing fetched


def test_the_html_page_renders_before_any_iteration_has_metrics() -> None:
    page = report.render_html({"iterations": [{"iteration": 1, "stages": {}}]})
    assert "data:image/png;base64," in page


def test_the_report_imports_without_torch_or_matplotlib(status) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None\n"
        "from idpo_jobs import report\n"
        "print(report.render_markdown({'iterations': [{'iteration': 1, 'stages': {}}]}))\n"
        "try:\n    report.render_html({})\nexcept ImportError as err:\n    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| 1 |" in proc.stdout and "needs matplotlib" in proc.stdout
