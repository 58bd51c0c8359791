"""Resume inside a stage, on the real control plane: a stage pod deleted mid-way (as a lost node ends it)
is retried by the Job controller, and the new pod goes on from what the first one finished, on the claim.

The stages run with `tests/hooks/sitecustomize.py` in their image (the suite's stage image), which
holds the stage where the test deletes its pod (a checkpoint or chunk written, the next one not) until
the test releases the next attempt, and logs the work every attempt did: how fast the machine is
decides nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from idpo_operator.resources import ANNOTATION_CONFIG, VOLUME_MOUNT

from tests.harness.cluster import MARKERS_DIR, Cluster, Hold, Target, hooked
from tests.test_operator_e2e import (
    CLAIM,
    SPEC,
    delete_runs_afterwards,  # noqa: F401  (autouse: the e2e module's, here too)
    on_volume,
    run_manifest,
    stage,
)

pytestmark = pytest.mark.slow
# Resumed and uninterrupted runs on CPU with fixed seeds: measured bit-identical (max |difference| 0.0).
WEIGHT_TOLERANCE = 1e-6

# Runs the stage of `config` (a Job's, moved to another workspace) once more, uninterrupted, and writes
# to the termination log what a test compares: the output it published, and the progress each attempt of
# the killed stage logged.
RERUN_AND_COMPARE = """
import json, pathlib, subprocess, sys
stage, config, ours, log = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])
path = pathlib.Path("/tmp/config.json")
path.write_text(json.dumps(config))
command = [sys.executable, "-m", f"idpo_jobs.{stage}", "--config", str(path)]
done = subprocess.run(command, capture_output=True, text=True)
assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
theirs = pathlib.Path("/workspace") / config["workspace"] / "iter-1" / stage
if stage == "train":
    from transformers import AutoModelForCausalLM
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (ours, theirs / "model"))
    result = {"difference": max(float((a[k] - b[k]).abs().max()) for k in a)}
else:
    mine = pathlib.Path(ours) / "generations.jsonl"
    result = {"identical": mine.read_text() == (theirs / "part-00000" / "generations.jsonl").read_text()}
attempts = {}
for line in log.read_text().splitlines():
    name, pid, count, _ = line.split()
    if name == stage:
        attempts.setdefault(pid, []).append(int(count))
result["attempts"] = list(attempts.values())
pathlib.Path("/dev/termination-log").write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory):
    with Cluster(kube, tmp_path_factory.mktemp("resume"), "resume") as c:
        c.seed(CLAIM)
        yield c


def delete_pod_when_logged(cluster: Cluster, job: str, text: str, timeout: float = 180) -> str:
    """Delete the running pod of `job` once its log shows `text`, as a lost node would end it."""
    name = cluster.pod_that_logged(job, text, timeout)
    cluster.core.delete_namespaced_pod(name, cluster.namespace)
    return name


def generate_phase(status: dict[str, Any]) -> str | None:
    iterations = [it for it in status.get("iterations", []) if it["iteration"] == 1]
    return iterations[0]["stages"].get("generate", {}).get("phase") if iterations else None


