"""The train stage on many processes: the launcher, the rank-0 protocol, the FSDP settings.

    python -m idpo_jobs.distributed train --config iter-1-train.json    # the Job's command

The launcher reads Kubeflow Trainer's environment (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT), which torchrun takes natively as its flags, and runs torchrun: one
process per GPU on every node. A world of one process runs the stage in the launcher's own process.

Every process trains; the stage contract (`contract.run_stage`: a temporary directory renamed into
place, `_SUCCESS.json`, the termination log) has one owner, global rank 0:

1. rank 0 enters `contract.run_stage`; once it has made the temporary directory it shares the path
   and the shard (or None: the stage is complete already, or it failed before training, and the
   others exit 0, leaving the verdict to rank 0);
2. every rank trains; ranks may read a scratch directory inside it that rank 0 fills (`scratch`);
3. a barrier: rank 0 publishes only after every rank has finished, then drops the scratch.

Control messages travel over a gloo group with a long timeout: rank 0 writes a 7B checkpoint to
network storage while the others wait at the barrier.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idpo_jobs import contract
from idpo_jobs.config import StageConfig, load_stage_config

CONTROL_TIMEOUT = datetime.timedelta(hours=2)
SCRATCH = ".shared"  # inside rank 0's temporary directory; removed before it is published
# FSDP_AUTO_WRAP_POLICY[0] in accelerate: wrap every module whose class is named in the list.
TRANSFORMER_WRAP = "TRANSFORMER_BASED_WRAP"


@dataclass(frozen=True)
class World:
    """This process's place in the torchrun job (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    node: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            size=int(env.get("WORLD_SIZE", 1)),
            node=int(env.get("GROUP_RANK", 0)),
        )


def launched() -> bool:
    """Whether torchrun started this process (it sets all three, even for a world of one)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


class Team:
    """The ranks of one job, for control messages. A team of one needs no process group."""

    def __init__(self, world: World, group: Any = None) -> None:
        self.world = world
        self.group = group

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def wait(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.group is None:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world.size
        dist.all_gather_object(values, value, group=self.group)
        return values


_team = Team(World())


def team() -> Team:
    """The team of this process: set by `joined`, a team of one otherwise."""
    return _team


def scratch(out: Path) -> Path:
    """A directory in rank 0's temporary output that every rank may read; gone before publishing."""
    return out / SCRATCH


