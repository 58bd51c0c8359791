"""A stage process ignores the environment that would change what Python runs (issue 30, class 1, in depth):
started as a Job starts it (`python -I -u -m ...`), the payloads a run's env could carry never execute,
even where a policy let the names through; torchrun's workers get the same flags; the variables no stage
honours are gone before anything else runs. The policy side (names refused at admission and by the
operator) is tests/test_policy.py and tests/test_security.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from idpo_jobs.config import Stage
from idpo_operator import resources
from idpo_operator.plan import StageKey

G1 = StageKey(1, Stage.GENERATE)


def hostile_env(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    """Two ways into every Python process of a pod, each leaving its own marker: the warnings filter that
    imports `antigravity`, which opens $BROWSER (a shell command), and a sitecustomize on PYTHONPATH.
    Returns the environment and the markers."""
    markers = [tmp_path / name for name in ("browser", "sitecustomize")]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"open({str(markers[1])!r}, 'w').close()\n")
    env = {
        "PYTHONWARNINGS": "ignore::antigravity.X",
        "BROWSER": f"sh -c 'touch {markers[0]}' %s",
        "PYTHONPATH": str(site),
    }
    return env, markers


def run(command: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        command, env={**clean, **env, **extra}, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_the_payloads_run_in_a_plain_interpreter(tmp_path: Path) -> None:
    """The control: each payload is live, so the tests below show isolation, not a broken payload."""
    env, markers = hostile_env(tmp_path)
    run([sys.executable, "-c", "pass"], env)
    assert [m.exists() for m in markers] == [True, True]


@pytest.mark.parametrize("stage", [Stage.GENERATE, Stage.RANK, Stage.TRAIN, Stage.EVALUATE])
def test_a_stage_started_as_its_job_starts_it_runs_none_of_them(tmp_path: Path, stage: Stage) -> None:
    env, markers = hostile_env(tmp_path)
    command = resources.stage_command(stage, str(tmp_path / "missing.json"), sys.executable)
    proc = run(command, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # bad input: no config; the interpreter started
    assert [m.exists() for m in markers] == [False, False]


def test_torchruns_workers_are_isolated_too(tmp_path: Path) -> None:
    env, markers = hostile_env(tmp_path)
    command = resources.stage_command(Stage.TRAIN, str(tmp_path / "missing.json"), sys.executable)
    proc = run(command, env, PET_NPROC_PER_NODE="2", PET_NNODES="1", PET_MASTER_ADDR="127.0.0.1")
    assert "rank 0 exited with 2" in proc.stderr and proc.returncode == 2, proc.stderr[-3000:]
    assert [m.exists() for m in markers] == [False, False]
    script = (
        "from idpo_jobs.distributed import torchrun_args; print(torchrun_args('idpo_jobs.train', ['--config', 'c']))"
    )
    args = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True).stdout
    assert args.strip() == str(["--max-restarts", "0", "--no-python", sys.executable, "-I", "-u", "-m",
                                "idpo_jobs.train", "--config", "c"])  # fmt: skip


def test_what_no_stage_honours_is_removed_before_anything_runs(tmp_path: Path) -> None:
    script = (
        "import os, sys; from idpo_jobs import contract; removed = contract.isolate_environment(); "
        "print(sorted(removed), sorted(k for k in os.environ if k.startswith(('PYTHON', 'TORCH_FORCE'))))"
    )
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONBREAKPOINT": "os.system", "PYTHONUNBUFFERED": "1"}
    isolated = run([sys.executable, "-I", "-c", script], env).stdout.strip()
    assert isolated == "['PYTHONBREAKPOINT', 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] ['PYTHONUNBUFFERED']"
    # `idpo run`'s environment is the user's own: PYTHONPATH (a function ranker's module) keeps working.
    local = run([sys.executable, "-c", script], env).stdout.strip()
    assert local == "['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] ['PYTHONBREAKPOINT', 'PYTHONUNBUFFERED']"


@pytest.mark.slow
def test_vllms_engine_processes_run_none_of_them(tiny, tmp_path: Path) -> None:
    """vLLM starts its engine core and workers as processes of their own: they neither run the payload."""
    from tests.conftest import tiny_spec, write_config
    from tests.test_vllm import VLLM

    config, _ = write_config(tiny_spec(tiny, prompts={"perIteration": 4}, generation=VLLM), tmp_path / "w", G1)
    env, markers = hostile_env(tmp_path)
    proc = run(resources.stage_command(Stage.GENERATE, str(config), sys.executable), env, JOB_COMPLETION_INDEX="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"engine": "vllm"' in proc.stdout  # the stage's last line: its metrics
    assert [m.exists() for m in markers] == [False, False]