def rerun_uninterrupted(
    cluster: Cluster, run: str, job: str, ours: str, log: str, section: str, **changes: Any
) -> dict[str, Any]:
    """The stage of `job` run again from its own config (with `changes` to its `section`) into a fresh
    workspace, and compared with `ours`."""
    (found,) = [j for j in cluster.jobs(run) if j["metadata"]["name"] == job]
    config = json.loads(found["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG])
    config |= {"workspace": f"reference/{uuid.uuid4().hex[:8]}", "terminationLog": "/tmp/summary.json"}
    config[section] |= changes
    stage_name = config["stage"]
    done, message = cluster.run_job(
        ["-c", RERUN_AND_COMPARE, stage_name, json.dumps(config), ours, log], claim=CLAIM, timeout=240
    )
    assert done, message
    return json.loads(message)


def held_run(name: str, log: str, hold: Hold, **spec: Any) -> dict[str, Any]:
    """One iteration on 16 prompts whose stages log their progress to `log` (the test hooks), one of them
    held by `hold`."""
    runtime = hooked(SPEC["runtime"]["env"], IDPO_TEST_PROGRESS_LOG=log, **hold.env)
    return run_manifest(name, iterations=1, prompts={"perIteration": 16}, runtime=runtime, **spec)


def test_a_train_pod_lost_after_its_second_checkpoint_resumes_there(cluster: Cluster) -> None:
    log = f"{MARKERS_DIR}/{uuid.uuid4().hex}.log"
    hold = cluster.hold("train", 5)  # step 4's checkpoint is published before step 5 reports
    training = {"perDeviceBatchSize": 1, "checkpointEverySteps": 2}  # 16 pairs: 16 steps, 7 checkpoints
    assert cluster.apply(held_run("resumed", log, hold, training=training)).returncode == 0
    deleted = delete_pod_when_logged(cluster, "resumed-i1-train", hold.line)
    cluster.release(hold, CLAIM)

    status = cluster.wait_phase("resumed", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    train = stage(status, 1, "train")
    metrics = train["metrics"]
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 16, metrics  # the second checkpoint
    assert metrics["steps_executed"] == 16 - metrics["resumed_from_step"]
    # The Job controller's replacement pod: the deleted one is gone from the API.
    assert train["attempts"] == 2 and deleted not in {p["metadata"]["name"] for p in cluster.pods("resumed-i1-train")}

    compared = rerun_uninterrupted(
        cluster, "resumed", "resumed-i1-train", on_volume(status), log, "training", checkpointEverySteps=None
    )
    first, second = compared["attempts"]
    print(f"train: steps {len(first)} + {len(second)}; max |weight difference| {compared['difference']}")
    assert len(second) == metrics["steps_executed"] and len(first) + len(second) < 1.5 * 16
    assert compared["difference"] <= WEIGHT_TOLERANCE  # it loads, and it is the uninterrupted run's model


def test_a_generate_pod_lost_mid_way_generates_only_its_unfinished_chunks_again(cluster: Cluster) -> None:
    log = f"{MARKERS_DIR}/{uuid.uuid4().hex}.log"
    # 16 prompts: 8 chunks of one batch each. Held at 8 done: 3 chunks written, the 4th generated, not written.
    hold = cluster.hold("generate", 8)
    generation = {"batchSize": 2, "chunkPrompts": 2}
    # Its rank refuses the first score (bad input, not retried): no rank or train runs on after generate.
    ranking = {"ranker": "function", "function": "rewards:not_a_number", "model": None}
    assert cluster.apply(held_run("regenerated", log, hold, generation=generation, ranking=ranking)).returncode == 0
    delete_pod_when_logged(cluster, "regenerated-i1-generate", hold.line)
    cluster.release(hold, CLAIM)

    status = cluster.wait("regenerated", lambda s: generate_phase(s) in ("Succeeded", "Failed"))
    generate = stage(status, 1, "generate")
    assert generate["phase"] == "Succeeded" and generate["attempts"] == 2, generate
    metrics = generate["metrics"]
    assert metrics["prompts"] == 16 and metrics["resumed_prompts"] == 6, metrics

    uid = cluster.run("regenerated")["metadata"]["uid"]
    ours = f"{VOLUME_MOUNT}/idpo/regenerated-{uid[:8]}/iter-1/generate/part-00000"
    # In one chunk: chunks of whole batches with seeds from positions change nothing in what is sampled.
    compared = rerun_uninterrupted(
        cluster, "regenerated", "regenerated-i1-generate", ours, log, "generation", chunkPrompts=256
    )
    first, second = compared["attempts"]
    generated_again = max(first) - metrics["resumed_prompts"]  # progress counts prompts from the shard's start
    print(f"generate: {metrics['resumed_prompts']} prompts resumed, {generated_again} generated again, of 16")
    assert generated_again < 16 and min(second) == metrics["resumed_prompts"] + 2
    assert compared["identical"]  # skipped chunks and new ones: what one uninterrupted attempt generates


def test_a_full_volume_fails_the_stage_as_volume_full_naming_the_claim(cluster: Cluster) -> None:
    env = [
        *SPEC["runtime"]["env"],
        {"name": "IDPO_TEST_ENOSPC", "value": "generations.jsonl"},  # the write of generate's output fails
    ]
    assert cluster.apply(run_manifest("full", iterations=1, runtime={"env": env})).returncode == 0
    status = cluster.wait_phase("full", "Failed")
    generate = stage(status, 1, "generate")
    assert f"volume full: claim {CLAIM} (" in status["message"] and "No space left on device" in status["message"]
    assert generate["phase"] == "Failed" and generate["reason"] == "VolumeFull"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Stalled"] == "VolumeFull"
    assert generate["attempts"] == 1 and len(cluster.pods("full-i1-generate")) == 1  # the next would fill it again
