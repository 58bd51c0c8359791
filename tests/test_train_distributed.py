"""The train stage on two CPU processes through the real launcher and torchrun (gloo).

What the stage must keep under torchrun: the weights one process would train (DDP averages the
ranks' gradients), one writer (rank 0 publishes a plain checkpoint, after every rank finished, with no
temporary directory left), and exit statuses that mean the same as a single process's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs import distributed
from idpo_jobs.config import Stage, TrainingSpec
from idpo_operator.plan import StageKey
from pydantic import ValidationError

from tests.conftest import TESTS, env_with_tests, read_json, run_cli, tiny_spec, write_config

pytestmark = pytest.mark.slow
G1, R1, T1 = StageKey(1, Stage.GENERATE), StageKey(1, Stage.RANK), StageKey(1, Stage.TRAIN)
# Eight pairs: two optimizer steps of four pairs, as one process of batch 4 or two ranks of batch 2.
BATCH4 = {"perDeviceBatchSize": 4}
BATCH2_DDP = {"perDeviceBatchSize": 2, "distributed": {"strategy": "ddp"}}

# accelerate 1.15 enables FSDP only on accelerators: on CPU it ignores the plugin and runs DDP (the
# stage says so and reports `ddp`). FSDP2 itself runs on CPU with gloo, so this makes accelerate honour
# the plugin, to run everything else for real: our FSDP settings, accelerate's FSDP2 wrapping, TRL's
# FSDP paths, the sharded optimizer step and the FULL_STATE_DICT gather at save.
FORCE_FSDP_ON_CPU = """
import os

if "RANK" in os.environ:
    import accelerate.accelerator
    import accelerate.state as state
    import idpo_jobs.distributed

    init = state.AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            # every later AcceleratorState() copies PartialState's fields back in: change both
            state.PartialState._shared_state["distributed_type"] = state.DistributedType.FSDP
            self.distributed_type = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init_with_fsdp_on_cpu
    idpo_jobs.distributed.effective_strategy = lambda strategy, world_size, cuda: strategy
    prepare = accelerate.accelerator.fsdp2_prepare_model

    def prepare_and_report(accelerator, model):
        from torch.distributed.fsdp import FSDPModule

        import os

        model = prepare(accelerator, model)
        units = " ".join(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
        # A file per rank: the ranks' stdout lines can interleave mid-line through torchrun.
        with open(f"{os.environ['FSDP_UNITS']}-{os.environ['RANK']}", "w") as report:
            report.write(units)
        return model

    accelerate.accelerator.fsdp2_prepare_model = prepare_and_report
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, processes: int = 2, timeout: int = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """The Job's command with Kubeflow Trainer's environment for one node of `processes` ranks."""
    pet = {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": str(processes),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(free_port()),
    }
    return subprocess.run(
        [sys.executable, "-m", "idpo_jobs.distributed", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env_with_tests(), **pet, **env},
    )


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def update(model_dir: Path, base: Path) -> Any:
    """What training changed: the checkpoint's weights minus the base's, as one vector."""
    import torch
    from transformers import AutoModelForCausalLM

    def flat(path: Path) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(path).parameters()])

    return flat(model_dir) - flat(base)


