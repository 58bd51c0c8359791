"""Shared fixtures: tiny models built once per session, manifests and stage runs on them."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from idpo_jobs.config import StageConfig, Workspace
from idpo_operator import plan
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec

from tests.harness.tiny import tiny_models

if TYPE_CHECKING:
    from tests.harness.cluster import Target

# One intra-op thread in every torch process the suite starts (this one, its stage subprocesses and `idpo
# run`s, which inherit it): four workers share the machine, and torch's default of a thread per core then
# spins on an oversubscribed CPU (the e2e image sets the same: Dockerfile, target e2e).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).parent

TINY_SPEC: dict[str, Any] = {
    "model": {"name": "tiny://policy"},
    "prompts": {"source": "tiny://prompts.jsonl", "perIteration": 8},
    "iterations": 2,
    "generation": {
        "engine": "transformers",
        "responsesPerPrompt": 3,
        "temperature": 1.0,
        "maxNewTokens": 12,
        "batchSize": 8,
    },
    "ranking": {"ranker": "pairrm", "model": "tiny://pairrm", "batchSize": 8},
    # Off here, so each test runs only the stages it is about; the evaluation tests turn it on.
    "evaluation": {"enabled": False, "limit": 16, "maxNewTokens": 12},
    "training": {
        "beta": 0.1,
        "learningRate": 1e-3,
        "perDeviceBatchSize": 4,
        "gradientAccumulationSteps": 1,
        "maxLength": 64,
        "warmupRatio": 0.0,
        "scheduler": "constant",
        "gradientCheckpointing": False,
    },
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def manifest(name: str = "tiny-test", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "idpo.dev/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": name},
        "spec": merge(TINY_SPEC, spec),
    }


# -- parallel runs -------------------------------------------------------------------------------
# Under pytest-xdist (`-n N --dist loadgroup`, docs/testing.md) each worker is a process with its own
# session fixtures: its own control plane, MLflow server and tiny models. Tests that share a costlier
# fixture go to one worker so that it is built once: a module's tests when it has module-scoped
# fixtures (its cluster namespace with operator and seeded claim, its stage outputs), and the users of
# the session fixtures below. A module may set XDIST_SPLIT = K: its tests then form K groups, each of
# which builds the module's fixtures on its own worker.
SHARED_SESSION_FIXTURES = ("evaluated_run", "kueue", "judge_server")


def xdist_group(item: pytest.Item) -> str | None:
    """The group of a test that shares an expensive fixture with others, or None."""
    names = item.fixturenames
    shared = next((n for n in SHARED_SESSION_FIXTURES if n in names), None)
    if shared:
        return shared
    definitions = item._fixtureinfo.name2fixturedefs  # type: ignore[attr-defined]
    if any(defs[-1].scope == "module" for defs in definitions.values()):
        return item.module.__name__  # type: ignore[attr-defined]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, int] = {}
    for item in items:
        group = xdist_group(item)
        if group is None or item.get_closest_marker("xdist_group"):
            continue
        split = getattr(item.module, "XDIST_SPLIT", 1) if group == item.module.__name__ else 1  # type: ignore[attr-defined]
        if split > 1:
            seen[group] = seen.get(group, -1) + 1
            group = f"{group}-{seen[group] % split}"
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`, its units dealt longest first (tests/schedule.py)."""
    if config.getoption("dist") == "loadgroup":
        from tests.schedule import LongestFirst

        return LongestFirst(config, log)
    return None


@pytest.hookimpl(trylast=True)  # after xdist's, which names each grouped test `<id>@<group>` for its scheduler
def pytest_collection_finish(session: pytest.Session) -> None:
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist would not keep {lost[0]}'s group on one worker with pytest {pytest.__version__} "
            "(pytest-dev/pytest-xdist#1386): install the dev extra's pytest"
        )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The random order's seed at the end too: `-q` (the README's command) hides pytest-randomly's header."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"random order: -p randomly --randomly-seed={seed} repeats it")


def env_with_tests() -> dict[str, str]:
    """Stage subprocesses import test reward functions from tests/."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The cluster of the e2e and fault suites: a local control plane, or IDPO_E2E_KUBECONFIG's."""
    from tests.harness.cluster import open_target

    target = open_target(tmp_path_factory.mktemp("kube"))
    try:
        yield target
    finally:
        if target.plane is not None:
            target.plane.stop()


