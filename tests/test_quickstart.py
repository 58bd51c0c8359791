"""The README's first command, as a newcomer runs it: the loop learns something they can see.

The install part of the command is what CI itself does; this runs the rest (`idpo run examples/tiny.yaml
&& idpo report`) in a fresh directory and reads the report as printed: the last iteration beats the base
model with a 95% interval above 0.5. A flipped pair, a model not handed on, a broken judge or a demo
ranker a tiny model cannot climb in two iterations leaves the interval across 0.5."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def first_command() -> list[list[str]]:
    """The README's first bash block, as its `&&`-joined commands."""
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return [shlex.split(part) for part in block.group(1).split("&&")]


def test_the_readme_quick_start_ends_with_a_report_that_shows_learning(tmp_path: Path) -> None:
    commands = first_command()
    assert commands[-2:] == [["idpo", "run", "examples/tiny.yaml"], ["idpo", "report"]], commands
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # a checkout's layout; the runs land in tmp_path
    for command in commands[-2:]:
        cli = [sys.executable, "-m", "idpo_operator.cli", *command[1:]]
        done = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = done.stdout
    print(report)
    evaluation, _, training = report.partition("## Training")
    rows = [line for line in evaluation.splitlines() if re.match(r"\| \d", line)]
    assert [row.split("|")[1].split()[0] for row in rows] == ["0", "1", "2"]
    # The last iteration's win rate against the base model, with its 95% interval: "0.812 [0.677, 0.898]".
    rate = re.fullmatch(r" ([\d.]+) \[([\d.]+), ([\d.]+)\] ", rows[-1].split("|")[2])
    assert rate is not None, rows[-1]
    assert float(rate.group(2)) > 0.5, f"the last iteration does not beat the base model: {rows[-1]}"
    assert re.search(r"\n\| 2 \| \d+ \| 0\.\d+ → 0\.\d+ ", training)  # iteration 2's training curves