@contextmanager
def joined() -> Iterator[Team]:
    """Join torchrun's process group (NCCL for CUDA tensors, gloo for CPU ones) for the block."""
    global _team
    import torch
    import torch.distributed as dist

    world = World.from_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)  # every later `.to("cuda")` lands on this process's GPU
    # CPU tensors too: FSDP gathers the FULL_STATE_DICT into CPU memory (accelerate picks the same pair).
    dist.init_process_group(backend="cuda:nccl,cpu:gloo" if cuda else "gloo")
    _team = Team(world, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    try:
        yield _team
    finally:
        _team = Team(World())
        dist.destroy_process_group()


def cli(config_type: type[contract.C], compute: contract.Compute[contract.C], inputs: Any) -> int:
    """`contract.cli` for a torchrun job: rank 0 runs the stage contract, the other ranks follow it."""
    with joined() as ranks:
        if ranks.world.main:
            return _lead(ranks, config_type, compute, inputs)
        return _follow(ranks, config_type, compute)


def _lead(ranks: Team, config_type: type[contract.C], compute: contract.Compute[contract.C], inputs: Any) -> int:
    shared = False

    def compute_then_wait(config: contract.C, out: Path, shard: int) -> dict[str, Any]:
        nonlocal shared
        ranks.share((str(out), shard))
        shared = True
        metrics = compute(config, out, shard)
        ranks.wait()  # every rank has finished: only now may the output be published
        shutil.rmtree(scratch(out), ignore_errors=True)
        return metrics

    try:
        return contract.cli(config_type, compute_then_wait, inputs)
    finally:
        if not shared:  # complete already, or failed before training: release the others
            ranks.share(None)


def _follow(ranks: Team, config_type: type[contract.C], compute: contract.Compute[contract.C]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args, _ = parser.parse_known_args()
    task = ranks.share(None)
    if task is None:
        return 0  # rank 0 decided (and reports); its exit status is the job's
    out, shard = task  # rank 0's: on other nodes JOB_COMPLETION_INDEX numbers the pod, not a shard
    try:
        config = load_stage_config(args.config, config_type)
        compute(config, Path(out), shard)  # type: ignore[arg-type]
    except Exception as err:
        # The same exit status as rank 0 would give, so the launcher reports the cause, not a symptom; and the
        # message in torchrun's error file, which the launcher reports should torchrun stop rank 0 first.
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        print(f"error (rank {ranks.world.rank}): {err}", file=sys.stderr, flush=True)
        ErrorHandler().record_exception(err)
        return contract.exit_code(err)
    ranks.wait()
    return 0


def effective_strategy(strategy: str, world_size: int, cuda: bool) -> str:
    """What runs: `single` for one process; DDP on CPUs, where accelerate 1.15 never enables FSDP (it
    would ignore the plugin and run DDP anyway: saying so beats a summary that claims FSDP)."""
    if world_size == 1:
        return "single"
    return strategy if cuda else "ddp"


def strategy_arguments(strategy: str, layer_classes: list[str], gradient_checkpointing: bool) -> dict[str, Any]:
    """The DPOConfig fields for an effective `strategy`; none but for FSDP (the Trainer does DDP by itself
    under torchrun).

    FSDP2 full shard (ZeRO-3): each decoder layer is one unit, gathered for its forward and backward and
    resharded after; the checkpoint is gathered as a FULL_STATE_DICT on rank 0, so the output stays a
    plain `save_pretrained` directory. Activation checkpointing is FSDP's own: the Trainer's
    `gradient_checkpointing` would gather every layer's weights a second time in the backward.
    """
    if strategy != "fsdp":
        return {}
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": TRANSFORMER_WRAP,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": gradient_checkpointing,
    }
    if layer_classes:  # else accelerate falls back to the model's `_no_split_modules` itself
        fsdp_config["transformer_layer_cls_to_wrap"] = layer_classes
    return {"fsdp": True, "fsdp_config": fsdp_config, "gradient_checkpointing": False}


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------
STAGES = {"train": "idpo_jobs.train"}  # generate and rank scale out as Indexed Job shards instead


def pet_world_size(env: dict[str, str]) -> int | None:
    """PET_NNODES x PET_NPROC_PER_NODE (each 1 when unset); None when torchrun must work it out
    (a node range such as `1:4`, or `auto`/`gpu` processes)."""
    try:
        return int(env.get("PET_NNODES", "1")) * int(env.get("PET_NPROC_PER_NODE", "1"))
    except ValueError:
        return None


def torchrun_args(module: str, stage_args: list[str]) -> list[str]:
    """torchrun's command line; sizes and addresses come from the PET_* variables.

    No restarts: a failed rank fails the pod, and the Job (its backoffLimit and podFailurePolicy)
    decides whether the stage runs again, as for every other stage.

    Each worker is this interpreter with this process's flags (isolated mode in a pod), named here rather
    than left to torchrun, which would start `$PYTHON_EXEC -u -m module` without them.
    """
    flags = subprocess._args_from_interpreter_flags()  # what multiprocessing passes its children too
    worker = [sys.executable, *flags, "-u", "-m", module]
    return ["--max-restarts", "0", "--no-python", *worker, *stage_args]


def exit_status(code: int) -> int:
    """A worker's exit code as a shell reports it: a signal N is 128 + N (137: OOM-killed)."""
    return code if code > 0 else 128 - code if code < 0 else contract.EXIT_FAILED


def first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The rank whose failure is the stage's, of torchrun's `ProcessFailure`s. Once one rank fails torchrun
    stops the others with SIGTERM, and a rank whose peer died fails its next collective: neither is the
    cause, and their whole-second timestamps cannot tell. So, earliest first within each: a verdict on the
    input every rank reaches alike (bad input, a full volume), then a death by another signal (the kernel's
    OOM kill), then any other error of a rank's own, then torchrun's SIGTERMs."""

    def cause(rank: int) -> tuple[int, int, int]:
        code = failures[rank].exitcode
        if code in (contract.EXIT_BAD_INPUT, contract.EXIT_VOLUME_FULL):
            kind = 0
        elif code < 0:
            kind = 3 if -code == signal.SIGTERM else 1
        else:
            kind = 2
        return kind, failures[rank].timestamp, rank

    rank = min(failures, key=cause)
    return rank, failures[rank]


def after_failure(stage_args: list[str], rank: int, failure: Any) -> None:
    """Do what rank 0 would have, had torchrun not stopped it: a rank that fails first (the same bad input,
    found a moment sooner) makes torchrun SIGTERM rank 0, perhaps before it removed its temporary output and
    wrote the termination log. On rank 0's node, once every worker has exited, the launcher removes the
    part's leftovers and, if rank 0 wrote no report, writes one from the failed rank's torchrun error file."""
    if os.environ.get("PET_NODE_RANK", "0") != "0":
        return  # rank 0's node reports; the other pods' termination logs stay empty
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    try:
        config = load_stage_config(parser.parse_known_args(stage_args)[0].config, StageConfig)
    except Exception:  # a config no rank could read: rank 0 said why itself
        return
    contract.remove_leftovers(contract.output_dir(config, contract.shard_index(config)))
    path = contract.termination_log_path(config)
    if path is None:
        return
    try:
        reported = json.loads(path.read_text())
    except (OSError, ValueError):
        reported = None  # none yet, or cut short by the SIGTERM
    if isinstance(reported, dict) and reported.get("error"):
        return  # rank 0's own
    message = failure.message["message"] if isinstance(failure.message, dict) else failure.message
    summary: dict[str, Any] = {"stage": config.stage.value, "iteration": config.iteration}
    if failure.exitcode == contract.EXIT_VOLUME_FULL:
        summary["reason"] = contract.VOLUME_FULL
    contract.write_termination_log(config, summary | {"error": f"rank {rank}: {message}"[:3000]})


def launch(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idpo_jobs.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    args, stage_args = parser.parse_known_args(argv)
    module = STAGES[args.stage]
    contract.isolate_environment()
    if "PET_NODE_RANK" not in os.environ and "JOB_COMPLETION_INDEX" in os.environ:
        os.environ["PET_NODE_RANK"] = os.environ["JOB_COMPLETION_INDEX"]  # an Indexed Job numbers its pods
    if pet_world_size(dict(os.environ)) == 1:
        sys.argv = [f"python -m {module}", *stage_args]
        return importlib.import_module(module).main()

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(torchrun_args(module, stage_args)))
    except ChildFailedError as err:
        # torchrun itself exits 1 for any failure; the status of the rank that caused it keeps the stage's
        # meaning (2: bad input, not retried by the Job's podFailurePolicy).
        rank, failure = first_failure(err.failures)
        print(f"error: rank {rank} exited with {failure.exitcode}", file=sys.stderr, flush=True)
        after_failure(stage_args, rank, failure)
        return exit_status(failure.exitcode)
    return 0


if __name__ == "__main__":
    contract.exit_after(launch)
