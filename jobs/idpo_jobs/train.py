"""Train stage: DPO with TRL on this iteration's pairs; the result is the next iteration's base.

    python -m idpo_jobs.train --config iter-1-train.json
    torchrun --nproc-per-node 2 -m idpo_jobs.train --config iter-1-train.json   # as idpo_jobs.distributed does

Reads all rank parts, trains `DPOTrainer` (Zephyr / alignment-handbook style hyperparameters from
the spec), merges LoRA adapters if any, and saves a plain `save_pretrained` directory (safetensors,
tokenizer, chat template) as `iter-<n>/train/model`. Under torchrun every process trains (DDP, or
FSDP2 full shard: `training.distributed`) and rank 0 alone writes and publishes (see `distributed`).

Every `training.checkpointEverySteps` steps and/or `checkpointEveryMinutes` minutes it saves a resumable
Trainer checkpoint in the stage's work directory (`iter-<n>/.train.work/`, see `resume.Checkpoints`); an
attempt that finds a complete one resumes from it, and says so (`resumed_from_step`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from idpo_jobs import contract, data, distributed, resume, tracking
from idpo_jobs.config import MODEL_DIR, Stage, TrainConfig, TrainingSpec, on_volume
from idpo_jobs.rank import OUTPUT as PAIRS
from idpo_jobs.uris import resolve_uri

# A file to write step timestamps and the CUDA allocator's peak to (bench/gpu_check.py sets it); unset: off.
PROFILE_ENV = "IDPO_TRAIN_PROFILE"
CHECKPOINT_PREFIX = "idpo-checkpoint"  # the log line of each checkpoint saved


def read_pairs(config: TrainConfig) -> list[dict[str, Any]]:
    parts = contract.require_input(on_volume(config.input_dir), config.input_shards, Stage.RANK, config.input_digests)
    pairs = [row for part in parts for row in data.read_jsonl(part / PAIRS)]
    if not pairs:
        raise contract.StageError(
            f"no preference pairs in {config.input_dir}: every prompt was a tie "
            "(see ranking.pairing.dropTies / tieEpsilon, or raise generation.temperature)"
        )
    return pairs


def to_trl(pair: dict[str, Any]) -> dict[str, Any]:
    """Explicit-prompt conversational layout: TRL applies the chat template itself."""
    return {"prompt": pair["chosen"][:-1], "chosen": pair["chosen"][-1:], "rejected": pair["rejected"][-1:]}


def dpo_config(
    config: TrainConfig, out: Path, cuda: bool, strategy: str = "single", layer_classes: list[str] | None = None
) -> Any:
    from trl import DPOConfig

    t = config.training
    fields = dict(
        output_dir=str(out),
        beta=t.beta,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        loss_type=t.loss_types(),
        loss_weights=t.loss_weights,
        ld_alpha=t.ld_alpha,
        use_weighting=t.use_weighting,
        label_smoothing=t.label_smoothing,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        lr_scheduler_type=t.scheduler,
        precompute_ref_log_probs=t.precompute_ref_log_probs,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        use_cpu=not cuda,
        bf16=cuda,
        save_strategy="no",  # `checkpointing` asks for each save; the Trainer writes it into `out` (staging)
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    fsdp = distributed.strategy_arguments(strategy, layer_classes or [], t.gradient_checkpointing)
    return DPOConfig(**{**fields, **fsdp})  # FSDP's activation checkpointing replaces the Trainer's


def progress_callback(world: distributed.World) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # Every process takes every optimizer step; each says so at the first and the last.
            if world.size > 1 and state.global_step in (1, state.max_steps):
                print(f"idpo-train rank {world.rank}/{world.size} step {state.global_step}", flush=True)
            if world.main:
                contract.report_progress(state.global_step, state.max_steps)

    return Progress()


def checkpointing(t: TrainingSpec, store: resume.Checkpoints, ranks: distributed.Team) -> Any:
    """Ask the Trainer for a checkpoint every `checkpointEverySteps` steps and/or `checkpointEveryMinutes`
    minutes (never at the last step: the model is saved then anyway), and publish each one once every
    rank has written its part. Step rules count from step 0, so a resumed attempt saves at the same steps.
    The minutes are rank 0's: every rank must take part in the same saves (FSDP gathers for them)."""
    from transformers import TrainerCallback

    world = ranks.world

    class Checkpointing(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()
            self.started = 0.0
            self.saved: list[resume.Checkpoint] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.last = time.monotonic()  # loading the models is not training time

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            step = state.global_step
            if step >= state.max_steps:
                return
            due = t.checkpoint_every_steps is not None and step % t.checkpoint_every_steps == 0
            if t.checkpoint_every_minutes is not None and not due:
                late = time.monotonic() - self.last >= t.checkpoint_every_minutes * 60
                due = ranks.share(late) if world.size > 1 else late
            if due:
                control.should_save = True
                self.started = time.perf_counter()

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            ranks.wait()  # every rank's files of this checkpoint are written
            if world.main:
                saved = store.publish(state.global_step, state.max_steps, self.started)
                self.saved.append(saved)
                mb, seconds = saved.marker["bytes"] / 1e6, saved.marker.get("seconds", 0.0)
                print(
                    f"{CHECKPOINT_PREFIX} step {saved.step}/{state.max_steps}: {saved.path.name} "
                    f"({mb:.1f} MB in {seconds:.2f}s)",
                    flush=True,
                )
            self.last = time.monotonic()

    return Checkpointing()


def profile_callbacks(world: distributed.World) -> list[Any]:
    """With IDPO_TRAIN_PROFILE=FILE, rank 0 writes FILE as training ends: the time of each optimizer step's
    end (after a CUDA sync, so the step's kernels are inside it), and the allocator's peak since start-up,
    which counts the loaded models as well as the step. Model loading and saving fall outside the steps."""
    path = os.environ.get(PROFILE_ENV)
    if not path or not world.main:
        return []
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Profile(TrainerCallback):
        def __init__(self) -> None:
            self.record: dict[str, Any] = {"cuda": cuda, "step_end_times": []}

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.record["train_begin_time"] = now()
            if cuda:
                self.record["allocated_at_train_begin"] = torch.cuda.memory_allocated()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.record["step_end_times"].append(now())

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if cuda:
                self.record["max_memory_allocated"] = torch.cuda.max_memory_allocated()
                self.record["max_memory_reserved"] = torch.cuda.max_memory_reserved()
            Path(path).write_text(json.dumps(self.record))

    return [Profile()]


def dtypes(config: TrainConfig, cuda: bool, fsdp: bool) -> tuple[str, str]:
    """Weights dtypes of the policy and the reference on load.

    The trained weights are fp32 masters under bf16 autocast: with bf16 weights, AdamW's steps at the
    recipe's lr 5e-7 are below bf16's spacing (~6e-5 near 0.01) and are rounded away. Under FSDP,
    accelerate upcasts the trainable weights to fp32 itself as it shards them, so they load as bf16
    (half the host memory per process). The frozen LoRA base and the reference never step: bf16.
    CPU kernels: fp32 throughout.
    """
    if not cuda:
        return "float32", "float32"
    full = config.training.lora is None
    return ("float32" if full and not fsdp else "bfloat16"), "bfloat16"


def training_dataset(pairs: list[dict[str, Any]], out: Path, ranks: distributed.Team, shared: bool) -> Any:
    """The pairs in TRL's layout; on disk in the shared scratch when ranks must agree on cache files.

    TRL 1.16 writes precomputed reference log-probs on rank 0 next to the dataset's cache files and has
    every rank read them back; an in-memory dataset has none, so each rank would look in its own temp dir.
    """
    import datasets

    dataset = datasets.Dataset.from_list([to_trl(p) for p in pairs])
    if not shared:
        return dataset
    path = distributed.scratch(out) / "pairs"
    if ranks.world.main:
        dataset.save_to_disk(str(path))
    ranks.wait()
    return datasets.load_from_disk(str(path))


def save(trainer: Any, directory: Path, main: bool, merge: bool, dtype: Any) -> None:
    """Write the trained policy as a plain checkpoint from rank 0; under FSDP every rank gathers."""
    if trainer.is_fsdp_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model)  # collective; full only on rank 0
        if main:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(directory, state_dict=state)
        return
    if not main:
        return
    trained = trainer.model
    if merge:
        trained = trained.merge_and_unload()  # the next iteration loads a plain model
    trained.to(dtype).save_pretrained(directory)


