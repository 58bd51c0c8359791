"""Length control on a length-biased objective, end to end on the tiny models (docs/ranking.md).

`examples/tiny-axes.yaml` aligns the tiny policy that stops at varied lengths (`policy-stops`) towards two
objectives, `s-words` (the share of words starting with 's', which does not reward length) and `length` (the
number of words: a length-biased scorer, as LLM judges and PairRM are), with a gate (`distinct`). Both variants
run side by side (one `idpo run` each; the tests below read the same runs):

- `controlled`, the example as shipped (pairing's `lengthPenalty`): the mean evaluated length stays within 15% of
  the base model's at every iteration while `s-words` beats the base model (its 95% interval above 0.5);
- `uncontrolled`, the same without it: the length grows over the iterations, and the length guard
  (`stopWhen.maxLengthRatio`) stops such a run.

The controlled bar holds at sampling seeds 0 to 7 (the tests run seed 0), with thin margins: the closest
figures are x0.88 (seeds 1 and 7), x1.13 (seed 4) and, at seed 0 itself, an s-words interval from 0.527
(docs/ranking.md, "What the tiny models show"). A failure after a change of the tiny models, the sampler or TRL
may be that noise, not a broken control.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from idpo_jobs import winrate
from idpo_jobs.config import Stage, StopWhen, Workspace
from idpo_operator import plan
from idpo_operator.spec import parse_manifest

from tests.conftest import merge

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-axes.yaml"
BAND = 0.15  # the length stays within 15% of the base model's
VARIANTS: dict[str, dict[str, Any]] = {
    "controlled": {},
    "uncontrolled": {"ranking": {"pairing": {"lengthPenalty": 0.0}}, "evaluation": {"stopWhen": None}},
}


def manifest(name: str, tiny: dict[str, Path]) -> dict[str, Any]:
    """The example, varied, on the session's tiny models (not built again per run)."""
    doc = merge(yaml.safe_load(EXAMPLE.read_text()), {"metadata": {"name": name}, "spec": VARIANTS[name]})
    doc["spec"]["model"]["name"] = str(tiny["policy-stops"])
    doc["spec"]["prompts"]["source"] = str(tiny["prompts"])
    return doc


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant's workdir, after `idpo run` (all at once: each stage is mostly one core's start-up)."""
    root = tmp_path_factory.mktemp("length")
    started = {}
    for name in VARIANTS:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(manifest(name, tiny)))
        command = [sys.executable, "-m", "idpo_operator.cli", "run", str(path), "--workdir", str(root / name)]
        started[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in started.items():
        out, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"{name}: {out[-3000:]}"
    return {name: root / name for name in VARIANTS}


def evaluations(workdir: Path) -> list[dict[str, Any]]:
    """The evaluate metrics of iterations 0, 1, ... as status.json holds them."""
    status = json.loads((workdir / "status.json").read_text())
    return [it["stages"]["evaluate"]["metrics"] for it in sorted(status["iterations"], key=lambda e: e["iteration"])]


def figures(workdir: Path) -> str:
    """Per iteration: the length against the base model's, and s-words's win rate against the base model."""
    rows = evaluations(workdir)[1:]
    said = [(e["mean_length_ratio_vs_base"], e["axes"]["s-words"]["win_rate_vs_base"]) for e in rows]
    return ", ".join(f"iteration {n}: length x{r:.2f}, s-words {w}" for n, (r, w) in enumerate(said, 1))


def test_without_length_control_the_length_grows_and_the_guard_stops_the_run(runs: dict[str, Path]) -> None:
    rows = evaluations(runs["uncontrolled"])
    print("uncontrolled:", figures(runs["uncontrolled"]))
    ratios = [e["mean_length_ratio_vs_base"] for e in rows[1:]]
    assert ratios[0] > 1 + BAND and ratios[1] > ratios[0], ratios
    # The guard on this run's own evaluations: it stops after the first iteration past its bound, which is
    # then never the best; the real stop (Succeeded, EarlyStopped) is the same rule (tests/test_local_run.py).
    spec = parse_manifest(yaml.safe_load(EXAMPLE.read_text())).spec
    guard = spec.evaluation.model_copy(update={"stop_when": StopWhen(max_length_ratio=1 + BAND)})
    stop = plan.early_stop(spec.model_copy(update={"iterations": 3, "evaluation": guard}), dict(enumerate(rows)))
    assert stop is not None and stop[0] == 1 and "times the base model's, above 1.15" in stop[1]
    assert winrate.best_of(rows[1:], guard.stop_when) is None  # both iterations are past the bound


def test_with_length_control_the_length_stays_near_the_base_while_s_words_beats_it(runs: dict[str, Path]) -> None:
    rows = evaluations(runs["controlled"])[1:]
    print("controlled:", figures(runs["controlled"]))
    assert len(rows) == 2  # no iteration was stopped by the guard
    for e in rows:
        assert abs(e["mean_length_ratio_vs_base"] - 1) <= BAND, figures(runs["controlled"])
        assert e["axes"]["s-words"]["win_rate_vs_base"][1] > 0.5, figures(runs["controlled"])


def test_the_example_is_a_gated_two_axis_run_whose_report_shows_each_axis(runs: dict[str, Path]) -> None:
    workdir = runs["uncontrolled"]
    ws = Workspace(workdir / "workspace")
    for iteration in (1, 2):
        part = ws.stage_dir(iteration, Stage.RANK) / "part-00000"
        pairs = [json.loads(line) for line in (part / "pairs.jsonl").open()]
        assert pairs and all(set(p["axis_scores"]) == {"s-words", "length", "distinct"} for p in pairs)
        for p in pairs:
            chosen = p["chosen"][-1]["content"]
            assert p["axis_scores"]["distinct"][p["all_generated_responses"].index(chosen)] >= 0.8  # the gate holds
    report = subprocess.run(
        [sys.executable, "-m", "idpo_operator.cli", "report", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    print(report.stdout)
    section = report.stdout.split("## Axes")[1].split("\n## ")[0]
    axes_rows = [line for line in section.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in axes_rows] == ["s-words", "length", "distinct"]
