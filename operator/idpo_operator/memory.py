"""GPU memory per process for each stage, estimated before a run starts: does the recipe fit its GPUs?

Pure arithmetic on a few numbers per model (no torch, no download), so the operator can warn before
it schedules a pod that would run out of memory an hour in. `plan_memory` reads a run spec;
`format_plan` prints the result as a table. The formulas, their sources and the recipe's 7B worked
example are in docs/scaling-training.md; they are estimates (about ±20%), not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from idpo_jobs.config import AxisSpec, RankingSpec

if TYPE_CHECKING:
    from idpo_operator.spec import IterativeDPORunSpec

GB = 1e9  # decimal, as GPU memory is sold: an "80GB" H100 has 80e9 usable bytes or so
# Bytes of activations per token per hidden unit in one transformer layer with bf16 activations,
# without the attention-score term that SDPA / flash attention never stores (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models", eq. 1: 34·s·b·h).
ACTIVATION_BYTES = 34
# AdamW with bf16 autocast: fp32 master weights (4), fp32 gradients (4), two fp32 moments (8).
MASTER, GRADIENT, MOMENTS = 4, 4, 8
BF16, FP32 = 2, 4
# vLLM's own working memory beside weights and KV cache (CUDA graphs, sampler, activations).
VLLM_OVERHEAD = 2 * GB
# Every other CUDA process: its context, NCCL's buffers and the caching allocator's fragmentation.
RUNTIME = 1.5 * GB


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: sizes from its config.json."""

    params: float
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int


_MISTRAL_7B = ModelShape(7.24e9, 4096, 32, 14336, 32000, 32, 8, 128)
KNOWN_MODELS: dict[str, ModelShape] = {
    "mistralai/Mistral-7B-Instruct-v0.2": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "HuggingFaceH4/zephyr-7b-beta": _MISTRAL_7B,
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelShape(8.03e9, 4096, 32, 14336, 128256, 32, 8, 128),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(7.62e9, 3584, 28, 18944, 152064, 28, 4, 128),
    "Qwen/Qwen2.5-0.5B-Instruct": ModelShape(0.494e9, 896, 24, 4864, 151936, 14, 2, 64),
    # DeBERTa-v3-large, PairRM's backbone: 0.3B in the layers, 0.13B in the embeddings.
    "llm-blender/PairRM": ModelShape(0.435e9, 1024, 24, 4096, 128100, 16, 16, 64),
    # Reward models (`reward-model` axes): a DeBERTa-v3-large and a Llama-3.1-8B classifier.
    "OpenAssistant/reward-model-deberta-v3-large-v2": ModelShape(0.435e9, 1024, 24, 4096, 128100, 16, 16, 64),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": ModelShape(7.5e9, 4096, 32, 14336, 128256, 32, 8, 128),
}


def shape_of(model: str | None) -> ModelShape | None:
    """The shape of a known Hugging Face model id; None for unknown ids, directories and `pvc://`."""
    return KNOWN_MODELS.get(model or "")


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float  # per process (per GPU)


@dataclass(frozen=True)
class StageMemory:
    """One stage's estimate per process. `items` is empty when the model's shape is unknown."""

    stage: str
    variant: str  # e.g. "fsdp, 8 processes (1 node x 8)"
    model: str
    items: tuple[Item, ...] = ()
    notes: tuple[str, ...] = ()
    share: float = 1.0  # of the GPU's memory the stage may take (vLLM: gpuMemoryUtilization)

    @property
    def known(self) -> bool:
        return bool(self.items)

    @property
    def total(self) -> float | None:
        return sum(i.bytes for i in self.items) if self.items else None

    def item(self, name: str) -> float:
        return next(i.bytes for i in self.items if i.name == name)

    def fits(self, gpu_memory: float) -> bool | None:
        return None if self.total is None else self.total <= gpu_memory * self.share


@dataclass(frozen=True)
class MemoryPlan:
    gpu_memory: float  # bytes per GPU the estimate is checked against
    stages: tuple[StageMemory, ...] = field(default_factory=tuple)

    def stage(self, name: str, variant_prefix: str = "") -> StageMemory:
        return next(s for s in self.stages if s.stage == name and s.variant.startswith(variant_prefix))

    def chosen(self) -> list[StageMemory]:
        """The estimates for what will run: every stage, train under the spec's strategy only (the
        first train estimate; the other is there for comparison)."""
        trains = [s for s in self.stages if s.stage == "train"]
        return [s for s in self.stages if s.stage != "train" or s is trains[0]]


