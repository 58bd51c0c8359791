"""Typed configuration shared by the operator (which writes it) and the stages (which read it).

The per-stage parameter models (`GenerationSpec`, `RankingSpec`, `TrainingSpec`, ...) are also the
sections of the `IterativeDPORun` spec, so a field is defined and documented exactly once: here.
Its description flows into the generated CRD and `kubectl explain`.

This module imports pydantic only, and nothing of this package: it is the bottom layer, shared by the
operator (no torch) and the stages.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_BASE_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_PROMPT_DATASET = "snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset"
DEFAULT_RANKER_MODEL = "llm-blender/PairRM"
# Mistral-7B-Instruct-v0.2's own format; used when neither the spec nor the tokenizer has a template.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
PVC_SCHEME = "pvc://"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # a prompt source that is a file, not a dataset id
TINY_SCHEME = "tiny://"  # the tiny models of idpo_jobs.tiny: the demo and the tests, no download
TINY_DIR = ".idpo-tiny"  # where a cluster run builds them on its volume
# Where the run's volume is mounted in a stage pod; the Job builder sets it to its mountPath.
PVC_ROOT_ENV = "IDPO_PVC_ROOT"
# The claim's name: `pvc://<claim>/<path>` (KServe's form, as status reports checkpoints) names the
# same file as `pvc://<path>` on the run's own claim.
PVC_CLAIM_ENV = "IDPO_PVC_CLAIM"
DEFAULT_PVC_ROOT = "/workspace"


class Model(BaseModel):
    """Base for every spec/config model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


Quantity = Annotated[str | int, Field(description="A Kubernetes quantity, e.g. '16Gi' or 4.")]
# Caps on what a spec may hold (docs/spec-reference: a run at the caps keeps its status small).
MAX_URI = 1024  # a model or data location
MAX_TEMPLATE = 32 * 1024  # a chat template
MAX_NAME = 253  # a Kubernetes object name
MAX_SHORT = 128  # a column, split, revision, module name
MAX_ITEMS = 64  # entries of a list or map


def relative_path_problem(path: str) -> str | None:
    """Why `path` would not stay inside the volume it is relative to: empty, absolute, or with `..`."""
    if not path.strip("/"):
        return "is empty"
    if path.startswith("/"):
        return "is absolute"
    if ".." in path.split("/"):
        return "has a `..` segment"
    return None


def _relative(path: str) -> str:
    problem = relative_path_problem(path)
    if problem:
        raise ValueError(f"{path!r} must stay on the claim, and it {problem}")
    return path


def _stays_on_the_claim(uri: str | None) -> str | None:
    if uri is not None and uri.startswith(PVC_SCHEME):
        problem = relative_path_problem(uri[len(PVC_SCHEME) :])
        if problem:
            raise ValueError(f"{uri!r}: a pvc:// path must stay on the claim, and this one {problem}")
    return uri


# A model or data location: a `pvc://` path must stay on the run's claim (checked here and by the CRD).
Location = Annotated[str, AfterValidator(_stays_on_the_claim)]
# A directory relative to the run's claim: not empty, not absolute, no `..`.
RelativePath = Annotated[str, AfterValidator(_relative)]
# The CEL form of the same rule, for the CRD (operator/idpo_operator/crd.py).
PVC_PATH_RULE = "!{0}.startsWith('pvc://') || !{0}.matches('^pvc://(/.*)?$|^pvc://(.*/)?[.][.](/.*)?$')"


