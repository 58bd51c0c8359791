"""`idpo plan`: the recipe's memory plan fits the GPUs it asks for, and its rendered Jobs are what the
operator creates (train through torchrun with Kubeflow Trainer's PET_* environment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

RECIPE = Path(__file__).parents[1] / "examples" / "snorkel-mistral-pairrm.yaml"


def idpo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idpo_operator", *args], capture_output=True, text=True, timeout=60)


def test_the_recipe_fits_its_gpus_under_fsdp_and_plan_says_so() -> None:
    shown = idpo("plan", str(RECIPE), "--strict")
    assert shown.returncode == 0, shown.stderr
    train = shown.stdout[shown.stdout.index("train (fsdp, 8 processes") :].split("\ntrain (ddp")[0]
    assert "total: fits 80 GB" in train
    assert "does NOT fit" in shown.stdout.split("train (ddp")[1]  # the comparison: DDP could not


def test_strict_refuses_a_plan_that_does_not_fit() -> None:
    shown = idpo("plan", str(RECIPE), "--strict", "--gpu-memory", "24")
    assert shown.returncode == 1 and "warning: train (fsdp" in shown.stderr


def test_the_rendered_train_job_launches_torchrun_with_one_process_per_gpu() -> None:
    rendered = idpo("plan", str(RECIPE), "-o", "yaml")
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Job", "Job", "Job"]
    (train,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].endswith("-i1-train")]
    container = train["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["command"][:6] == ["python", "-I", "-u", "-m", "idpo_jobs.distributed", "train"]
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_MASTER_PORT"]) == ("1", "8", "29500")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    rank = next(e for e in container["env"] if e["name"] == "PET_NODE_RANK")
    assert (
        rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_two_nodes_render_a_gang_with_its_headless_service(tmp_path: Path) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["spec"]["training"]["distributed"]["nodes"] = 2
    recipe["spec"]["storage"]["accessModes"] = ["ReadWriteMany"]
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(recipe))
    docs = list(yaml.safe_load_all(idpo("plan", str(path), "-o", "yaml").stdout))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Job", "Job", "Service", "Job"]
    service, train = docs[-2], docs[-1]
    name = train["metadata"]["name"]
    assert train["spec"]["completions"] == train["spec"]["parallelism"] == 2
    assert train["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["PET_NNODES"], env["PET_MASTER_ADDR"]) == ("2", f"{name}-0.{service['metadata']['name']}")
    shown = idpo("plan", str(path), "--strict")  # 16 GPUs: the sharded state halves again
    assert shown.returncode == 0 and "train (fsdp, 16 processes (2 nodes x 8)" in shown.stdout
