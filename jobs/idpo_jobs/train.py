"""Train stage: DPO with TRL on this iteration's pairs; the result is the next iteration's base.

    python -m idpo_jobs.train --config iter-1-train.json

Reads all rank parts, trains `DPOTrainer` (Zephyr / alignment-handbook style hyperparameters from
the spec), merges LoRA adapters if any, and saves a plain `save_pretrained` directory (safetensors,
tokenizer, chat template) as `iter-<n>/train/model`.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from idpo_jobs import contract, data
from idpo_jobs.config import MODEL_DIR, Stage, TrainConfig, on_volume, resolve_uri
from idpo_jobs.rank import OUTPUT as PAIRS


def read_pairs(config: TrainConfig) -> list[dict[str, Any]]:
    parts = contract.require_input(on_volume(config.input_dir), config.input_shards, Stage.RANK)
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


def dpo_config(config: TrainConfig, out: Path, cuda: bool) -> Any:
    from trl import DPOConfig

    t = config.training
    return DPOConfig(
        output_dir=str(out / "trainer"),
        beta=t.beta,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        loss_type=[t.loss_type],
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        lr_scheduler_type=t.scheduler,
        precompute_ref_log_probs=t.precompute_ref_log_probs,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        use_cpu=not cuda,
        bf16=cuda,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )


def progress_callback() -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            contract.report_progress(state.global_step, state.max_steps)

    return Progress()


def compute(config: TrainConfig, out: Path, shard: int) -> dict[str, Any]:
    import datasets
    import torch
    from trl import DPOTrainer

    from idpo_jobs.models import load_causal_lm, load_tokenizer

    t = config.training
    pairs = read_pairs(config)
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    policy = resolve_uri(config.model)
    reference = resolve_uri(config.reference_model)
    tokenizer = load_tokenizer(policy, config.revision, config.chat_template)
    model = load_causal_lm(policy, config.revision, dtype)
    # rolling + full fine-tuning: TRL copies the policy as reference; with LoRA the frozen base is it.
    ref_model = load_causal_lm(reference, None, dtype) if reference != policy else None

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

    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_config(config, out, cuda),
        train_dataset=datasets.Dataset.from_list([to_trl(p) for p in pairs]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[progress_callback()],
    )
    result = trainer.train()
    shutil.rmtree(out / "trainer", ignore_errors=True)  # save_strategy "no": only logs there
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()  # the next iteration loads a plain model
    trained.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)

    logs = [e for e in trainer.state.log_history if "rewards/accuracies" in e]

    def mean(key: str) -> float:
        return round(statistics.fmean(e[key] for e in logs), 4) if logs else 0.0

    return {
        "pairs": len(pairs),
        "steps": trainer.state.global_step,
        "loss": round(result.training_loss, 4),
        "final_loss": round(logs[-1]["loss"], 4) if logs else None,
        "reward_accuracy": mean("rewards/accuracies"),
        "reward_margin": mean("rewards/margins"),
        "checkpoint": str(config.stage_dir / MODEL_DIR),
        "lora": t.lora is not None,
    }


def inputs(config: TrainConfig) -> dict[str, str]:
    return {
        "pairs": str(on_volume(config.input_dir)),
        "model": resolve_uri(config.model),
        "reference": resolve_uri(config.reference_model),
    }


def main() -> int:
    return contract.cli(TrainConfig, compute, inputs)


if __name__ == "__main__":
    sys.exit(main())