class Resources(Model):
    """Container resources, as in a Pod spec (`nvidia.com/gpu` goes in limits)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16, description="Minimum resources.")
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16, description="Maximum resources.")


class Stage(enum.StrEnum):
    GENERATE = "generate"
    RANK = "rank"
    TRAIN = "train"
    EVALUATE = "evaluate"  # not in STAGE_ORDER: the operator places it (once for the base, then per iteration)


STAGE_ORDER: tuple[Stage, ...] = (Stage.GENERATE, Stage.RANK, Stage.TRAIN)


# ---------------------------------------------------------------------------------------------
# Spec sections
# ---------------------------------------------------------------------------------------------
class ModelSpec(Model):
    name: Location = Field(
        DEFAULT_BASE_MODEL,
        min_length=1,
        max_length=MAX_URI,
        description="Base policy: a Hugging Face model id, a local directory, or `pvc://<path>` on the "
        "run's volume. Iteration 1 starts from it; iteration n>1 starts from iteration n-1's output.",
    )
    revision: str | None = Field(
        None, max_length=MAX_SHORT, description="Hub revision (branch, tag or commit) of `name`."
    )
    chat_template: str | None = Field(
        None,
        max_length=MAX_TEMPLATE,
        description="Jinja chat template. None: the tokenizer's own, or Mistral's `[INST] ... [/INST]` "
        "when the tokenizer has none. Saved with every checkpoint so later iterations use it too.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a checkpoint ships (transformers' `trust_remote_code`) when the stages "
        "load `name` and the checkpoints trained from it. Off: a checkpoint that needs its own code is refused. "
        "The cluster's policy must allow it for this model (policy `remoteCode`, docs/security.md).",
    )


class PromptsSpec(Model):
    source: Location = Field(
        DEFAULT_PROMPT_DATASET,
        min_length=1,
        max_length=MAX_URI,
        description="Hugging Face dataset id, or a `.jsonl`/`.parquet` file (local path or `pvc://`).",
    )
    column: str = Field("prompt", min_length=1, max_length=MAX_SHORT, description="Column holding the prompt text.")
    id_column: str | None = Field(
        "prompt_id",
        max_length=MAX_SHORT,
        description="Column with a stable prompt id; missing: a hash of the prompt text.",
    )
    split: str = Field(
        "train", max_length=MAX_SHORT, description="Split used when `splitPattern` is null or `perIteration` set."
    )
    split_pattern: str | None = Field(
        "train_iteration_{n}",
        max_length=MAX_SHORT,
        pattern=r"\{n\}",
        description="Per-iteration split name with `{n}` = iteration number (1-based), e.g. the "
        "Snorkel recipe's disjoint UltraFeedback thirds. Ignored for files and when `perIteration` is set.",
    )
    per_iteration: int | None = Field(
        None,
        ge=1,
        description="Take this many prompts per iteration from one seeded shuffle of `split` "
        "(iteration n gets the n-th disjoint slice). Takes precedence over `splitPattern`.",
    )
    limit: int | None = Field(None, ge=1, description="Cap on prompts per iteration (after selection).")
    seed: int = Field(0, description="Seed of the `perIteration` shuffle.")

    def split_for(self, iteration: int) -> str:
        if self.split_pattern is None or self.per_iteration is not None:
            return self.split
        return self.split_pattern.format(n=iteration)


class GenerationSpec(Model):
    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm for GPUs; transformers for CPU runs, tests and the local demo."
    )
    responses_per_prompt: int = Field(5, ge=2, le=64, description="Samples per prompt (n).")
    temperature: float = Field(0.7, gt=0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(512, ge=1, description="Maximum tokens per response.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward batch (transformers engine).")
    seed: int = Field(0, description="Sampling seed; combined with the iteration number.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree (GPUs per pod).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1.0, description="vLLM GPU memory fraction.")
    max_model_length: int | None = Field(None, ge=16, description="vLLM max context; None: model's.")
    enforce_eager: bool = Field(
        False,
        description="vLLM without CUDA graphs (torch.compile on its CPU backend): starts faster and holds less "
        "memory, decodes slower; for short runs and debugging.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights dtype.")
    shards: int = Field(1, ge=1, le=256, description="Parallel pods (Indexed Job completions).")
    chunk_prompts: int = Field(
        256,
        ge=1,
        description="Prompts per chunk that a shard writes to its work directory on the claim as soon as it is "
        "generated (`iter-<n>/generate/.part-<k>.work/`); an attempt after a retry, eviction or lost node skips "
        "the finished chunks (`resumed_prompts` in its summary). Rounded up to a multiple of `batchSize`, so "
        "that no batch is split and the transformers engine samples the same responses chunked or not. Smaller: "
        "less work lost per kill, one more small write per chunk.",
    )
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")


class PairingSpec(Model):
    strategy: Literal["best-vs-worst"] = Field(
        "best-vs-worst", description="Highest score is chosen, lowest is rejected."
    )
    drop_ties: bool = Field(True, description="Drop prompts whose best and worst scores tie.")
    tie_epsilon: float = Field(0.0, ge=0, description="Scores closer than this count as a tie.")
    length_penalty: float = Field(
        0.0,
        ge=0,
        description="Subtracted from a response's score per 100 characters before pairing (counters "
        "rankers that favour length). Stored scores stay raw.",
    )
    max_length_ratio: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Length control at pairing: the chosen response is at most this many times as long (characters) "
        "as the rejected one. The best response is paired with the worst one that satisfies the ratio; a prompt "
        "where none does is dropped and counted (`dropped_length_ratio`). 1.0: never prefer the longer of a pair, "
        "so a length-biased ranker teaches nothing about length. None: off (docs/ranking.md).",
    )
    min_length_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The other side of the band: the chosen response is at least this many times as long as the "
        "rejected one. With `maxLengthRatio`, pairs whose lengths are close either way teach neither longer nor "
        "shorter (a one-sided `maxLengthRatio: 1.0` teaches shorter). None: off (docs/ranking.md).",
    )


# An axis's name: a DNS label of at most 32 characters, so that status keys stay short and safe.
AXIS_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_AXIS_NAME = 32
MAX_AXES = 8  # axes of a run: each is a model load per rank shard and a block of figures per evaluation
FUNCTION_REF = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
ScorerKind = Literal["pairrm", "reward-model", "function", "judge"]


class GateSpec(Model):
    """A constraint on an axis's raw score: a response outside [min, max] may be rejected but is never chosen."""

    min: float | None = Field(None, allow_inf_nan=False, description="Lowest passing score (inclusive).")
    max: float | None = Field(None, allow_inf_nan=False, description="Highest passing score (inclusive).")

    @model_validator(mode="after")
    def _bounded(self) -> GateSpec:
        if self.min is None and self.max is None:
            raise ValueError("a gate needs `min`, `max` or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate min {self.min:g} is above max {self.max:g}: nothing passes")
        return self

    def passes(self, score: float) -> bool:
        return (self.min is None or score >= self.min) and (self.max is None or score <= self.max)


