"""Stages killed mid-way resume where they stopped: the stage CLIs on tiny models, killed with SIGKILL
(as a lost node or an OOM kill ends a pod) and run again, as the Job's next attempt would be.

`tests/hooks/sitecustomize.py` slows progress down (so that a kill lands mid-way), counts the work each
attempt did, and kills at a precise point on request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs.config import Stage
from idpo_operator.plan import StageKey

from tests.conftest import TESTS, env_with_tests, read_json, run_cli, tiny_spec, write_config

pytestmark = pytest.mark.slow
G1, R1, T1 = StageKey(1, Stage.GENERATE), StageKey(1, Stage.RANK), StageKey(1, Stage.TRAIN)
PROMPTS = {"perIteration": 16}
# One pair per step: 16 steps, a checkpoint every 2 (none at the last): 7 checkpoints.
TRAINING = {"perDeviceBatchSize": 1, "checkpointEverySteps": 2}
# Resumed and uninterrupted runs on CPU with fixed seeds: measured max |difference| 0.0 (bit-identical);
# the bound leaves room for a kernel that sums in another order.
WEIGHT_TOLERANCE = 1e-6


def hooks_env(**env: str) -> dict[str, str]:
    base = env_with_tests()
    return {**base, "PYTHONPATH": f"{TESTS / 'hooks'}:{base['PYTHONPATH']}", "JOB_COMPLETION_INDEX": "0", **env}


def start(stage: str, config: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"idpo_jobs.{stage}", "--config", str(config)],
        env=hooks_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_when(proc: subprocess.Popen[str], appears: Path, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `appears` exists."""
    deadline = time.monotonic() + timeout
    while not appears.exists():
        assert proc.poll() is None, f"ended before {appears} appeared: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {appears}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def progress(log: Path) -> dict[int, list[int]]:
    """Per process (attempt), the `done` counts it reported, in order."""
    found: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        _, pid, done, _ = line.split()
        found.setdefault(int(pid), []).append(int(done))
    return found


def max_difference(a: Path, b: Path) -> float:
    from transformers import AutoModelForCausalLM

    ours, theirs = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b))
    pairs = zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True)
    return max(float((x - y).abs().max()) for x, y in pairs)


@pytest.fixture(scope="module")
def ranked(tiny, tmp_path_factory) -> Path:
    """Iteration 1 generated and ranked: 16 prompts, 16 pairs."""
    ws = tmp_path_factory.mktemp("ws")
    for key in (G1, R1):
        config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS), ws, key)
        ok(run_cli(key.stage.value, config))
    return ws


@pytest.fixture(scope="module")
def uninterrupted(tiny, ranked, tmp_path_factory) -> Path:
    """The model of a train stage that ran once, without checkpoints."""
    out = tmp_path_factory.mktemp("uninterrupted")
    training = {**TRAINING, "checkpointEverySteps": None}
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, training=training), ranked, T1, out_dir=out)
    ok(run_cli("train", config))
    assert read_json(out / "iter-1" / "train" / "_SUCCESS.json")["metrics"]["steps"] == 16
    return out / "iter-1" / "train" / "model"


def train_config(tiny, ranked: Path, out: Path) -> Path:
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, training=TRAINING), ranked, T1, out_dir=out)
    return config


def test_a_train_stage_killed_after_its_second_checkpoint_resumes_there(tiny, ranked, uninterrupted, tmp_path) -> None:
    config, log = train_config(tiny, ranked, tmp_path), tmp_path / "progress.log"
    work = tmp_path / "iter-1" / ".train.work"
    first = start("train", config, IDPO_TEST_PROGRESS_DELAY="0.3", IDPO_TEST_PROGRESS_LOG=str(log))
    kill_when(first, work / "checkpoint-4" / "_SUCCESS.json")
    assert first.returncode == -signal.SIGKILL

    again = subprocess.run(first.args, env=hooks_env(IDPO_TEST_PROGRESS_LOG=str(log)), capture_output=True, text=True)
    ok(again)
    assert f"resuming from {work / 'checkpoint-4'} (step 4)" in again.stdout
    metrics = read_json(tmp_path / "iter-1" / "train" / "_SUCCESS.json")["metrics"]
    assert metrics["resumed_from_step"] == 4 and metrics["steps_executed"] == 12 and metrics["steps"] == 16
    steps = progress(log)
    assert len(steps) == 2 and sum(map(len, steps.values())) < 1.5 * 16, steps  # every step each attempt ran
    difference = max_difference(tmp_path / "iter-1" / "train" / "model", uninterrupted)
    print(f"resumed vs uninterrupted: max |weight difference| {difference}")
    assert difference <= WEIGHT_TOLERANCE
    assert [p.name for p in (tmp_path / "iter-1").iterdir()] == ["train"]  # the work directory is gone
    assert sorted(p.name for p in (tmp_path / "iter-1" / "train").iterdir()) == ["_SUCCESS.json", "model"]


