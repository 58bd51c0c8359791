"""Rank stage: score every candidate, keep best-vs-worst pairs.

    python -m idpo_jobs.rank --config iter-1-rank.json

Reads all generate parts, takes shard k of K of their rows, writes `part-<k>/pairs.jsonl`
(Snorkel / TRL preference layout, loadable with `datasets.load_dataset("json", ...)`; `all_rm_scores` is the
combined score, `axis_scores` every axis's raw scores). It scores with each axis of `ranking.axes` in turn (the
single `ranker` is one axis), in chunks of `ranking.chunkPrompts` prompts, each written to the shard's work
directory when done, so an attempt after a kill scores only the chunks that were not finished
(`resume.chunked`). Then `axes` combines the scores and `pairing` picks each prompt's pair.
Rankers share one interface: `score(prompts, candidates) -> scores` (higher is better).
"""

from __future__ import annotations

import importlib
import math
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from idpo_jobs import axes, contract, data, pairing, resume, tracking
from idpo_jobs.config import AxisSpec, RankConfig, RankingSpec, Stage, on_volume
from idpo_jobs.generate import OUTPUT as GENERATIONS
from idpo_jobs.uris import resolve_uri

OUTPUT = "pairs.jsonl"


class Ranker(Protocol):
    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]: ...


class PairRMRanker:
    """PairRM (pairwise cross-encoder) through llm-blender; scores come from its comparison matrix."""

    def __init__(self, spec: RankingSpec, model: str) -> None:
        from idpo_jobs.blender_compat import load_blender
        from idpo_jobs.models import device

        try:
            self.blender = load_blender(model, device(), spec.trust_remote_code)
        except FileNotFoundError as err:
            raise contract.StageError(str(err)) from None
        self.spec = spec
        # `Blender.compare` and `get_best_of_n` take no length arguments: they truncate to the collator's
        # (`rank` sets its own on a copy, so the rank stage is unaffected).
        collator = self.blender.ranker_collator
        collator.source_maxlength, collator.candidate_maxlength = spec.max_source_length, spec.max_candidate_length

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        scores = self.blender.rank(
            prompts,
            candidates,
            return_scores=True,
            batch_size=self.spec.batch_size,
            disable_tqdm=True,
            source_max_length=self.spec.max_source_length,
            candidate_max_length=self.spec.max_candidate_length,
        )
        return [[float(s) for s in row] for row in scores]

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """P(`first` beats `second`) per prompt, averaged over both orders to cancel PairRM's position bias.

        PairRM reads the pair as one sequence; its logit says how much the left response beats the
        right. Each pair is judged as (first, second) and as (second, first); swapping the arguments
        gives exactly 1 minus the result.
        """
        kwargs = {"batch_size": self.spec.batch_size, "return_logits": True, "disable_tqdm": True}
        left_first = self.blender.compare(prompts, first, second, mode="[A,B]", **kwargs)
        left_second = self.blender.compare(prompts, first, second, mode="[B,A]", **kwargs)
        return [(_sigmoid(float(a)) + 1 - _sigmoid(float(b))) / 2 for a, b in zip(left_first, left_second, strict=True)]

    def best_of_n(self, prompts: list[str], candidates: list[list[str]]) -> list[int]:
        """Index of each prompt's best candidate by llm-blender's best-of-n: one bubble pass of n-1
        comparisons (both orders each), instead of the n(n-1) of a full ranking."""
        import torch

        torch.manual_seed(0)  # the pass visits candidates in a random order: the same one on every rerun
        best = self.blender.get_best_of_n(
            prompts, candidates, pairrm_cmp_type="bubble", batch_size=self.spec.batch_size
        )
        return [cands.index(b) for cands, b in zip(candidates, best, strict=True)]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class RewardModelRanker:
    """A scalar reward model (AutoModelForSequenceClassification); score = logit 0 of the chat."""

    def __init__(self, spec: RankingSpec, model: str) -> None:
        from transformers import AutoModelForSequenceClassification

        from idpo_jobs.models import check_model_path, device, load_tokenizer

        check_model_path(model, "reward model")
        self.tokenizer = load_tokenizer(model, trust_remote_code=spec.trust_remote_code)
        try:
            classifier = AutoModelForSequenceClassification.from_pretrained(
                model, trust_remote_code=spec.trust_remote_code
            )
            self.model = classifier.to(device()).eval()
        except (OSError, ValueError) as err:
            raise contract.StageError(f"cannot load reward model {model!r}: {err}") from None
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.spec = spec

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        import torch

        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, cands in zip(prompts, candidates, strict=True)
            for c in cands
        ]
        flat: list[float] = []
        limit = self.spec.max_source_length + self.spec.max_candidate_length
        for start in range(0, len(texts), self.spec.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.spec.batch_size],
                add_special_tokens=False,
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            with torch.no_grad():
                logits = self.model(**enc.to(self.model.device)).logits
            flat.extend(logits[:, 0].float().tolist())
        n = len(candidates[0]) if candidates else 0
        return [flat[i * n : (i + 1) * n] for i in range(len(candidates))]