def compute(config: TrainConfig, out: Path, shard: int) -> dict[str, Any]:
    import torch
    from trl import DPOTrainer

    from idpo_jobs.models import load_causal_lm, load_tokenizer

    t = config.training
    ranks = distributed.team()
    world = ranks.world
    problem = t.distributed.unsupported(world.size, lora=t.lora is not None)
    if problem:  # the spec's validator saw the pod's GPUs; this is the world torchrun actually made
        raise contract.StageError(problem)
    pairs = read_pairs(config)
    cuda = torch.cuda.is_available()
    strategy = distributed.effective_strategy(t.distributed.strategy, world.size, cuda)
    if strategy != t.distributed.strategy and world.size > 1 and world.main:
        print(f"note: {t.distributed.strategy} needs GPUs; training with {strategy} on CPUs", flush=True)
    policy_dtype, reference_dtype = dtypes(config, cuda, strategy == "fsdp")
    policy = resolve_uri(config.model)
    reference = resolve_uri(config.reference_model)
    trust = config.trust_remote_code
    tokenizer = load_tokenizer(policy, config.revision, config.chat_template, trust)
    model = load_causal_lm(policy, config.revision, policy_dtype, trust)
    # TRL's own rule: LoRA's reference is the frozen base with adapters off, and a precomputed one is
    # the untrained policy; otherwise a second model, loaded here so that it is bf16 (TRL would copy the
    # policy's fp32). An `initial` reference differs from this iteration's base, so it is always loaded.
    separate = reference != policy or (t.lora is None and not t.precompute_ref_log_probs)
    ref_model = load_causal_lm(reference, None, reference_dtype, trust) if separate else None

    peft_config = None
    if t.lora is not None:
        from peft import LoraConfig

        modules = t.lora.target_modules
        peft_config = LoraConfig(
            r=t.lora.r,
            lora_alpha=t.lora.alpha,
            lora_dropout=t.lora.dropout,
            target_modules="all-linear" if modules == ["all-linear"] else modules,
            task_type="CAUSAL_LM",
        )

    # Resumable checkpoints live in the work directory, beside the output: every rank's Trainer writes
    # its part of each into the staging area there, and rank 0 publishes it (`checkpointing`).
    store = resume.Checkpoints(
        contract.work_dir(contract.output_dir(config, shard)),
        resume.identity(config, inputs(config), world_size=world.size),
    )
    latest = store.prepare() if world.main else None
    resume_from, resumed_step = ranks.share((str(latest.path), latest.step) if latest else (None, 0))
    if resume_from and world.main:
        print(f"resuming from {resume_from} (step {resumed_step}), saved by an earlier attempt", flush=True)
    saves = checkpointing(t, store, ranks)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_config(config, store.staging, cuda, strategy, model._no_split_modules),
        train_dataset=training_dataset(pairs, out, ranks, shared=world.size > 1 and t.precompute_ref_log_probs),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            progress_callback(world),
            saves,
            *profile_callbacks(world),
            *([tracking.trainer_callback(tracking.current())] if world.main else []),
        ],
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    save(trainer, out / MODEL_DIR, world.main, peft_config is not None, torch.bfloat16 if cuda else torch.float32)
    rank_steps = ranks.gather(trainer.state.global_step)
    if not world.main:
        return {}
    tokenizer.save_pretrained(out / MODEL_DIR)
    # The Trainer's own log, with the checkpoint: `idpo report` draws the curves of every iteration from it.
    (out / MODEL_DIR / TRAINING_LOG).write_text(json.dumps(trainer.state.log_history))

    logs = [e for e in trainer.state.log_history if "rewards/accuracies" in e]

    def mean(key: str) -> float:
        return round(statistics.fmean(e[key] for e in logs), 4) if logs else 0.0

    # After a resume the Trainer's own mean covers this attempt's steps; the log history (restored from the
    # checkpoint) covers all of them.
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]
    loss = statistics.fmean(losses) if resumed_step and losses else result.training_loss
    return {
        "pairs": len(pairs),
        "steps": trainer.state.global_step,
        "loss": round(loss, 4),
        "final_loss": round(logs[-1]["loss"], 4) if logs else None,
        "reward_accuracy": mean("rewards/accuracies"),
        "reward_margin": mean("rewards/margins"),
        "checkpoint": str(config.stage_dir / MODEL_DIR),
        "lora": t.lora is not None,
        "world_size": world.size,
        # What ran, whatever was asked: accelerate, not the spec, has the last word.
        "strategy": "fsdp" if trainer.is_fsdp_enabled else "ddp" if world.size > 1 else "single",
        "rank_steps": rank_steps,
        "resumed_from_step": resumed_step,
        "steps_executed": trainer.state.global_step - resumed_step,
        "checkpoints_saved": len(saves.saved),
        "checkpoint_seconds": round(sum(c.marker.get("seconds", 0.0) for c in saves.saved), 3),
        **curves(trainer.state.log_history),
    }