def test_a_train_stage_killed_during_a_save_resumes_from_the_checkpoint_before(
    tiny, ranked, uninterrupted, tmp_path
) -> None:
    config = train_config(tiny, ranked, tmp_path)
    work = tmp_path / "iter-1" / ".train.work"
    killed = run_cli("train", config, **hooks_env(IDPO_TEST_KILL_AT="save:checkpoint-6"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    partial = work / ".staging" / "checkpoint-6"
    assert (partial / "model.safetensors").exists() and not (partial / "optimizer.pt").exists()
    assert sorted(p.name for p in work.iterdir()) == [".staging", "checkpoint-4"]

    again = run_cli("train", config, **hooks_env())
    ok(again)
    assert f"removing {work / '.staging'}" in again.stdout
    assert read_json(tmp_path / "iter-1" / "train" / "_SUCCESS.json")["metrics"]["resumed_from_step"] == 4
    assert max_difference(tmp_path / "iter-1" / "train" / "model", uninterrupted) <= WEIGHT_TOLERANCE
    assert [p.name for p in (tmp_path / "iter-1").iterdir()] == ["train"]


GENERATION = {"batchSize": 2, "chunkPrompts": 2}  # 8 chunks of one batch each


@pytest.fixture(scope="module")
def generated_at_once(tiny, tmp_path_factory) -> Path:
    """The shard's generations from one attempt, in a single chunk."""
    ws = tmp_path_factory.mktemp("at-once")
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, generation={"batchSize": 2}), ws, G1)
    ok(run_cli("generate", config))
    return ws / "iter-1" / "generate" / "part-00000" / "generations.jsonl"


def test_a_generate_shard_killed_mid_way_generates_only_its_unfinished_chunks_again(
    tiny, generated_at_once, tmp_path
) -> None:
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, generation=GENERATION), tmp_path, G1)
    log, part = tmp_path / "progress.log", tmp_path / "iter-1" / "generate" / "part-00000"
    first = start("generate", config, IDPO_TEST_PROGRESS_DELAY="0.3", IDPO_TEST_PROGRESS_LOG=str(log))
    kill_when(first, tmp_path / "iter-1" / "generate" / ".part-00000.work" / "chunk-00002" / "_SUCCESS.json")

    ok(run_cli("generate", config, **hooks_env(IDPO_TEST_PROGRESS_LOG=str(log))))
    metrics = read_json(part / "_SUCCESS.json")["metrics"]
    (killed, resumed) = progress(log).values()
    generated_again = max(killed) - metrics["resumed_prompts"]  # `done` counts prompts from the shard's start
    print(f"generate: {metrics['resumed_prompts']} prompts resumed, {generated_again} generated again, of 16")
    assert metrics["resumed_prompts"] >= 6 and metrics["prompts"] == 16 and generated_again < 16
    assert min(resumed) == metrics["resumed_prompts"] + 2  # it started at the first unfinished chunk
    # Chunks aligned with batches and seeds from positions: what it skipped, and what it generated, are
    # what one attempt in one chunk generates.
    assert (part / "generations.jsonl").read_text() == generated_at_once.read_text()
    assert [p.name for p in part.parent.iterdir()] == ["part-00000"]


def test_a_rank_shard_killed_before_a_chunks_marker_scores_that_chunk_again(tiny, ranked, tmp_path) -> None:
    ranking: dict[str, Any] = {"ranker": "function", "function": "rewards:starts_with_s", "model": None}
    chunked = {**ranking, "batchSize": 2, "chunkPrompts": 2}
    once, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, ranking=ranking), ranked, R1, out_dir=tmp_path / "once")
    ok(run_cli("rank", once))
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, ranking=chunked), ranked, R1, out_dir=tmp_path / "ws")
    killed = run_cli("rank", config, **hooks_env(IDPO_TEST_KILL_AT="marker:chunk-00002"))
    assert killed.returncode == -signal.SIGKILL
    ok(run_cli("rank", config, **hooks_env()))
    part = tmp_path / "ws" / "iter-1" / "rank" / "part-00000"
    metrics = read_json(part / "_SUCCESS.json")["metrics"]
    assert metrics["resumed_prompts"] == 4 and metrics["prompts"] == 16
    reference = read_json(tmp_path / "once" / "iter-1" / "rank" / "part-00000" / "_SUCCESS.json")["metrics"]
    assert {**metrics, "resumed_prompts": 0} == reference
    once_pairs = (tmp_path / "once" / "iter-1" / "rank" / "part-00000" / "pairs.jsonl").read_text()
    assert (part / "pairs.jsonl").read_text() == once_pairs


def test_a_full_volume_fails_the_stage_with_volume_full_and_exit_28(tiny, ranked, tmp_path) -> None:
    ranking = {"ranker": "function", "function": "rewards:starts_with_s", "model": None}
    term = tmp_path / "term"
    config, _ = write_config(
        tiny_spec(tiny, prompts=PROMPTS, ranking=ranking), ranked, R1, out_dir=tmp_path, termination_log=str(term)
    )
    proc = run_cli("rank", config, **hooks_env(IDPO_TEST_ENOSPC="rows.jsonl", IDPO_PVC_CLAIM="models"))
    assert proc.returncode == 28, proc.stderr[-3000:]
    summary = json.loads(term.read_text())
    assert summary["reason"] == "VolumeFull" and summary["error"].startswith("volume full: claim models (")
    assert "rows.jsonl: No space left on device" in summary["error"]
    assert [p.name for p in (tmp_path / "iter-1" / "rank").iterdir()] == [".part-00000.work"]  # no output, no temp