class AxisSpec(Model):
    """One scorer of a run (docs/ranking.md): an objective (`weight`) or a constraint (`gate`)."""

    name: str = Field(
        min_length=1,
        max_length=MAX_AXIS_NAME,
        pattern=AXIS_NAME,
        description="Unique name: the axis's key in pairs.jsonl (`axis_scores`), in status and in tracking.",
    )
    kind: ScorerKind = Field(
        description="pairrm: PairRM through llm-blender; reward-model: a sequence-classification reward model "
        "(score = logit 0); function: a Python callable `module:function` (as `ranking.ranker`); judge: an LLM "
        "judge over an OpenAI-compatible endpoint rating each response 1-9 (`judge`, template `pointwise`)."
    )
    judge: JudgeSpec | None = Field(
        None,
        description="For kind judge: the LLM judge (as an `evaluation.judges` entry, template `pointwise`). A "
        "response it gives no readable rating is never chosen (it may be rejected).",
    )
    model: Location | None = Field(
        None, max_length=MAX_URI, description="Checkpoint (HF id, directory or `pvc://`), for pairrm and reward-model."
    )
    function: str | None = Field(
        None,
        max_length=2 * MAX_SHORT,
        pattern=FUNCTION_REF,
        description="`module:callable` taking (prompt, response) and returning a float, for kind function.",
    )
    weight: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="An objective: the combined score is the sum of weight x this axis's per-prompt normalised "
        "score (`ranking.combine`); negative minimises. Exactly one of `weight` and `gate`.",
    )
    gate: GateSpec | None = Field(
        None,
        description="A constraint on the raw score: a failing response may be rejected but is never chosen; a "
        "prompt where no response passes every gate is dropped and counted. Exactly one of `weight` and `gate`.",
    )

    @model_validator(mode="after")
    def _objective_or_gate(self) -> AxisSpec:
        if (self.weight is None) == (self.gate is None):
            raise ValueError(f"axis {self.name!r} needs exactly one of `weight` (an objective) and `gate`")
        if self.weight == 0:
            raise ValueError(f"axis {self.name!r}: weight 0 makes no objective; leave the axis out")
        if self.kind == "function" and not self.function:
            raise ValueError(f"axis {self.name!r} of kind function needs `function: module:callable`")
        if self.kind == "judge":
            if self.judge is None or self.judge.template != "pointwise":
                raise ValueError(f"axis {self.name!r} of kind judge needs `judge` with template `pointwise`")
        elif self.judge is not None:
            raise ValueError(f"axis {self.name!r}: `judge` is for kind judge")
        if self.kind not in ("function", "judge") and not self.model:
            raise ValueError(f"axis {self.name!r} of kind {self.kind} needs `model`")
        if self.kind == "pairrm" and self.gate is not None:
            raise ValueError(
                f"axis {self.name!r}: a gate needs an absolute score, and PairRM's scores are relative to the other "
                "candidates of the prompt; gate with a reward-model or a function"
            )
        return self


class CombineSpec(Model):
    normalize: Literal["rank", "zscore", "none"] = Field(
        "rank",
        description="How each objective's scores are made comparable within a prompt before the weighted sum: rank "
        "(default: each candidate's rank among the prompt's candidates, scaled to 0..1, ties averaged; immune to "
        "a scorer's scale and outliers), zscore (minus the prompt's mean, over its standard deviation: keeps how "
        "far apart candidates are), none (raw scores: only when the scorers share a scale). With one objective the "
        "combined score is its raw score.",
    )


class RankingSpec(Model):
    ranker: Literal["pairrm", "reward-model", "function"] = Field(
        "pairrm",
        description="pairrm: PairRM through llm-blender; reward-model: a sequence-classification "
        "reward model (score = logit 0); function: a Python callable `module:function`.",
    )
    model: Location | None = Field(
        DEFAULT_RANKER_MODEL,
        max_length=MAX_URI,
        description="Ranker checkpoint (HF id, directory or `pvc://`), for pairrm and reward-model.",
    )
    function: str | None = Field(
        None,
        max_length=2 * MAX_SHORT,
        pattern=FUNCTION_REF,
        description="`module:callable` taking (prompt, response) and returning a float; the module "
        "must be in the stage image (stages run isolated: no PYTHONPATH), and allowed by the cluster's policy.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code the ranker checkpoint (or its backbone) ships, for pairrm and "
        "reward-model. Off: never, whatever llm-blender would choose. The cluster's policy must allow it.",
    )
    axes: list[AxisSpec] | None = Field(
        None,
        min_length=1,
        max_length=MAX_AXES,
        description="Several scorers in one run (docs/ranking.md): objectives combined by weight after per-prompt "
        "normalisation, and gates a chosen response must pass. Each is loaded in turn (memory is the largest "
        "axis's) and every one is also measured by the evaluate stage. Set: `ranker`, `model` and `function` "
        "are ignored. None: the single `ranker` is the run's one axis, named after its kind.",
    )
    combine: CombineSpec = Field(default_factory=CombineSpec, description="How objectives are combined.")
    batch_size: int = Field(8, ge=1, description="Prompts per ranker batch.")
    max_source_length: int = Field(1224, ge=8, description="Prompt tokens the ranker sees (PairRM).")
    max_candidate_length: int = Field(412, ge=8, description="Response tokens the ranker sees.")
    pairing: PairingSpec = Field(default_factory=PairingSpec)
    shards: int = Field(1, ge=1, le=256, description="Parallel pods (Indexed Job completions).")
    chunk_prompts: int = Field(
        256,
        ge=1,
        description="Prompts per chunk that a shard writes to its work directory on the claim as soon as it is "
        "scored (`iter-<n>/rank/.part-<k>.work/`); a later attempt skips the finished chunks "
        "(`resumed_prompts`). Rounded up to a multiple of `batchSize`.",
    )
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")

    @model_validator(mode="after")
    def _ranker_needs(self) -> RankingSpec:
        if self.ranker == "function" and not self.function:
            raise ValueError("ranker 'function' needs `function: module:callable`")
        if self.ranker != "function" and not self.model:
            raise ValueError(f"ranker '{self.ranker}' needs `model`")
        names = [a.name for a in self.axes or []]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"axes: names must be unique; {', '.join(repeated)} repeated")
        if self.axes and all(a.weight is None for a in self.axes):
            raise ValueError("axes: at least one axis needs a `weight`: gates alone choose nothing")
        return self

    def scorer_axes(self) -> list[AxisSpec]:
        """The axes the run scores with: `axes`, or the single `ranker` as one objective named after its kind."""
        if self.axes:
            return list(self.axes)
        model = self.model if self.ranker != "function" else None
        function = self.function if self.ranker == "function" else None
        return [AxisSpec(name=self.ranker, kind=self.ranker, model=model, function=function, weight=1.0)]