def relative_difference(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


def train(tiny, ranked: Path, out: Path, training: dict[str, Any], processes: int, **env: str) -> Path:
    config, _ = write_config(tiny_spec(tiny, training=training), ranked, T1, out_dir=out)
    ok(launch(config, processes, **env))
    return out / "iter-1" / "train"


@pytest.fixture(scope="module")
def ranked(tiny, tmp_path_factory) -> Path:
    """Iteration 1 generated and ranked: eight prompts, so at most eight pairs."""
    ws = tmp_path_factory.mktemp("ws")
    for key in (G1, R1):
        config, _ = write_config(tiny_spec(tiny), ws, key)
        ok(run_cli(key.stage.value, config))
    return ws


@pytest.fixture(scope="module")
def ddp(tiny, ranked, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("ddp")
    config, _ = write_config(tiny_spec(tiny, training=BATCH2_DDP), ranked, T1, out_dir=out)
    proc = launch(config)
    ok(proc)
    return config, proc


@pytest.fixture(scope="module")
def single(tiny, ranked, tmp_path_factory) -> Path:
    """One process: the Job's command with a world of one, which trains in the launcher's own process."""
    out = tmp_path_factory.mktemp("single")
    config, _ = write_config(tiny_spec(tiny, training=BATCH4), ranked, T1, out_dir=out)
    # torchrun would retry this address for many minutes; a plain process never looks it up.
    ok(launch(config, processes=1, timeout=600, PET_MASTER_ADDR="no-such-host.invalid"))
    return out / "iter-1" / "train"


def test_pairs_fill_two_steps(ranked: Path) -> None:
    pairs = (ranked / "iter-1" / "rank" / "part-00000" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 8  # the weight comparisons below assume two full steps


def test_both_ranks_step_and_rank_zero_alone_publishes(ddp) -> None:
    config, proc = ddp
    out = config.parent / "iter-1"
    assert "idpo-train rank 0/2 step 2" in proc.stdout and "idpo-train rank 1/2 step 2" in proc.stdout
    metrics = read_json(out / "train" / "_SUCCESS.json")["metrics"]
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp" and metrics["rank_steps"] == [2, 2]
    assert [p.name for p in out.iterdir()] == ["train"]  # no `.train.tmp-*` beside it
    assert sorted(p.name for p in (out / "train").iterdir()) == ["_SUCCESS.json", "model"]
    assert proc.stdout.count('"stage": "train"') == 1  # one summary line: rank 0's
    assert "idpo-progress" in proc.stdout


def test_two_ddp_ranks_train_the_weights_one_process_trains_with_twice_the_batch(tiny, ddp, single) -> None:
    config, _ = ddp
    ours = update(config.parent / "iter-1" / "train" / "model", tiny["policy"])
    theirs = update(single / "model", tiny["policy"])
    assert theirs.abs().max() > 1e-4  # it trained
    # Ranks that did not average their gradients would each follow half the data: a difference of
    # the order of the update itself (measured: 0.86 between batch 2 and batch 4 on one process).
    assert relative_difference(ours, theirs) < 1e-2


def test_rerunning_a_finished_distributed_stage_releases_every_rank_at_once(ddp) -> None:
    config, _ = ddp
    before = (config.parent / "iter-1" / "train" / "_SUCCESS.json").read_text()
    proc = launch(config)
    ok(proc)
    assert "nothing to do" in proc.stdout and "idpo-train rank" not in proc.stdout
    assert (config.parent / "iter-1" / "train" / "_SUCCESS.json").read_text() == before


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-sharded", "reference-precomputed"])
def test_fsdp2_full_shard_wraps_each_decoder_layer_and_trains_what_ddp_trains(
    tiny, ranked, ddp, tmp_path, precompute: bool
) -> None:
    from transformers import AutoModelForCausalLM

    (tmp_path / "force").mkdir()
    (tmp_path / "force" / "sitecustomize.py").write_text(FORCE_FSDP_ON_CPU)
    path = f"{tmp_path / 'force'}:{env_with_tests()['PYTHONPATH']}"
    training = {"perDeviceBatchSize": 2, "precomputeRefLogProbs": precompute}
    config, _ = write_config(tiny_spec(tiny, training=training), ranked, T1, out_dir=tmp_path)
    proc = launch(config, PYTHONPATH=path, FSDP_UNITS=str(tmp_path / "units"))
    ok(proc)
    units = [p.read_text().split() for p in sorted(tmp_path.glob("units-*"))]
    assert len(units) == 2 and all(u.count("FSDPMistralDecoderLayer") == 2 for u in units)  # a unit per layer
    stage = tmp_path / "iter-1" / "train"
    assert read_json(stage / "_SUCCESS.json")["metrics"]["strategy"] == "fsdp"
    assert sorted(p.name for p in stage.iterdir()) == ["_SUCCESS.json", "model"]
    model = AutoModelForCausalLM.from_pretrained(stage / "model")  # gathered: full tensors, not shards
    assert model.model.layers[0].mlp.up_proj.weight.shape == (192, 64)
    ddp_update = update(ddp[0].parent / "iter-1" / "train" / "model", tiny["policy"])
    assert relative_difference(update(stage / "model", tiny["policy"]), ddp_update) < 1e-2


def test_lora_with_a_precomputed_initial_reference_merges_on_rank_zero(tiny, ranked, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    training = {
        **BATCH2_DDP,
        "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        "referencePolicy": "initial",
        "precomputeRefLogProbs": True,  # TRL writes the log-probs on rank 0; every rank reads them back
    }
    stage = train(tiny, ranked, tmp_path, training, processes=2)
    assert sorted(p.name for p in stage.iterdir()) == ["_SUCCESS.json", "model"]  # the shared pairs are gone
    assert not (stage / "model" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(stage / "model")
    assert update(stage / "model", tiny["policy"]).abs().max() > 0


def test_bad_input_exits_2_through_torchrun_and_rank_zero_reports_it(tiny, tmp_path) -> None:
    config, _ = write_config(tiny_spec(tiny), tmp_path, T1, termination_log=str(tmp_path / "term"))
    proc = launch(config)  # no rank stage in tmp_path
    assert proc.returncode == 2, proc.stderr[-3000:]  # not torchrun's 1: the Job must not retry it
    assert (tmp_path / "term").exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "input stage 'rank' is incomplete" in json.loads((tmp_path / "term").read_text())["error"]
    assert list((tmp_path / "iter-1").iterdir()) == []  # the temporary directory is gone too


# Rank 0 is slower to look at its input than rank 1 (here: forever), so torchrun stops it with its temporary
# output in place and nothing reported.
RANK_ZERO_NEVER_REPORTS = """
import os, time
if os.environ.get("RANK") == "0":
    from idpo_jobs import contract
    contract.require_input = lambda *args: time.sleep(3600)
"""


def test_a_rank_that_fails_first_is_reported_by_the_launcher_when_rank_zero_could_not(tiny, tmp_path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RANK_ZERO_NEVER_REPORTS)
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{env_with_tests()['PYTHONPATH']}"}
    config, _ = write_config(tiny_spec(tiny), tmp_path, T1, termination_log=str(tmp_path / "term"))
    proc = launch(config, **env)  # no rank stage in tmp_path
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "term").read_text())
    assert summary["stage"] == "train" and summary["iteration"] == 1
    assert summary["error"].startswith("rank 1: ") and "input stage 'rank' is incomplete" in summary["error"]
    assert list((tmp_path / "iter-1").iterdir()) == []  # rank 0's temporary directory too, which it could not


@pytest.mark.parametrize(
    ("codes", "cause"),
    [
        ({0: -15, 1: 2}, 1),  # torchrun stopped rank 0 after rank 1 found the bad input
        ({0: -9, 1: 1}, 0),  # rank 0 OOM-killed; rank 1's collective failed after it
        ({0: -15, 1: 75, 2: 1}, 2),  # two errors of their own: the earlier one
        ({0: -15, 1: -15}, 0),
    ],
)
def test_the_reported_failure_is_the_cause_not_what_torchrun_did_to_the_others(codes, cause) -> None:
    from types import SimpleNamespace

    from idpo_jobs.distributed import first_failure

    failures = {rank: SimpleNamespace(exitcode=code, timestamp=100 + (rank == 1)) for rank, code in codes.items()}
    assert first_failure(failures)[0] == cause


def test_a_world_of_one_runs_in_the_launcher_process_without_torchrun(single: Path) -> None:
    assert read_json(single / "_SUCCESS.json")["metrics"]["strategy"] == "single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_distributed_train_killed_after_a_checkpoint_resumes_on_every_rank(
    tiny, ranked, ddp, tmp_path, strategy: str
) -> None:
    hooks = (TESTS / "hooks" / "sitecustomize.py").read_text()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text((FORCE_FSDP_ON_CPU if strategy == "fsdp" else "") + hooks)
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{env_with_tests()['PYTHONPATH']}", "FSDP_UNITS": str(tmp_path / "u")}
    training = {**(BATCH2_DDP if strategy == "ddp" else {"perDeviceBatchSize": 2}), "checkpointEverySteps": 1}
    config, _ = write_config(tiny_spec(tiny, training=training), ranked, T1, out_dir=tmp_path / "ws")
    work = tmp_path / "ws" / "iter-1" / ".train.work"
    killed = launch(config, **env, IDPO_TEST_KILL_AT="progress:2")  # rank 0 dies as the last step ends
    assert killed.returncode == 137, killed.stderr[-3000:]
    # Rank 0 published what both ranks wrote: each rank's RNG states, beside the weights and optimizer.
    saved = {p.name for p in (work / "checkpoint-1").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "_SUCCESS.json"} <= saved

    again = launch(config, **env)
    ok(again)
    stage = tmp_path / "ws" / "iter-1" / "train"
    metrics = read_json(stage / "_SUCCESS.json")["metrics"]
    assert metrics["strategy"] == strategy and metrics["resumed_from_step"] == 1 and metrics["rank_steps"] == [2, 2]
    ddp_update = update(ddp[0].parent / "iter-1" / "train" / "model", tiny["policy"])
    ours = update(stage / "model", tiny["policy"])
    if strategy == "ddp":  # the uninterrupted run's weights (measured: bit-identical)
        assert float((ours - ddp_update).abs().max()) <= 1e-6
    else:  # FSDP trains what DDP trains (as above); resumed, measured bit-identical to an uninterrupted FSDP run
        assert relative_difference(ours, ddp_update) < 1e-2
    assert [p.name for p in stage.parent.iterdir()] == ["train"]


# --- what the operator relies on, without processes ---------------------------------------------
@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"lora": {}}, "training.lora with distributed.strategy fsdp is not supported"),
        ({"distributed": {"processesPerNode": 16}}, "processesPerNode 16 exceeds the 8 GPUs"),
    ],
    ids=["lora", "more-processes-than-gpus"],
)
def test_spec_refuses_what_fsdp_on_eight_gpus_cannot_run(training: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainingSpec.model_validate({"resources": {"limits": {"nvidia.com/gpu": 8}}, **training})


@pytest.mark.parametrize(
    "training",
    [
        {"lora": {}},  # one process: no strategy applies
        {"lora": {}, "distributed": {"strategy": "ddp", "nodes": 2}},
        {"precomputeRefLogProbs": True, "distributed": {"nodes": 2}},
    ],
    ids=["lora-single-process", "lora-ddp", "fsdp-precomputed"],
)
def test_spec_accepts_what_the_stage_runs(training: dict[str, Any]) -> None:
    TrainingSpec.model_validate(training)


def test_processes_default_to_the_pods_gpus_and_multiply_by_nodes() -> None:
    spec = TrainingSpec.model_validate(
        {"resources": {"limits": {"nvidia.com/gpu": "8"}}, "distributed": {"nodes": 2, "masterPort": 23456}}
    )
    assert spec.distributed.processes(spec.resources) == 8 and spec.distributed.world_size(spec.resources) == 16
    assert spec.distributed.strategy == "fsdp" and spec.to_wire()["distributed"]["masterPort"] == 23456
    assert TrainingSpec().distributed.world_size(TrainingSpec().resources) == 1  # CPU pod: one process


def test_fsdp_settings_are_what_accelerate_builds_its_fsdp2_plugin_from() -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from trl import DPOConfig

    args = DPOConfig(
        output_dir="unused", use_cpu=True, **distributed.strategy_arguments("fsdp", ["MistralDecoderLayer"], True)
    )
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["MistralDecoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.activation_checkpointing and not args.gradient_checkpointing
    assert distributed.strategy_arguments("ddp", ["MistralDecoderLayer"], True) == {}


@pytest.mark.parametrize(
    ("env", "size"),
    [({}, 1), ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8"}, 16), ({"PET_NPROC_PER_NODE": "gpu"}, None)],
    ids=["unset", "two-nodes", "torchrun-decides"],
)
def test_world_size_from_kubeflow_trainer_variables(env: dict[str, str], size: int | None) -> None:
    assert distributed.pet_world_size(env) == size


@pytest.mark.parametrize(("code", "status"), [(2, 2), (-9, 137), (0, 1)], ids=["bad-input", "killed", "unknown"])
def test_a_failed_rank_exits_as_a_shell_reports_it(code: int, status: int) -> None:
    assert distributed.exit_status(code) == status