TRAINING_LOG = "training_log.json"
CURVES = {"loss": "loss", "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}
CURVE_POINTS = 24  # per curve in the stage's summary (and status): the whole log is in TRAINING_LOG


def curves(log_history: list[dict[str, Any]], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """The per-step DPO loss, reward margin and accuracy, at most `points` evenly spread steps each."""
    entries = [e for e in log_history if "loss" in e and "step" in e and "train_loss" not in e]
    if not entries:
        return {}
    picked = (
        entries
        if len(entries) <= points
        else [entries[round(i * (len(entries) - 1) / (points - 1))] for i in range(points)]
    )
    out = {"curve_step": [int(e["step"]) for e in picked]}
    for name, key in CURVES.items():
        out[f"curve_{name}"] = [
            round(float(e[key]), 4) if isinstance(e.get(key), int | float) else None for e in picked
        ]
    return out


def inputs(config: TrainConfig) -> dict[str, str]:
    return {
        "pairs": str(on_volume(config.input_dir)),
        "model": resolve_uri(config.model),
        "reference": resolve_uri(config.reference_model),
    }


def main() -> int:
    if distributed.launched():
        return distributed.cli(TrainConfig, compute, inputs)
    return contract.cli(TrainConfig, compute, inputs)


if __name__ == "__main__":
    contract.exit_after(main)