class LoraSpec(Model):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(max_length=MAX_SHORT)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=MAX_ITEMS,
        description="Module names to adapt; [all-linear] adapts every linear layer but the output head.",
    )


class DistributedSpec(Model):
    """How the train stage spreads over GPUs and pods: one torchrun process per GPU, `nodes` pods.

    The operator starts `python -m idpo_jobs.distributed train --config F` with Kubeflow Trainer's
    `PET_*` variables, which torchrun reads as its flags; a world of one process runs without torchrun.
    """

    processes_per_node: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Training processes per pod (torchrun --nproc-per-node), one per GPU. None: the pod's "
        "`nvidia.com/gpu` limit, or 1 without GPUs. At most that limit when it is set: NCCL needs a GPU per process.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Pods that train together (torchrun --nnodes), as one Indexed Job with a headless Service "
        "(the operator creates both); a failed pod restarts them all. More than 1 needs ReadWriteMany storage "
        "and NCCL between the nodes (docs/scaling-training.md).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "fsdp",
        description="fsdp (default): PyTorch FSDP2 full shard, one unit per decoder layer; weights, gradients "
        "and AdamW states are split over all processes, so full-parameter DPO of a 7B model (16 bytes/param of "
        "policy state, ~116 GB, plus a 14.5 GB bf16 reference) fits 8x80GB GPUs at ~17 GB/GPU of model state. "
        "ddp: every process holds all of it, which does not fit one 80GB GPU for 7B; use it for small models "
        "and for LoRA (the frozen bf16 base and small adapters fit one GPU; fsdp with lora is refused). "
        "FSDP needs GPUs: on CPUs the stage runs ddp. Ignored for a single process.",
    )
    master_port: int = Field(
        29500, ge=1, le=65535, description="Rendezvous port on the rank-0 pod (torchrun --master-port)."
    )

    def processes(self, resources: Resources) -> int:
        """Processes per pod: the explicit count, else the pod's GPU limit, else 1 (CPU)."""
        if self.processes_per_node is not None:
            return self.processes_per_node
        return max(self.gpus(resources), 1)

    def world_size(self, resources: Resources) -> int:
        return self.processes(resources) * self.nodes

    def unsupported(self, world_size: int, *, lora: bool) -> str | None:
        """Why this strategy cannot train the rest of the spec on `world_size` processes, or None.

        LoRA under FSDP trains (transformers handles FSDP2 + PEFT), but the adapters are merged into
        the weights before hand-off, and that needs the whole model in one process: a sharded one
        would have to be gathered and re-loaded on rank 0. DDP holds a 7B LoRA run on each GPU anyway.
        """
        if world_size > 1 and self.strategy == "fsdp" and lora:
            return (
                "training.lora with distributed.strategy fsdp is not supported: the adapters are merged into "
                "the whole model before hand-off; use `distributed.strategy: ddp` (a bf16 base fits one GPU)"
            )
        return None

    @staticmethod
    def gpus(resources: Resources) -> int:
        """The pod's `nvidia.com/gpu` limit as a number; 0 when absent."""
        return int(str(resources.limits.get("nvidia.com/gpu", 0)))


# TRL 1.16's DPO losses (trl.DPOConfig.loss_type); tests/test_axes.py compares them with the installed TRL.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
LossType = Literal[LOSS_TYPES]  # type: ignore[valid-type]


