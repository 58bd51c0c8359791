"""`idpo run` stories: a whole run, a killed run that resumes, a failing stage fixed and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TESTS, env_with_tests, manifest

pytestmark = pytest.mark.slow


def idpo(*args: str, wait: bool = True, **env: str) -> Any:
    cmd = [sys.executable, "-m", "idpo_operator.cli", *args]
    if not wait:
        return subprocess.Popen(
            cmd,
            env={**env_with_tests(), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    return subprocess.run(cmd, env={**env_with_tests(), **env}, capture_output=True, text=True, timeout=600)


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def starts(workdir: Path, stem: str) -> int:
    log = workdir / "logs" / f"{stem}-0.log"
    return log.read_text().count(" start\n") if log.exists() else 0


def status(workdir: Path) -> dict:
    return json.loads((workdir / "status.json").read_text())


def temp_dirs(workdir: Path) -> list[Path]:
    return [p for p in (workdir / "workspace").rglob(".*tmp-*")]


def test_a_killed_run_resumes_without_redoing_finished_stages(tmp_path: Path) -> None:
    path, workdir = write(tmp_path, manifest("resume", iterations=1)), tmp_path / "w"
    # The test hooks hold rank 1 with its 8 prompts scored and nothing written; it is killed there.
    hooks = {"PYTHONPATH": f"{TESTS / 'hooks'}:{env_with_tests()['PYTHONPATH']}"}
    hold = {"IDPO_TEST_HOLD_AT": "rank:8", "IDPO_TEST_HOLD_UNTIL": str(tmp_path / "never")}
    proc = idpo("run", str(path), "--workdir", str(workdir), wait=False, **hooks, **hold)
    deadline = time.monotonic() + 600
    rank_log = workdir / "logs" / "iter-1-rank-0.log"
    while not (rank_log.exists() and "idpo-test-hold rank 8" in rank_log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "rank 1 was never held"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage process, mid-stage
    proc.wait()
    assert status(workdir)["phase"] == "Running"

    again = idpo("run", str(path), "--workdir", str(workdir))
    assert again.returncode == 0, again.stdout + again.stderr
    final = status(workdir)
    assert final["phase"] == "Succeeded" and final["latestCheckpoint"].endswith("iter-1/train/model")
    assert starts(workdir, "iter-1-generate") == 1  # finished before the kill: not redone
    assert starts(workdir, "iter-1-rank") == 2 and final["iterations"][0]["stages"]["rank"]["attempts"] == 2
    assert temp_dirs(workdir) == []
    rank = final["iterations"][0]["stages"]["rank"]["metrics"]
    assert rank["pairs"] + rank["dropped_ties"] == 8 and final["iterations"][0]["stages"]["train"]["metrics"]["steps"]

    table = idpo("status", "--workdir", str(workdir))
    assert table.returncode == 0 and "Succeeded — completed 1 iteration" in table.stdout
    assert "iter-1/train/model" in table.stdout.splitlines()[-1]

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final["latestCheckpoint"]).config.model_type == "mistral"


def test_a_failing_stage_stops_the_run_and_a_fixed_manifest_resumes_it(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    bad = manifest(
        "fix", iterations=1, ranking={"ranker": "function", "function": "rewards:not_a_number", "model": None}
    )
    proc = idpo("run", str(write(tmp_path, bad)), "--workdir", str(workdir))
    assert proc.returncode == 1
    assert "run failed: iteration 1 rank failed after 1 attempt(s)" in proc.stderr
    assert "'rewards:not_a_number' returned 'high', not a number" in proc.stderr
    failed = status(workdir)
    assert failed["phase"] == "Failed"
    assert {c["type"]: c["status"] for c in failed["conditions"]}["Stalled"] == "True"
    generated = workdir / "workspace" / "iter-1" / "generate" / "part-00000" / "_SUCCESS.json"
    before = generated.read_text()
    assert not (workdir / "workspace" / "iter-1" / "rank" / "part-00000").exists()

    bad["spec"]["ranking"]["function"] = "rewards:starts_with_s"
    fixed = idpo("run", str(write(tmp_path, bad)), "--workdir", str(workdir))
    assert fixed.returncode == 0, fixed.stderr
    assert status(workdir)["phase"] == "Succeeded"
    assert generated.read_text() == before and starts(workdir, "iter-1-generate") == 1


def test_an_invalid_manifest_is_rejected_before_anything_runs(tmp_path: Path) -> None:
    proc = idpo("run", str(write(tmp_path, manifest("bad", iterations=0))), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert "spec.iterations: Input should be greater than or equal to 1" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_an_evaluated_run_stops_early_on_a_plateau_and_reports_its_best_iteration(evaluated_run: Path) -> None:
    status = json.loads((evaluated_run / "status.json").read_text())  # tests.conftest.PLATEAU
    assert status["phase"] == "Succeeded" and status["earlyStop"]["iteration"] == 2
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "EarlyStopped"
    assert [it["iteration"] for it in status["iterations"]] == [0, 1, 2]  # iteration 3 never started
    assert not (evaluated_run / "workspace" / "iter-3").exists()
    evaluated = [it["stages"]["evaluate"]["metrics"] for it in status["iterations"][1:]]
    assert all(0 <= m["win_rate_vs_base"] <= 1 and len(m["win_rate_vs_base_ci"]) == 2 for m in evaluated)
    assert status["bestIteration"] in (1, 2) and status["bestCheckpoint"].endswith(
        f"iter-{status['bestIteration']}/train/model"
    )
    report = idpo("report", "--workdir", str(evaluated_run))
    assert report.returncode == 0 and "| 2 |" in report.stdout, report.stdout + report.stderr
    assert re.search(r"\n\| 2 \| \d+ \| 0\.\d+ → 0\.\d+ ", report.stdout)  # iteration 2's training curves

    page = evaluated_run.parent / "report.html"  # the format follows the extension
    assert idpo("report", "--workdir", str(evaluated_run), "-o", str(page)).returncode == 0
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "<h2>Training</h2>" in html
    assert html.count("data:image/png;base64,") == 2  # the evaluation plots, and the training curves


def test_a_prompt_file_too_small_for_a_held_out_set_is_refused_before_the_first_stage(tmp_path: Path) -> None:
    doc = manifest("small", iterations=5, prompts={"perIteration": 48}, evaluation={"enabled": True})
    ran = idpo("run", str(write(tmp_path, doc)), "--workdir", str(tmp_path / "w"))
    assert ran.returncode == 2, ran.stdout + ran.stderr
    message = ran.stderr.splitlines()[-1]
    assert "only 8 held-out prompts are left, fewer than evaluation.minPrompts=16" in message
    assert all(field in message for field in ("iterations", "prompts.perIteration", "evaluation.prompts"))
    assert not (tmp_path / "w" / "logs").exists() and not (tmp_path / "w" / "workspace").exists()


def test_idpo_run_trains_on_two_local_processes_through_the_jobs_torchrun_launcher(tmp_path: Path) -> None:
    doc = manifest("ddp", iterations=1, training={"distributed": {"processesPerNode": 2}})
    ran = idpo("run", str(write(tmp_path, doc)), "--workdir", str(tmp_path / "w"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    final = status(tmp_path / "w")
    train = final["iterations"][0]["stages"]["train"]["metrics"]
    # Two processes under torchrun (gloo on CPU: fsdp needs GPUs, so ddp), stepping together.
    assert train["world_size"] == 2 and train["strategy"] == "ddp" and len(set(train["rank_steps"])) == 1
    log = (tmp_path / "w" / "logs" / "iter-1-train-0.log").read_text()
    assert "idpo-train rank 1/2 step" in log

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final["latestCheckpoint"]).config.model_type == "mistral"


def test_runs_in_different_directories_share_one_build_of_the_tiny_models(tmp_path: Path, monkeypatch) -> None:
    from idpo_jobs.tiny import STOPPING_POLICY, tiny_cache
    from idpo_operator.local import LocalRunner
    from idpo_operator.spec import parse_manifest

    monkeypatch.setenv("IDPO_TINY_CACHE", str(tmp_path / "cache"))
    built = tiny_cache()
    assert built.parent == tmp_path / "cache" and len(built.name) == 12  # named after the builder's version
    (built / STOPPING_POLICY).mkdir(parents=True)
    (built / "_SUCCESS").touch()  # as a first run leaves it: nothing is built again
    specs = [LocalRunner(parse_manifest(manifest("cached")), tmp_path / w).spec for w in ("a", "b")]
    assert {s.model.name for s in specs} == {str(built / "policy")}
    assert {s.ranking.model for s in specs} == {str(built / "pairrm")}
    assert not any((tmp_path / w / "tiny").exists() for w in ("a", "b"))