class FunctionRanker:
    """A user's `module:callable(prompt, response) -> float`: the programmatic reward."""

    def __init__(self, spec: RankingSpec, model: str | None = None) -> None:
        self.ref = spec.function or ""
        self.fn = load_function(self.ref)

    def _one(self, prompt: str, response: str) -> float:
        value = self.fn(prompt, response)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise contract.StageError(f"ranking.function {self.ref!r} returned {value!r}, not a number")
        return float(value)

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        return [[self._one(p, c) for c in cands] for p, cands in zip(prompts, candidates, strict=True)]


def load_function(ref: str) -> Callable[[str, str], float]:
    module_name, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise contract.StageError(f"ranking.function {ref!r} cannot be loaded: {err}") from None
    if not callable(fn):
        raise contract.StageError(f"ranking.function {ref!r} is not callable")
    return fn


RANKERS: dict[str, Callable[[RankingSpec, str], Ranker]] = {
    "pairrm": PairRMRanker,
    "reward-model": RewardModelRanker,
    "function": FunctionRanker,
}


def make_ranker(spec: RankingSpec) -> Ranker:
    """The ranker `spec` names, its checkpoint resolved (`pvc://`, `tiny://`)."""
    return RANKERS[spec.ranker](spec, resolve_uri(spec.model) if spec.model else "")


def read_generations(config: RankConfig) -> list[dict[str, Any]]:
    parts = contract.require_input(
        on_volume(config.input_dir), config.input_shards, Stage.GENERATE, config.input_digests
    )
    return [row for part in parts for row in data.read_jsonl(part / GENERATIONS)]


def score_axes(config: RankConfig, rows: list[dict[str, Any]], shard: int) -> tuple[dict[str, list[list[float]]], int]:
    """Every axis's scores of every row's candidates, and how many rows no axis had to score again.

    Axis by axis, chunk by chunk (`resume.chunked`, in `<work>/<axis>/`): an axis's model is loaded for its
    first unfinished chunk, scores the rest of the shard, and is released before the next axis loads. A
    chunk's identity is its axis's scoring (`axes.scoring_view`) and inputs: editing one axis scores only that
    axis again; pairing settings score nothing again."""
    found: dict[str, list[list[float]]] = {}
    resumed = len(rows)
    axis_list = config.ranking.scorer_axes()
    for n, axis in enumerate(axis_list):
        done = score_axis(config, axis, rows, shard, (n * len(rows), len(axis_list) * len(rows)))
        if [r["prompt_id"] for r in done.rows] != [r["prompt_id"] for r in rows]:
            raise contract.StageError(f"axis {axis.name}: its finished chunks do not match this shard's prompts")
        found[axis.name] = [r["scores"] for r in done.rows]
        resumed = min(resumed, done.resumed)
        if n < len(axis_list) - 1:  # after the last no model loads: a collection would only cost time
            axes.release()
    return found, resumed