@pytest.fixture(scope="session")
def kueue(kube: Target) -> Target:
    """`kube`, with real Kueue answering: on the local control plane its manager is started once, on
    first use (`ControlPlane.start_kueue`); an `IDPO_E2E_KUBECONFIG` cluster is assumed to have Kueue
    installed, and the test skips if its CRDs are absent."""
    if kube.plane is not None:
        kube.plane.start_kueue()
        return kube
    from kubernetes import client, config

    api = client.ApiextensionsV1Api(config.new_client_from_config(str(kube.kubeconfig)))
    try:
        api.read_custom_resource_definition("workloads.kueue.x-k8s.io", _preload_content=False)
    except client.ApiException as err:
        if err.status != 404:
            raise
        pytest.skip(f"Kueue is not installed on {kube.kubeconfig}: no workloads.kueue.x-k8s.io CRD")
    return kube


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real MLflow tracking server on 127.0.0.1 (tests/harness/tracking.py), started once."""
    from tests.harness.tracking import TrackingServer

    server = TrackingServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


# An evaluated local run that plateaus: no iteration can beat the best before it by 0.5, so it stops
# after iteration 2 of 3 (patience 1), Succeeded with reason EarlyStopped. It reports to MLflow and
# TensorBoard; two pairs a step give each train stage several steps, points of the training curves.
PLATEAU = manifest(
    "plateau",
    iterations=3,
    evaluation={
        "enabled": True,
        "limit": 16,
        "stopWhen": {"metric": "lcWinRateVsBase", "minDelta": 0.5, "patience": 1},
    },
    ranking={"ranker": "function", "function": "rewards:starts_with_s", "model": None},
    training={"perDeviceBatchSize": 2},
)


@pytest.fixture(scope="session")
def evaluated_run(mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`idpo run` of PLATEAU, tracked in `mlflow_server`'s experiment `local`: its workdir, read by the
    local-run tests (early stop, report) and the tracking tests (MLflow, TensorBoard)."""
    import yaml

    root = tmp_path_factory.mktemp("evaluated")
    tracking = {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "local"}, "tensorboard": True}
    path = root / "plateau.yaml"
    path.write_text(yaml.safe_dump(merge(PLATEAU, {"spec": {"tracking": tracking}})))
    command = [sys.executable, "-m", "idpo_operator.cli", "run", str(path), "--workdir", str(root / "w")]
    ran = subprocess.run(command, env=env_with_tests(), capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return root / "w"


@pytest.fixture(scope="session")
def tiny() -> dict[str, Path]:
    """The tiny models (idpo_jobs.tiny.build_tiny), built once per machine into the versioned cache `idpo run`
    uses (tests.harness.tiny). Tests only read them."""
    from idpo_jobs.tiny import STOPPING_POLICY

    root = tiny_models()
    models = {name: root / name for name in ("policy", STOPPING_POLICY, "pairrm", "reward")}
    return models | {"prompts": root / "prompts.jsonl"}


def tiny_spec(tiny: dict[str, Path], **override: Any) -> IterativeDPORunSpec:
    spec = merge(TINY_SPEC, override)
    local = {
        "tiny://policy": tiny["policy"],
        "tiny://prompts.jsonl": tiny["prompts"],
        "tiny://pairrm": tiny["pairrm"],
    }
    for section, field in (("model", "name"), ("prompts", "source"), ("ranking", "model")):
        value = spec[section].get(field)
        if value in local:
            spec[section][field] = str(local[value])
    return IterativeDPORunSpec.model_validate(spec)


def write_config(
    spec: IterativeDPORunSpec, workspace: Path, key: StageKey, *, out_dir: Path | None = None, **fields: Any
) -> tuple[Path, StageConfig]:
    """The plan's config for `key` over `workspace` (inputs); outputs go to `out_dir` if given."""
    if out_dir is not None:
        fields["workspace"] = str(out_dir)
    config = plan.stage_config(spec, "t", Workspace(workspace), key).model_copy(update=fields)
    home = out_dir or workspace
    home.mkdir(parents=True, exist_ok=True)
    path = home / f"{key.stage.value}-{key.iteration}.json"
    config.dump(path)
    return path, config


def run_cli(stage: str, config: Path, shard: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"idpo_jobs.{stage}", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env_with_tests(), "JOB_COMPLETION_INDEX": str(shard), **env},
    )


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model trained to answer the judge templates (idpo_jobs.tiny.build_tiny_judge)."""
    from idpo_jobs.tiny import build_tiny_judge

    return build_tiny_judge(tmp_path_factory.mktemp("tiny-judge") / "judge")


@pytest.fixture(scope="session")
def judge_server(tiny_judge: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """vLLM's OpenAI server on 127.0.0.1 serving `tiny_judge` as `tiny-judge`, with log-probabilities and an
    API key (tests/harness/vllm_server.py), started once."""
    from tests.harness.vllm_server import VLLMServer

    server = VLLMServer(tiny_judge, tmp_path_factory.mktemp("vllm-judge"), api_key="test-judge-key").start()
    try:
        yield server
    finally:
        server.stop()