class TrainingSpec(Model):
    beta: float = Field(0.01, gt=0, description="DPO beta (KL strength); Zephyr/handbook value.")
    learning_rate: float = Field(5e-7, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Epochs over this iteration's pairs.")
    per_device_batch_size: int = Field(8, ge=1, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Steps per optimizer update.")
    max_length: int = Field(1024, ge=16, description="Prompt+response tokens; longer are truncated.")
    loss_type: LossType | Annotated[list[LossType], Field(min_length=1, max_length=len(LOSS_TYPES))] = Field(
        "sigmoid",
        description="TRL's DPO loss (trl.DPOConfig.loss_type), or a list of them summed with `lossWeights` (e.g. "
        "MPO: [sigmoid, bco_pair, sft]). Length control in training: sigmoid_norm divides each response's log-ratio "
        "by its token count, so a longer chosen response earns no more reward per token (docs/ranking.md).",
    )
    loss_weights: list[Annotated[float, Field(ge=0, le=100)]] | None = Field(
        None,
        max_length=len(LOSS_TYPES),
        description="One weight per `lossType` entry, in order. None: 1 each.",
    )
    ld_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="LD-DPO (trl.DPOConfig.ld_alpha): the log-probabilities of the tokens beyond the shorter "
        "response's length count this much (0: not at all; 1: fully, plain DPO), so the longer response's extra "
        "tokens cannot carry the preference. Length control in training. None: off.",
    )
    use_weighting: bool = Field(
        False,
        description="WPO (trl.DPOConfig.use_weighting): weight each pair by the policy's length-normalised "
        "probability of both responses, so pairs the policy would not generate count less.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="trl.DPOConfig.label_smoothing: the flipped-label probability of the robust loss, the epsilon "
        "of exo_pair (which needs it above 0; 1e-3 is the paper's), the smoothing of aot.",
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    scheduler: str = Field("cosine", max_length=64, description="transformers lr_scheduler_type.")
    reference_policy: Literal["rolling", "initial"] = Field(
        "rolling",
        description="rolling: the reference is this iteration's start model (Snorkel recipe); "
        "initial: always the base model.",
    )
    lora: LoraSpec | None = Field(
        None, description="Train LoRA adapters (peft); merged into the weights before hand-off."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once up front (saves memory, not time)."
    )
    gradient_checkpointing: bool = Field(True, description="Trade compute for activation memory.")
    seed: int = Field(42, description="Training seed.")
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Save a resumable checkpoint (weights, optimizer, scheduler, RNG states, data position) every "
        "this many optimizer steps, in the stage's work directory on the claim (`iter-<n>/.train.work/`): a later "
        "attempt of the stage (retry, eviction, preemption, lost node, gang restart) resumes from the newest "
        "complete one and reports `resumedFromStep`. None: no step rule. With `checkpointEveryMinutes` too, "
        "whichever comes first saves. Only the newest checkpoint is kept (two exist while the next is written: "
        "size the claim for them); they are removed once the model is published and never become the "
        "iteration's checkpoint. A save costs a checkpoint's write (the policy's weights and AdamW moments).",
    )
    checkpoint_every_minutes: float | None = Field(
        30,
        gt=0,
        description="Save a resumable checkpoint (as `checkpointEverySteps`) every this many minutes of training, "
        "by rank 0's clock; at most what a kill then loses. None: no time rule; both None: no checkpoints, and "
        "a restarted train stage starts from step 0. The default never fires in short runs.",
    )
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Multi-GPU and multi-node training (torchrun)."
    )

    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _losses_combine(self) -> TrainingSpec:
        """TRL 1.16's own rules (DPOConfig.__post_init__, DPOTrainer.__init__), refused here with the field named
        rather than when a GPU pod builds the trainer (tests/test_axes.py checks them against the installed TRL)."""
        losses = self.loss_types()
        if not losses:
            raise ValueError("lossType: name at least one loss")
        if len(set(losses)) != len(losses):
            raise ValueError(f"lossType: {losses} names a loss twice")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(
                f"lossWeights: {len(self.loss_weights)} weights for {len(losses)} loss types; give one per lossType"
            )
        if self.use_weighting and {"aot", "aot_unpaired"} & set(losses):
            raise ValueError("useWeighting: TRL does not weight the aot losses (they sort pairs within a batch)")
        if "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("labelSmoothing: loss exo_pair needs it above 0 (the EXO paper uses 1e-3)")
        return self

    @model_validator(mode="after")
    def _distributed_fits(self) -> TrainingSpec:
        d = self.distributed
        gpus = d.gpus(self.resources)
        if d.processes_per_node is not None and gpus and d.processes_per_node > gpus:
            raise ValueError(
                f"distributed.processesPerNode {d.processes_per_node} exceeds the {gpus} GPUs of "
                "resources.limits['nvidia.com/gpu']: NCCL needs one GPU per process"
            )
        problem = d.unsupported(d.world_size(self.resources), lora=self.lora is not None)
        if problem:
            raise ValueError(problem)
        return self