# ---------------------------------------------------------------------------------------------
# Per stage
# ---------------------------------------------------------------------------------------------
def activations(shape: ModelShape, batch_size: int, max_length: int, checkpointing: bool) -> float:
    """Stored activations of one micro-batch; DPO forwards chosen and rejected together (2x tokens).

    Checkpointing keeps each layer's bf16 input and recomputes one layer at a time in the backward.
    The logits never materialize: TRL 1.16 computes log-probs through the LM head in tiles.
    """
    tokens = batch_size * 2 * max_length
    per_layer = tokens * shape.hidden * ACTIVATION_BYTES
    if checkpointing:
        return tokens * shape.hidden * BF16 * shape.layers + per_layer
    return per_layer * shape.layers


def lora_params(shape: ModelShape, rank: int, target_modules: list[str]) -> float:
    """Adapter parameters: r·(in + out) per adapted linear layer."""
    kv = shape.kv_heads * shape.head_dim
    h, i = shape.hidden, shape.intermediate
    sizes = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h}
    sizes |= {"gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    modules = list(sizes) if target_modules == ["all-linear"] else target_modules
    return rank * shape.layers * sum(sizes.get(m, h + h) for m in modules)


def train_memory(
    model: str,
    shape: ModelShape | None,
    *,
    processes_per_node: int,
    nodes: int,
    strategy: str,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    separate_reference: bool,
    lora_rank: int | None = None,
    lora_modules: list[str] | None = None,
) -> StageMemory:
    """Per-GPU memory of the train stage (bf16 autocast, AdamW).

    `separate_reference`: a second model is held for the DPO reference (full fine-tuning without
    precomputed log-probs, or LoRA against an `initial` reference other than the iteration's base).
    """
    world = processes_per_node * nodes
    strategy = strategy if world > 1 else "single"
    plural = "es" if world > 1 else ""
    variant = f"{strategy}, {world} process{plural} ({nodes} node{'s' if nodes > 1 else ''} x {processes_per_node})"
    if shape is None:
        return StageMemory("train", variant, model, notes=("unknown model: add its shape to KNOWN_MODELS",))
    p = shape.params
    shards = world if strategy == "fsdp" else 1
    items: list[Item] = []
    if lora_rank is None:
        items += [
            Item(f"policy weights (fp32 master{_over(shards)})", p * MASTER / shards),
            Item(f"policy gradients (fp32{_over(shards)})", p * GRADIENT / shards),
            Item(f"AdamW moments (2 x fp32{_over(shards)})", p * MOMENTS / shards),
        ]
        if strategy == "fsdp":
            layer = p / shape.layers
            # The unit in flight and the prefetched next one, gathered in bf16, and a layer's fp32
            # gradients before their reduce-scatter.
            items.append(Item("FSDP units in flight (2 bf16 layers + fp32 grads)", layer * (2 * BF16 + FP32)))
        else:
            # Autocast's bf16 weight copies live until the backward; DDP's buckets copy the gradients.
            items += [
                Item("bf16 weight copies (autocast)", p * BF16),
                Item("DDP gradient buckets (fp32)", p * GRADIENT if world > 1 else 0.0),
            ]
    else:
        adapters = lora_params(shape, lora_rank, lora_modules or ["all-linear"])
        bucket = GRADIENT if world > 1 else 0
        items += [
            Item("frozen base (bf16)", p * BF16),
            Item("LoRA adapters, grads, AdamW (fp32)", adapters * (MASTER + GRADIENT + MOMENTS + bucket)),
        ]
    if separate_reference:
        items.append(Item(f"reference (bf16{_over(shards)})", p * BF16 / shards))
    checkpointed = "checkpointed" if gradient_checkpointing else "no checkpointing"
    items.append(
        Item(f"activations ({checkpointed})", activations(shape, batch_size, max_length, gradient_checkpointing))
    )
    items.append(Item("CUDA context, NCCL, allocator slack", RUNTIME))
    return StageMemory("train", variant, model, tuple(items))


def generate_memory(
    model: str,
    shape: ModelShape | None,
    *,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    gpu_memory: float,
    responses_per_prompt: int,
    prompt_tokens: int,
    max_new_tokens: int,
) -> StageMemory:
    """Per-GPU memory of vLLM: it takes `gpu_memory_utilization` of the GPU up front; after the bf16
    weights' share and its own overhead, the rest is KV cache. It fits when that cache holds at least
    one prompt's `responses_per_prompt` sequences; more room means more sequences in flight."""
    variant = f"vllm, tensor parallel {tensor_parallel_size}"
    if shape is None:
        return StageMemory("generate", variant, model, notes=("unknown model: add its shape to KNOWN_MODELS",))
    weights = shape.params * BF16 / tensor_parallel_size
    cache = gpu_memory_utilization * gpu_memory - weights - VLLM_OVERHEAD
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * BF16 / tensor_parallel_size  # K and V
    needed = responses_per_prompt * (prompt_tokens + max_new_tokens) * per_token
    notes = (
        f"KV cache: {per_token / 1e3:.0f} kB/token, room for {max(cache, 0) / per_token:,.0f} tokens "
        f"(one prompt's {responses_per_prompt} samples need {needed / per_token:,.0f})",
    )
    items = (
        Item(f"weights (bf16 / {tensor_parallel_size})", weights),
        Item("vLLM overhead", VLLM_OVERHEAD),
        Item("KV cache (the rest of gpuMemoryUtilization)", max(cache, needed)),
    )
    return StageMemory("generate", variant, model, items, notes, share=gpu_memory_utilization)


def rank_memory(
    model: str, shape: ModelShape | None, *, batch_size: int, source_length: int, candidate_length: int
) -> StageMemory:
    """PairRM in fp32 (as llm-blender loads it) and one forward of a batch of candidate pairs: the source
    and two candidates in one sequence; DeBERTa keeps three attention-score matrices per layer."""
    variant = "pairrm, 1 process"
    if shape is None:
        return StageMemory("rank", variant, model, notes=("unknown ranker: add its shape to KNOWN_MODELS",))
    seq = source_length + 2 * candidate_length
    scores = batch_size * shape.heads * seq * seq * FP32 * 3
    hidden = batch_size * seq * shape.hidden * FP32 * 8
    items = (
        Item("weights (fp32)", shape.params * FP32),
        Item("one forward (attention scores dominate)", scores + hidden),
        Item("CUDA context, allocator slack", RUNTIME),
    )
    return StageMemory("rank", variant, model, items)


def reward_model_memory(
    model: str, shape: ModelShape | None, *, batch_size: int, source_length: int, candidate_length: int
) -> StageMemory:
    """A sequence classifier in fp32 (the rank stage loads it so) scoring `batch_size` chats of prompt and
    response: inference keeps one layer's working set at a time (its MLP and the attention scores)."""
    variant = "reward-model, 1 process"
    if shape is None:
        return StageMemory("rank", variant, model, notes=("unknown reward model: add its shape to KNOWN_MODELS",))
    seq = source_length + candidate_length
    layer = batch_size * seq * (4 * shape.hidden + 2 * shape.intermediate) * FP32
    scores = batch_size * shape.heads * seq * seq * FP32
    items = (
        Item("weights (fp32)", shape.params * FP32),
        Item("one layer's forward (MLP and attention scores)", layer + scores),
        Item("CUDA context, allocator slack", RUNTIME),
    )
    return StageMemory("rank", variant, model, items)


def function_memory(function: str) -> StageMemory:
    return StageMemory("rank", "function, 1 process", function, (Item("no model: a Python function on the CPU", 0.0),))


def axis_memory(axis: AxisSpec, ranking: RankingSpec) -> StageMemory:
    """One axis's scorer, as the rank and evaluate stages load it."""
    lengths = {
        "batch_size": ranking.batch_size,
        "source_length": ranking.max_source_length,
        "candidate_length": ranking.max_candidate_length,
    }
    if axis.kind == "pairrm":
        return rank_memory(axis.model or "", shape_of(axis.model), **lengths)
    if axis.kind == "reward-model":
        return reward_model_memory(axis.model or "", shape_of(axis.model), **lengths)
    return function_memory(axis.function or "")


def ranking_memory(ranking: RankingSpec) -> StageMemory:
    """The rank stage: its axes load one after another, each released before the next, so its memory is its
    largest axis's, not their sum. One axis (the single-ranker form): that axis's estimate."""
    axes = ranking.scorer_axes()
    each = [(a, axis_memory(a, ranking)) for a in axes]
    if len(each) == 1:
        return each[0][1]
    known = [(a, m) for a, m in each if m.known]
    notes = tuple(
        f"axis {a.name} ({a.kind}): " + (f"{m.total / GB:.1f} GB" if m.total is not None else "unknown")
        for a, m in each
    )
    if not known:
        return StageMemory("rank", f"{len(axes)} axes, one at a time", "", notes=notes)
    largest, estimate = max(known, key=lambda am: am[1].total or 0.0)
    unknown = [a.name for a, m in each if not m.known]
    notes += (f"unknown: {', '.join(unknown)}, which may be larger",) if unknown else ()
    variant = f"{len(axes)} axes, one at a time: memory is the largest, axis {largest.name}"
    return StageMemory("rank", variant, estimate.model, estimate.items, notes)


def _over(shards: int) -> str:
    return f", sharded /{shards}" if shards > 1 else ""


# ---------------------------------------------------------------------------------------------
# A run spec's plan
# ---------------------------------------------------------------------------------------------
def plan_memory(
    spec: IterativeDPORunSpec, gpu_memory: float = 80 * GB, prompt_tokens: int = 512, shape: ModelShape | None = None
) -> MemoryPlan:
    """Every stage of `spec` per GPU; train under its strategy and, for comparison, the other one.

    `shape` overrides the table for the policy (a local or `pvc://` model); `prompt_tokens` is a typical
    prompt's length in tokens (the generate estimate's only guess).
    """
    t, g, r = spec.training, spec.generation, spec.ranking
    policy = shape or shape_of(spec.model.name)
    processes = t.distributed.processes(t.resources)
    lora = t.lora
    # The train stage loads an `initial` reference after iteration 1 whatever else is set (TRL keeps a
    # given reference through training); else full fine-tuning holds a bf16 copy of the base unless the
    # log-probs are precomputed, and LoRA switches its adapters off instead.
    initial = t.reference_policy == "initial" and spec.iterations > 1
    separate = initial or (lora is None and not t.precompute_ref_log_probs)
    chosen = t.distributed.strategy
    trains = [
        train_memory(
            spec.model.name,
            policy,
            processes_per_node=processes,
            nodes=t.distributed.nodes,
            strategy=strategy,
            batch_size=t.per_device_batch_size,
            max_length=t.max_length,
            gradient_checkpointing=t.gradient_checkpointing,
            separate_reference=separate,
            lora_rank=lora.r if lora else None,
            lora_modules=lora.target_modules if lora else None,
        )
        for strategy in (chosen, "ddp" if chosen == "fsdp" else "fsdp")
    ]
    if processes * t.distributed.nodes == 1:
        trains = trains[:1]  # one process: no strategy to compare
    stages = [
        generate_memory(
            spec.model.name,
            policy,
            tensor_parallel_size=g.tensor_parallel_size,
            gpu_memory_utilization=g.gpu_memory_utilization,
            gpu_memory=gpu_memory,
            responses_per_prompt=g.responses_per_prompt,
            prompt_tokens=prompt_tokens,
            max_new_tokens=g.max_new_tokens,
        ),
        ranking_memory(r),
        *trains,
    ]
    return MemoryPlan(gpu_memory, tuple(stages))


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table: one block per stage, one line per item, a verdict per total."""
    width = 56
    lines = [f"{'memory per GPU':<{width}} {'GB':>7}"]
    for stage in plan.stages:
        lines.append(f"{stage.stage} ({stage.variant}): {stage.model}")
        lines += [f"  {i.name:<{width - 2}} {i.bytes / GB:>7.1f}" for i in stage.items]
        fits = stage.fits(plan.gpu_memory)
        limit = plan.gpu_memory * stage.share / GB
        verdict = "unknown" if fits is None else f"fits {limit:.0f} GB" if fits else f"does NOT fit {limit:.0f} GB"
        total = "?" if stage.total is None else f"{stage.total / GB:.1f}"
        lines.append(f"  {'total: ' + verdict:<{width - 2}} {total:>7}")
        lines += [f"  {note}" for note in stage.notes]
    return "\n".join(lines)


def summary(spec: IterativeDPORunSpec, gpu_memory: float = 80 * GB) -> dict[str, Any]:
    """The plan as the run's status shows it: each stage that will run, its estimate per GPU (absent
    for a model of unknown shape) and whether that fits `gpu_memory`."""
    plan = plan_memory(spec, gpu_memory=gpu_memory)
    stages = []
    for stage in plan.chosen():
        entry: dict[str, Any] = {"stage": stage.stage, "variant": stage.variant}
        if stage.total is not None:
            entry |= {"estimateGB": round(stage.total / GB, 1), "fits": stage.fits(gpu_memory)}
        stages.append(entry)
    return {"gpuMemoryGB": round(gpu_memory / GB, 1), "stages": stages}