def score_axis(
    config: RankConfig, axis: AxisSpec, rows: list[dict[str, Any]], shard: int, progress: tuple[int, int]
) -> resume.Chunked:
    """One axis's scores of the shard's rows (`score_axes`); `progress`: (items done before, items in all)."""
    spec = config.ranking
    loaded: list[axes.Scorer] = []  # none on a full resume

    def score_chunk(offset: int, chunk: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if not loaded:
            loaded.append(axes.build(axis, spec))
        out: list[dict[str, Any]] = []
        for start in range(0, len(chunk), spec.batch_size):
            batch = chunk[start : start + spec.batch_size]
            scores = loaded[0].score([r["prompt"] for r in batch], [r["all_generated_responses"] for r in batch])
            out += [{"prompt_id": r["prompt_id"], "scores": s} for r, s in zip(batch, scores, strict=True)]
            contract.report_progress(progress[0] + offset + start + len(batch), progress[1])
        return out, {}

    view = config.model_copy(update={"ranking": axes.scoring_view(spec, axis)})
    ident = resume.identity(view, scorer_inputs(config, [axis]), shard=shard)
    work = contract.work_dir(contract.output_dir(config, shard)) / axis.name
    done = resume.chunked(work, ident, rows, resume.chunk_size(spec.chunk_prompts, spec.batch_size), score_chunk)
    loaded.clear()  # the caller releases it
    return done


def compute(config: RankConfig, out: Path, shard: int) -> dict[str, Any]:
    spec = config.ranking
    rows = data.shard_slice(read_generations(config), shard, config.shards)
    axis_list = spec.scorer_axes()
    scored, resumed = score_axes(config, rows, shard)
    pairs: list[dict[str, Any]] = []
    drops = dict.fromkeys(pairing.Drop, 0)
    gate_drops = {a.name: 0 for a in axes.gates(axis_list)}
    sides: dict[str, tuple[list[float], list[float]]] = {a.name: ([], []) for a in axis_list}
    for i, row in enumerate(rows):
        per_axis = {name: scores[i] for name, scores in scored.items()}
        combined = axes.combine(per_axis, axis_list, spec.combine.normalize)
        ok = axes.passing(per_axis, axis_list)
        decided = pairing.decide(combined, row["all_generated_responses"], spec.pairing, ok)
        if isinstance(decided, pairing.Drop):
            drops[decided] += 1
            for name in axes.closed_gates(per_axis, axis_list) if decided is pairing.Drop.GATE else []:
                gate_drops[name] += 1
            continue
        pairs.append(pairing.preference_row(row, combined, decided, per_axis))
        for name, (chosen, rejected) in sides.items():
            chosen.append(per_axis[name][decided.chosen])
            rejected.append(per_axis[name][decided.rejected])
    data.write_jsonl(out / OUTPUT, pairs)

    def mean(values: list[float]) -> float:
        values = [v for v in values if math.isfinite(v)]  # an LLM judge's missing ratings left out
        return round(statistics.fmean(values), 4) if values else 0.0

    metrics: dict[str, Any] = {
        "prompts": len(rows),
        "pairs": len(pairs),
        **{f"dropped_{reason.value}": count for reason, count in drops.items()},
        "mean_chosen_score": mean([p["score_chosen"] for p in pairs]),
        "mean_rejected_score": mean([p["score_rejected"] for p in pairs]),
        "mean_chosen_chars": mean([len(p["chosen"][-1]["content"]) for p in pairs]),
        "mean_rejected_chars": mean([len(p["rejected"][-1]["content"]) for p in pairs]),
        "ranker": spec.ranker if not spec.axes else "axes",
        "resumed_prompts": resumed,
    }
    if spec.axes:  # per axis: what it thought of the pairs the axes chose together; what each gate dropped
        metrics["axes"] = {
            a.name: {
                "mean_chosen_score": mean(sides[a.name][0]),
                "mean_rejected_score": mean(sides[a.name][1]),
                **({"dropped_prompts": gate_drops[a.name]} if a.gate is not None else {}),
            }
            for a in axis_list
        }
    track(config.iteration, metrics, pairs)
    return metrics


SAMPLE_PAIRS = 20


def track(iteration: int, metrics: dict[str, Any], pairs: list[dict[str, Any]]) -> None:
    """The pairing statistics and score distributions, and a sample of the pairs (an artifact)."""
    tracker = tracking.current()
    tracker.metrics(metrics, step=iteration, prefix="rank/")
    for side in ("chosen", "rejected"):
        tracker.distribution(f"rank/{side}_score", [float(p[f"score_{side}"]) for p in pairs], step=iteration)
    tracker.distribution("rank/margin", [float(p["score_chosen"] - p["score_rejected"]) for p in pairs], step=iteration)
    if pairs and tracker.enabled:
        with tempfile.TemporaryDirectory() as scratch:  # not in `out`: the sample is no part of the output
            sample = Path(scratch) / "pairs-sample.jsonl"
            data.write_jsonl(sample, pairs[:SAMPLE_PAIRS])
            tracker.artifact(sample)


def scorer_inputs(config: RankConfig, axis_list: list[AxisSpec]) -> dict[str, str]:
    """The generations and the checkpoints of `axis_list`'s model axes (one `ranker` for the single form)."""
    found = {"generations": str(on_volume(config.input_dir))}
    for axis in axis_list:
        if axis.model and axis.kind != "function":
            found["ranker" if not config.ranking.axes else f"axis:{axis.name}"] = resolve_uri(axis.model)
    return found


def inputs(config: RankConfig) -> dict[str, str]:
    return scorer_inputs(config, config.ranking.scorer_axes())


def main() -> int:
    return contract.cli(RankConfig, compute, inputs)


if __name__ == "__main__":
    contract.exit_after(main)