class StopWhen(Model):
    """When to end a run early, judged on the evaluations finished so far (`idpo_jobs.winrate.should_stop`).

    The rules are checked after each iteration's evaluation; either one stops the run.
    """

    metric: Literal["lcWinRateVsPrevious", "lcWinRateVsBase"] = Field(
        "lcWinRateVsBase",
        description="The evaluation metric the rules read: the length-controlled win rate of each iteration "
        "against the one before it, or against the base model. It also picks `bestIteration`.",
    )
    axis: str | None = Field(
        None,
        max_length=MAX_AXIS_NAME,
        pattern=AXIS_NAME,
        description="Read `metric` of this axis of `ranking.axes` (its own judgement of each iteration) instead of "
        "the combined one; `bestIteration` follows it too. None: the combined judgement.",
    )
    judge: str | None = Field(
        None,
        max_length=MAX_AXIS_NAME,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Read `metric` of this judge of `evaluation.judges` (an LLM judge's view of each iteration) "
        "instead of the ranker's; `bestIteration` follows it too. At most one of `axis` and `judge`.",
    )
    max_length_ratio: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Length guard: stop when the latest iteration's mean response length is more than this many "
        "times the base model's (`mean_length_ratio_vs_base`, on the held-out prompts), e.g. 1.2; an iteration "
        "past it is never `bestIteration`. None: no length rule.",
    )
    below: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Stop when the latest iteration's metric is below this. E.g. 0.5 with lcWinRateVsPrevious: "
        "the newest model is no better than the one it was trained from. None: no threshold rule.",
    )
    min_delta: float = Field(
        0.01,
        ge=0,
        le=1,
        description="What counts as an improvement for `patience`: reaching the best earlier value plus this much.",
    )
    patience: int | None = Field(
        None,
        ge=1,
        description="Stop when the best of the last `patience` iterations is less than `minDelta` above the best "
        "before them: a plateau (most meaningful with lcWinRateVsBase). None: no plateau rule.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StopWhen:
        if self.axis is not None and self.judge is not None:
            raise ValueError("stopWhen: name an `axis` or a `judge`, not both")
        return self

    @property
    def source(self) -> tuple[str, str] | None:
        """Where the rules read `metric`: ("axes", name), ("judges", name), or None for the combined figures."""
        if self.judge is not None:
            return "judges", self.judge
        return ("axes", self.axis) if self.axis is not None else None

    @model_validator(mode="after")
    def _has_a_rule(self) -> StopWhen:
        if self.below is None and self.patience is None and self.max_length_ratio is None:
            raise ValueError("stopWhen needs `below`, `patience` or `maxLengthRatio`: without a rule it never stops")
        return self


MAX_JUDGES = 8
JUDGE_KEY_ENV_PREFIX = "IDPO_JUDGE_API_KEY_"


class SecretKeyRef(Model):
    """One key of a Secret in the run's namespace."""

    name: str = Field(min_length=1, max_length=MAX_NAME, description="The Secret's name.")
    key: str = Field(min_length=1, max_length=MAX_NAME, description="The key in the Secret holding the value.")


class JudgeEndpoint(Model):
    """An OpenAI-compatible chat completions API: OpenAI's, or a judge model served by vLLM in the cluster."""

    base_url: str = Field(
        max_length=MAX_URI,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="The API root the stage pods reach, with its version path: `https://api.openai.com/v1`, "
        "`http://judge.llm.svc:8000/v1` (vLLM's OpenAI server).",
    )
    model: str = Field(
        min_length=1, max_length=256, description="The judge model's name at the endpoint (`gpt-4-1106-preview`)."
    )
    api_key_secret: SecretKeyRef | None = Field(
        None,
        description="Where the API key is: the evaluate stage gets it as an environment variable (never in its "
        "config, status, logs or MLflow). None: no key is sent (an endpoint inside the cluster).",
    )


class JudgeSpec(Model):
    """An LLM judge over an OpenAI-compatible endpoint (docs/evaluation.md): a scorer the run never trains on.

    Each comparison is judged in both orders (position bias cancels); every answer is cached on the claim,
    so a retried or preempted stage never pays for a judgment twice.
    """

    name: str = Field(
        min_length=1,
        max_length=MAX_AXIS_NAME,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="The judge's name (a DNS label of at most 32 characters, as an axis's): its figures appear "
        "under it in status, reports and MLflow.",
    )
    endpoint: JudgeEndpoint
    template: Literal["alpaca-eval", "pairwise", "pointwise"] = Field(
        "alpaca-eval",
        description="`alpaca-eval`: AlpacaEval 2.0's annotator (weighted_alpaca_eval_gpt4_turbo): one output "
        "token, P(preferred) from its two labels' log-probabilities; the endpoint must return `top_logprobs`. "
        "`pairwise`: AlpacaEval's gpt4_turbo annotator, answered in words (`Output (a)`), for endpoints without "
        "log-probabilities. `pointwise`: a 1-9 rating of one response, the expected value over the digits' "
        "log-probabilities (or the digit answered): the ranker form.",
    )
    max_concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    timeout_seconds: float = Field(60.0, gt=0, le=600, description="Per request; a timeout is retried.")
    max_retries: int = Field(
        6,
        ge=0,
        le=20,
        description="Retries of a request answered 429 or 5xx, timed out or not connected, with exponential "
        "backoff, or after the `Retry-After` the endpoint asks for. Past them the stage fails as transient and "
        "its Job retries it (judgments made are cached).",
    )
    max_requests: int = Field(
        20000,
        ge=1,
        le=1_000_000,
        description="Requests (retries included) one stage attempt may send this judge. Reaching it fails the "
        "stage as bad input, naming the judge: raise it and rerun (cached judgments are not sent again). One "
        "evaluation sends 2 per held-out prompt and baseline (both orders), 1 per response for `pointwise`.",
    )

    @property
    def api_key_env(self) -> str:
        """The environment variable the stage reads the API key from (the operator fills it from the Secret)."""
        return JUDGE_KEY_ENV_PREFIX + self.name.upper().replace("-", "_")


class EvaluationSpec(Model):
    """Per-iteration evaluation on held-out prompts: is each iteration better than the base model and
    than the iteration before it? The base model is evaluated once (iteration 0), then every checkpoint;
    responses are judged by every axis of the run's ranking, together and (with `ranking.axes`) one by one
    (docs/evaluation.md, docs/ranking.md)."""

    enabled: bool = Field(True, description="Evaluate the base model once and every iteration's checkpoint.")
    prompts: PromptsSpec | None = Field(
        None,
        description="Held-out prompts: the first `limit` rows of `split` (its `splitPattern` is ignored and "
        "`perIteration` refused: the set is the same for every iteration). None: derived from the run's "
        "`prompts` so that no iteration trains on them. With `perIteration`, the prompts of the same seeded "
        "shuffle that the iterations (slices from its front) leave, the last `limit` of them at most; the run is "
        "refused before its first stage when fewer than `minPrompts` are left. For a dataset without "
        "`perIteration`, its split `test`, or `splitPattern` with `train` replaced by `test` at n=1 (the recipe's "
        "`test_iteration_1`). A file without `perIteration` has no held-out part: set this.",
    )
    limit: int = Field(
        200,
        ge=1,
        description="Held-out prompts per evaluation (one response each), at most: with `perIteration` and no "
        "`prompts`, the prompts no iteration trains on, up to this many.",
    )
    min_prompts: int = Field(
        16,
        ge=1,
        description="Fewer held-out prompts than this and the run is refused before its first stage (a win rate "
        "on a handful of prompts says nothing).",
    )
    temperature: float = Field(
        0.0,
        ge=0,
        le=2.0,
        description="0: greedy decoding. Above 0: sampling at this temperature and `generation.topP`, with "
        "`generation.seed` for every model, so that models are compared on the same random stream.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Maximum tokens per response. None: `generation.maxNewTokens`."
    )
    best_of_n: int | None = Field(
        None,
        ge=2,
        le=64,
        description="Also sample this many responses per held-out prompt (at `generation.temperature`), keep the "
        "ranker's favourite (PairRM: llm-blender's best-of-n, one bubble pass of n-1 comparisons) and report its "
        "win rate against the base model's responses: what a ranker can get out of this policy. None: off.",
    )
    stop_when: StopWhen | None = Field(
        None, description="End the run early when evaluations stop improving. None: run every iteration."
    )
    judges: list[JudgeSpec] = Field(
        default_factory=list,
        max_length=MAX_JUDGES,
        description="LLM judges over OpenAI-compatible endpoints, each with a unique name: an independent view "
        "of every iteration: the evaluate stage has each judge compare its responses with the base model's and the "
        "previous iteration's, in both orders; figures under `judges.<name>` (docs/evaluation.md). Empty: none.",
    )

    @model_validator(mode="after")
    def _fixed_prompt_set(self) -> EvaluationSpec:
        if self.prompts is not None and self.prompts.per_iteration is not None:
            raise ValueError("evaluation.prompts.perIteration: the held-out set is one fixed set; use `limit`")
        return self

    @model_validator(mode="after")
    def _judge_names_are_unique(self) -> EvaluationSpec:
        names = [j.name for j in self.judges]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"evaluation.judges: names must be unique; {', '.join(twice)} appear more than once")
        return self

    def heldout_split(self, run_prompts: PromptsSpec) -> str | None:
        """The dataset split the default held-out set comes from when the run has no `perIteration`:
        `test`, or the run's `splitPattern` with `train` replaced by `test` at n=1; None when there is none."""
        pattern = run_prompts.split_pattern
        if pattern is None:
            return "test"
        return pattern.replace("train", "test").format(n=1) if "train" in pattern else None

    def heldout_problem(self, run_prompts: PromptsSpec, iterations: int) -> str | None:
        """Why no held-out set can be derived for this run, or None. What needs the data (the number of
        rows a `perIteration` shuffle has left after `iterations`) is checked by the stage."""
        if not self.enabled or self.prompts is not None or run_prompts.per_iteration is not None:
            return None
        if run_prompts.source.endswith(FILE_SUFFIXES):
            return (
                "evaluation.prompts is required: every iteration trains on the whole prompt file, so none of it "
                "is held out (or set prompts.perIteration to leave its tail unused)"
            )
        split = self.heldout_split(run_prompts)
        if split is None:
            return (
                f"evaluation.prompts is required: no held-out split follows from splitPattern "
                f"{run_prompts.split_pattern!r} (one containing `train` maps to `test`)"
            )
        if split in {run_prompts.split_for(n) for n in range(1, iterations + 1)}:
            return f"evaluation.prompts is required: the default held-out split {split!r} is trained on"
        return None


class MlflowSpec(Model):
    """An MLflow tracking server the stages report to (docs/tracking.md)."""

    tracking_uri: str = Field(
        max_length=MAX_URI,
        pattern=r"^(https?://[^\s/]+|file:///?[^\s]*)",
        description="The server, as `http(s)://host[:port]` (what the stage pods can reach), or `file:///path` "
        "for a local run (`idpo run` only). With `credentialsSecret`, it must be an endpoint the cluster's policy "
        "allows.",
    )
    experiment: str = Field("idpo", min_length=1, max_length=256, description="MLflow experiment of the run.")
    credentials_secret: str | None = Field(
        None,
        max_length=MAX_NAME,
        description="A Secret whose keys the stages get as env: MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN (the cluster's policy must allow the Secret).",
    )


class TrackingSpec(Model):
    """Experiment tracking, off by default: the stages report to MLflow and/or write TensorBoard files."""

    mlflow: MlflowSpec | None = Field(
        None,
        description="One MLflow run per IterativeDPORun, a nested run per iteration: frozen configs as params, "
        "per-step training metrics, generation and ranking statistics, evaluation metrics (step = iteration), "
        "the best checkpoint as a tag. A server that is down is a warning, never a failed stage.",
    )
    tensorboard: bool = Field(
        False, description="TensorBoard event files on the claim, under the run's folder: `tensorboard/iter-<n>/`."
    )


class TrackingConfig(TrackingSpec):
    """What a stage gets of `spec.tracking`: the spec, whose run it is, and the MLflow runs made so far."""

    run: str = Field(max_length=MAX_NAME)
    namespace: str | None = Field(None, max_length=63)
    uid: str | None = Field(None, max_length=64)
    parent_run_id: str | None = Field(None, max_length=64, description="None: this stage creates it.")
    iteration_run_id: str | None = Field(None, max_length=64, description="None: this stage creates it.")


# ---------------------------------------------------------------------------------------------
# Workspace layout: the one place that names paths on the volume.
# ---------------------------------------------------------------------------------------------
SUCCESS_FILE = "_SUCCESS.json"
MODEL_DIR = "model"


class Workspace:
    """`<root>/iter-<n>/<stage>/`; sharded stages hold `part-<k>` directories.

    `root` is absolute for local runs, and relative to the run's volume for cluster runs (the
    operator does not know where a pod mounts it; the stage resolves it with `on_volume`).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage_dir(self, iteration: int, stage: Stage) -> Path:
        return self.root / f"iter-{iteration}" / stage.value

    def checkpoint(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.TRAIN) / MODEL_DIR

    def checkpoint_uri(self, iteration: int) -> str:
        """How a model field names iteration `iteration`'s output: a path, or `pvc://` on a volume."""
        path = self.checkpoint(iteration)
        return str(path) if self.root.is_absolute() else PVC_SCHEME + str(path)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}"


def volume_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def on_volume(path: str | Path) -> Path:
    """A workspace path as this process sees it: relative paths live on the run's volume."""
    return volume_root() / path  # an absolute `path` (local runs) is returned as is


# ---------------------------------------------------------------------------------------------
# Stage configs: what one stage process receives (`--config file.json`).
# ---------------------------------------------------------------------------------------------
class StageConfig(Model):
    run: str = Field(description="Run name (for logs and summaries).")
    iteration: int = Field(ge=1)
    workspace: str = Field(description="Run workspace root: absolute, or relative to the volume.")
    shards: int = Field(1, ge=1)
    termination_log: str | None = Field(None, description="Summary path; None: /dev/termination-log when it exists.")
    input_digests: list[str] | None = Field(
        None, description="The input stage's part digests as reported when it completed; None: not checked."
    )
    tracking: TrackingConfig | None = Field(None, description="None: no experiment tracking.")

    @property
    def stage_dir(self) -> Path:
        return on_volume(Workspace(self.workspace).stage_dir(self.iteration, self.stage))

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_wire(), indent=2))


class GenerateConfig(StageConfig):
    stage: Literal[Stage.GENERATE] = Stage.GENERATE
    model: str = Field(description="Policy to sample from (resolved path or HF id).")
    revision: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = Field(False, description="`model.trustRemoteCode`: run the checkpoint's own code.")
    prompts: PromptsSpec
    generation: GenerationSpec


class RankConfig(StageConfig):
    stage: Literal[Stage.RANK] = Stage.RANK
    input_dir: str = Field(description="The generate stage directory (all its parts are read).")
    input_shards: int = Field(ge=1)
    ranking: RankingSpec


class TrainConfig(StageConfig):
    stage: Literal[Stage.TRAIN] = Stage.TRAIN
    model: str = Field(description="Policy at the start of this iteration.")
    reference_model: str = Field(description="Reference policy for the DPO KL term.")
    revision: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = Field(False, description="`model.trustRemoteCode`: run the checkpoint's own code.")
    input_dir: str = Field(description="The rank stage directory (all its parts are read).")
    input_shards: int = Field(ge=1)
    training: TrainingSpec


class EvaluateConfig(StageConfig):
    """One model's evaluation: iteration 0 is the base model, iteration n is iteration n's checkpoint.

    Baselines are named by iteration; their responses are read from their evaluate directories
    (`Workspace.stage_dir(k, Stage.EVALUATE)`), not generated again.
    """

    stage: Literal[Stage.EVALUATE] = Stage.EVALUATE
    iteration: int = Field(ge=0, description="0: the base model, evaluated once; n: iteration n's checkpoint.")
    model: str = Field(description="The model to evaluate (HF id, directory, `pvc://` or `tiny://`).")
    revision: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = Field(False, description="`model.trustRemoteCode`: run the checkpoint's own code.")
    prompts: PromptsSpec = Field(description="The run's prompt source: the default held-out set is derived from it.")
    iterations: int = Field(ge=1, description="The run's iteration count: the held-out set avoids all their prompts.")
    generation: GenerationSpec = Field(description="The run's generation section (engine, seed, lengths).")
    ranking: RankingSpec = Field(description="The run's ranking section: the judge.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    base_iteration: int | None = Field(
        None, ge=0, description="Iteration whose evaluation holds the base model's responses (0); None: no comparison."
    )
    previous_iteration: int | None = Field(
        None, ge=0, description="Iteration whose evaluation holds the previous model's responses; None: no comparison."
    )

    @model_validator(mode="after")
    def _baselines_come_first(self) -> EvaluateConfig:
        for name, k in (("baseIteration", self.base_iteration), ("previousIteration", self.previous_iteration)):
            if k is not None and k >= self.iteration:
                raise ValueError(f"{name} {k} must be an earlier evaluation than iteration {self.iteration}")
        if self.shards != 1:
            raise ValueError("the evaluate stage runs as one pod: shards must be 1")
        return self

    def evaluation_dir(self, iteration: int) -> Path:
        """Where iteration `iteration`'s evaluation lives, as this process sees it."""
        return on_volume(Workspace(self.workspace).stage_dir(iteration, Stage.EVALUATE))


AnyStageConfig = Annotated[GenerateConfig | RankConfig | TrainConfig | EvaluateConfig, Field(discriminator="stage")]


def load_stage_config(path: str | Path, expected: type[StageConfig]) -> StageConfig:
    from pydantic import TypeAdapter

    config = TypeAdapter(AnyStageConfig).validate_json(Path(path).read_text())
    if not isinstance(config, expected):
        raise ValueError(f"{path} is a {config.stage} config, not {expected.__name__}")
    return config
