"""Evaluate stage: is this iteration's model better than the base model, and than the iteration before?

    python -m idpo_jobs.evaluate --config iter-2-evaluate.json

Generates one response per held-out prompt (greedy by default) with the generate stage's engines, and
judges it against the base model's and the previous iteration's saved responses with every axis of the run
(`ranking.axes`, or the single ranker; the rank stage's scorers, loaded one at a time). The combined
judgement is the axes' vote (`axes.vote`); with `ranking.axes`, each axis's own figures are reported under
its name too. Iteration 0 is the base model: it generates the responses later iterations are judged
against. Writes:

- `responses.jsonl`: `prompt_id`, `prompt`, `response` (plus `best_of_n_responses`, `best_of_n_response`);
- `alpaca_eval.json` (and `alpaca_eval_best_of_n.json`): AlpacaEval's model-outputs layout, for its
  official evaluator;
- `judgments.jsonl`: per prompt and baseline, P(this model's response wins) (and each axis's), the outcome,
  the lengths.

Metrics (docs/evaluation.md, docs/ranking.md): win rates with Wilson 95% intervals, length-controlled win
rates, ties, mean response length and its ratio to the base model's; per axis (`axes.<name>`) the win rates
and LC win rates with intervals, and a gate's pass rate; `idpo_jobs.winrate` does the statistics.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idpo_jobs import axes, contract, data, generate, rank, tracking, winrate
from idpo_jobs.config import (
    PVC_CLAIM_ENV,
    PVC_SCHEME,
    AxisSpec,
    EvaluateConfig,
    GenerationSpec,
    Stage,
    Workspace,
    on_volume,
)
from idpo_jobs.judge import Judge
from idpo_jobs.uris import resolve_uri

RESPONSES = "responses.jsonl"
ALPACA_EVAL = "alpaca_eval.json"
ALPACA_EVAL_BEST_OF_N = "alpaca_eval_best_of_n.json"
JUDGMENTS = "judgments.jsonl"
RESPONSES_KEPT = "responses.json"  # in the work directory, for a retried attempt's judges
# Greedy decoding through the engines' sampling path: a nucleus of (almost) no mass keeps only the
# most likely token, in transformers and vLLM alike (both always keep at least one).
GREEDY_TOP_P = 1e-9


def heldout_prompts(config: EvaluateConfig) -> list[dict[str, str]]:
    """The held-out prompts (EvaluationSpec.prompts describes the rule); the same set for every iteration."""
    ev, run = config.evaluation, config.prompts
    whole = {"per_iteration": None, "split_pattern": None, "limit": None}
    if ev.prompts is not None:
        return data.load_prompts(ev.prompts.model_copy(update={"split_pattern": None}), 1)[: ev.limit]
    problem = ev.heldout_problem(run, config.iterations)
    if problem:
        raise contract.StageError(problem)
    if run.per_iteration is None:
        return data.load_prompts(run.model_copy(update={**whole, "split": ev.heldout_split(run)}), 1)[: ev.limit]
    rows = data.load_prompts(run.model_copy(update=whole), 1)
    # The permutation data.load_prompts draws for perIteration: iterations slice it from the front.
    order = list(range(len(rows)))
    random.Random(run.seed).shuffle(order)
    trained = config.iterations * run.per_iteration
    left = min(ev.limit, len(rows) - trained)  # what no iteration trains on, up to the limit
    if left < ev.min_prompts:
        raise contract.StageError(
            f"only {max(left, 0)} held-out prompts are left, fewer than evaluation.minPrompts={ev.min_prompts}: "
            f"{config.iterations} iterations x prompts.perIteration={run.per_iteration} use {trained} of the "
            f"{len(rows)} prompts of {run.source}; lower iterations or prompts.perIteration, or set evaluation.prompts"
        )
    return [rows[i] for i in order[len(rows) - left :]]


def decoding(config: EvaluateConfig) -> GenerationSpec:
    """The run's generation section, made greedy (or the evaluation's temperature) and length-capped."""
    gen, ev = config.generation, config.evaluation
    update: dict[str, Any] = {"max_new_tokens": ev.max_new_tokens or gen.max_new_tokens}
    if ev.temperature == 0:
        update |= {"temperature": 1.0, "top_p": GREEDY_TOP_P}
    else:
        update["temperature"] = ev.temperature
    return gen.model_copy(update=update)


def sampling(config: EvaluateConfig) -> GenerationSpec:
    """Best-of-N samples as the generate stage draws them, at the evaluation's length cap."""
    gen = config.generation
    return gen.model_copy(update={"max_new_tokens": config.evaluation.max_new_tokens or gen.max_new_tokens})


def generate_responses(config: EvaluateConfig, prompts: list[str]) -> tuple[list[str], list[list[str]] | None]:
    """One decoded response per prompt, and best-of-N samples when asked; the engine is gone on return."""
    from idpo_jobs.models import render_prompt_ids

    spec = decoding(config)
    # The run's seed, not combined with the iteration: every model is sampled with the same stream.
    engine = generate.ENGINES[spec.engine](
        resolve_uri(config.model),
        spec,
        config.generation.seed,
        config.revision,
        config.chat_template,
        config.trust_remote_code,
    )
    prompt_ids = render_prompt_ids(engine.tokenizer, prompts)
    responses = [r[0] for r in engine.generate(prompt_ids, 1)]
    samples = None
    if config.evaluation.best_of_n:
        engine.spec = sampling(config)  # the engines read the spec per call: same weights, no second load
        samples = engine.generate(prompt_ids, config.evaluation.best_of_n)
    return responses, samples


def release_accelerator() -> None:
    """Free the engine's GPU memory before the ranker loads (vLLM reserves most of the GPU)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Judged:
    """One axis's judgement of responses against a baseline's, prompt by prompt: P(ours beats theirs), and a
    scalar scorer's scores of both (what its gate reads)."""

    preferences: list[float]
    scores: list[tuple[float, float]] | None = None


def judge_axis(scorer: axes.Scorer, prompts: list[str], ours: list[str], theirs: list[str]) -> Judged:
    """PairRM judges pairs in both orders; a reward model or a function scores each response, and equal
    scores tie. Identical responses always tie."""
    scores = None
    if isinstance(scorer, rank.PairRMRanker):
        probs = scorer.compare(prompts, ours, theirs)
    else:
        scores = [(a, b) for a, b in scorer.score(prompts, [[a, b] for a, b in zip(ours, theirs, strict=True)])]
        probs = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in scores]
    return Judged([0.5 if a == b else p for a, b, p in zip(ours, theirs, probs, strict=True)], scores)


def read_responses(config: EvaluateConfig, iteration: int) -> dict[str, str]:
    """An earlier evaluation's responses by prompt id; it must be complete."""
    (directory,) = contract.require_input(config.evaluation_dir(iteration), 1, config.stage)
    return {row["prompt_id"]: row["response"] for row in data.read_jsonl(directory / RESPONSES)}


@dataclass
class Versus:
    """Responses against a baseline's on the prompts both have."""

    against: str  # "base" or "previous"
    rows: list[dict[str, Any]]
    ours: list[str]
    theirs: list[str]
    judged: dict[str, Judged] = field(default_factory=dict)  # by axis
    by_judge: dict[str, list[float | None]] = field(default_factory=dict)  # P(ours wins) by each LLM judge

    @classmethod
    def of(cls, against: str, rows: list[dict[str, Any]], responses: list[str], baseline: dict[str, str]) -> Versus:
        shared = [(row, ours) for row, ours in zip(rows, responses, strict=True) if row["prompt_id"] in baseline]
        if not shared:
            raise contract.StageError(f"the {against} evaluation has none of these held-out prompts")
        theirs = [baseline[row["prompt_id"]] for row, _ in shared]
        return cls(against, [row for row, _ in shared], [ours for _, ours in shared], theirs)

    @property
    def prompts(self) -> list[str]:
        return [row["prompt"] for row in self.rows]

    def comparison(self, preferences: list[float] | list[float | None]) -> winrate.Comparison:
        """The statistics of `preferences`, leaving out the prompts judged None (an LLM judge's failures)."""
        kept = [
            (p, len(a) - len(b)) for p, a, b in zip(preferences, self.ours, self.theirs, strict=True) if p is not None
        ]
        return winrate.compare([winrate.outcome(p) for p, _ in kept], [d for _, d in kept])

    def combined(self, axis_list: list[AxisSpec]) -> list[float]:
        """Per prompt, P(ours beats theirs) by all axes together (`axes.vote`)."""

        def passed(axis: AxisSpec, i: int) -> tuple[bool, bool]:
            scores = self.judged[axis.name].scores
            assert axis.gate is not None and scores is not None  # gates are scalar scorers (AxisSpec)
            return axis.gate.passes(scores[i][0]), axis.gate.passes(scores[i][1])

        objectives = axes.objectives(axis_list)
        return [
            axes.vote(
                {a.name: self.judged[a.name].preferences[i] for a in objectives},
                {a.name: passed(a, i) for a in axes.gates(axis_list)},
                axis_list,
            )
            for i in range(len(self.rows))
        ]

    def judgments(self, preferences: list[float], per_axis: bool) -> list[dict[str, Any]]:
        out = []
        for i, (row, p, a, b) in enumerate(zip(self.rows, preferences, self.ours, self.theirs, strict=True)):
            entry = {
                "prompt_id": row["prompt_id"],
                "against": self.against,
                "preference": round(p, 6),
                "outcome": winrate.outcome(p),
                "chars": len(a),
                "baseline_chars": len(b),
            }
            if per_axis:
                entry["axes"] = {name: round(j.preferences[i], 6) for name, j in self.judged.items()}
            if self.by_judge:
                entry["judges"] = {n: None if v[i] is None else round(v[i], 6) for n, v in self.by_judge.items()}
            out.append(entry)
        return out


AXIS_DIGITS = 3  # per-axis figures: a block per axis, eight at most, in a 4 KiB summary


def alpaca_eval_rows(rows: list[dict[str, Any]], responses: list[str], generator: str) -> list[dict[str, str]]:
    return [
        {"instruction": row["prompt"], "output": out, "generator": generator}
        for row, out in zip(rows, responses, strict=True)
    ]


def mean_chars(texts: list[str]) -> float:
    return round(statistics.fmean(len(t) for t in texts), 2) if texts else 0.0


def score_all(
    config: EvaluateConfig,
    versus: list[Versus],
    prompts: list[str],
    samples: list[list[str]] | None = None,
    responses: list[str] | None = None,
) -> tuple[list[int] | None, dict[str, list[float]]]:
    """Every axis's judgement of each comparison in `versus`, its scores of the best-of-N `samples`, and each
    gate's scores of `responses` (its pass rate). Axes load one at a time. Returns the index of each prompt's
    best sample (None without samples) and the gates' scores of the responses."""
    ranking = config.ranking
    axis_list = ranking.scorer_axes()
    sample_scores: dict[str, list[list[float]]] = {}
    own: dict[str, list[float]] = {}
    best: list[int] | None = None
    for axis in axis_list:
        scorer = axes.build(axis, ranking)
        for vs in versus:
            vs.judged[axis.name] = judge_axis(scorer, vs.prompts, vs.ours, vs.theirs)
        if samples is not None and len(axis_list) == 1 and isinstance(scorer, rank.PairRMRanker):
            best = scorer.best_of_n(prompts, samples)  # llm-blender's n-1 comparisons, not a full ranking
        elif samples is not None:
            sample_scores[axis.name] = scorer.score(prompts, samples)
        if axis.gate is not None and responses is not None:
            own[axis.name] = [row[0] for row in scorer.score(prompts, [[r] for r in responses])]
        del scorer
        if axis is not axis_list[-1]:  # after the last no model loads: a collection would only cost time
            axes.release()
    if samples is not None and best is None:
        how = ranking.combine.normalize
        best = [axes.best({n: s[i] for n, s in sample_scores.items()}, axis_list, how) for i in range(len(samples))]
    return best, own


def judge_all(judges: list[Judge], versus: list[Versus], labels: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Every LLM judge of `evaluation.judges` on each comparison in `versus` (both orders; identical responses
    tie without a call), its answers cached in the stage's work directory (it outlives a failed attempt, so a
    retry pays only for what is left). Per judge, compact figures: the rates as
    [value, low, high] as an axis's, ties per baseline, and what the judge cost this attempt. `labels`: the
    baselines each comparison stands for (iteration 1's base is also its previous)."""
    out: dict[str, dict[str, Any]] = {}
    for judge in judges:
        spec = judge.spec
        figures: dict[str, Any] = {}
        for vs in versus:
            todo = [i for i, (a, b) in enumerate(zip(vs.ours, vs.theirs, strict=True)) if a != b]
            found = judge.compare(
                [vs.prompts[i] for i in todo], [vs.ours[i] for i in todo], [vs.theirs[i] for i in todo]
            )
            preferences: list[float | None] = [0.5] * len(vs.rows)
            for i, p in zip(todo, found, strict=True):
                preferences[i] = p
            vs.by_judge[spec.name] = preferences
            if any(p is not None for p in preferences):
                comparison = vs.comparison(preferences)
                for name in labels[vs.against]:
                    figures |= {**comparison.figures(f"vs_{name}"), f"ties_vs_{name}": comparison.ties}
        stats = judge.stats
        figures |= {
            "calls": stats.requests,
            "cached": stats.cached,
            "failures": sum(stats.failures.values()),
            "tokens": stats.prompt_tokens + stats.completion_tokens,
        }
        out[spec.name] = figures
    return out


def cached_responses(work: Path, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]] | None] | None:
    """The responses an earlier attempt generated for these prompts (kept in the work directory), or None: a
    retried stage judges the same texts, so its judges' cache answers (sampling need not be bit-exact)."""
    try:
        kept = json.loads((work / RESPONSES_KEPT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("prompt_ids") != [row["prompt_id"] for row in rows]:
        return None
    responses = kept.get("responses")
    return (responses, kept.get("samples")) if isinstance(responses, list) and len(responses) == len(rows) else None


def keep_responses(
    work: Path, rows: list[dict[str, Any]], responses: list[str], samples: list[list[str]] | None
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    kept = {"prompt_ids": [row["prompt_id"] for row in rows], "responses": responses, "samples": samples}
    tmp = work / f"{RESPONSES_KEPT}.tmp"
    tmp.write_text(json.dumps(kept))
    os.replace(tmp, work / RESPONSES_KEPT)


def compute(config: EvaluateConfig, out: Path, shard: int) -> dict[str, Any]:
    ev = config.evaluation
    rows = heldout_prompts(config)
    iterations = {"base": config.base_iteration, "previous": config.previous_iteration}
    # Read before the model loads: a missing baseline fails in seconds, not after generation.
    baselines = {name: read_responses(config, k) for name, k in iterations.items() if k is not None}
    prompts = [row["prompt"] for row in rows]
    work = contract.work_dir(contract.output_dir(config, shard))
    judges = [Judge(spec, work / "judges") for spec in ev.judges]  # a missing key fails now, not after generating
    kept = cached_responses(work, rows) if ev.judges else None
    if kept is not None:
        responses, samples = kept
    else:
        responses, samples = generate_responses(config, prompts)
        release_accelerator()
        if ev.judges:
            keep_responses(work, rows, responses, samples)

    generator = f"{config.run}-iter-{config.iteration}"
    axis_list = config.ranking.scorer_axes()
    per_axis = bool(config.ranking.axes)
    metrics: dict[str, Any] = {
        "prompts": len(rows),
        "mean_response_chars": mean_chars(responses),
        "empty_responses": sum(1 for r in responses if not r),
        "generator": generator,
        "ranker": config.ranking.ranker if not per_axis else "axes",
        "temperature": ev.temperature,
    }
    # Iteration 1's base is also its previous: judged once.
    distinct = {k: name for name, k in reversed(iterations.items()) if k is not None}
    versus = [Versus.of(name, rows, responses, baselines[name]) for name in distinct.values()]
    # Best-of-N is judged against the base model's greedy responses; for the base model itself, its own.
    reference = baselines.get("base") or (
        {row["prompt_id"]: r for row, r in zip(rows, responses, strict=True)} if config.iteration == 0 else None
    )
    needed = versus or samples is not None or (per_axis and axes.gates(axis_list))
    best_index, own = score_all(config, versus, prompts, samples, responses) if needed else (None, {})

    judgments: list[dict[str, Any]] = []
    by_axis: dict[str, dict[str, Any]] = {a.name: {} for a in axis_list}
    for vs in versus:
        combined = vs.combined(axis_list)
        judgments += vs.judgments(combined, per_axis)
        for name, k in iterations.items():
            if k is not None and distinct[k] == vs.against:
                metrics |= {**vs.comparison(combined).metrics(f"vs_{name}"), f"{name}_iteration": k}
                for a in axis_list:
                    by_axis[a.name] |= vs.comparison(vs.judged[a.name].preferences).figures(f"vs_{name}")
        if iterations["base"] is not None and distinct[iterations["base"]] == vs.against:
            theirs = mean_chars(vs.theirs)
            metrics["mean_length_ratio_vs_base"] = round(mean_chars(vs.ours) / theirs, 4) if theirs else None
    for a in axes.gates(axis_list):
        if a.gate is not None and a.name in own:
            by_axis[a.name]["pass_rate"] = round(statistics.fmean(a.gate.passes(v) for v in own[a.name]), AXIS_DIGITS)
    if per_axis:
        metrics["axes"] = {name: figures for name, figures in by_axis.items() if figures}

    if ev.judges and versus:
        labels = {
            vs.against: [n for n, k in iterations.items() if k is not None and distinct[k] == vs.against]
            for vs in versus
        }
        metrics["judges"] = judge_all(judges, versus, labels)

    best = None
    if samples is not None and best_index is not None:
        best = [row[i] for row, i in zip(samples, best_index, strict=True)]
        metrics |= {"best_of_n": ev.best_of_n, "best_of_n_mean_response_chars": mean_chars(best)}
        if reference is not None:
            vs = Versus.of("base", rows, best, reference)
            score_all(config, [vs], prompts)  # the axes again: the best sample depended on all of them
            combined = vs.combined(axis_list)
            metrics |= {f"best_of_n_{k}": v for k, v in vs.comparison(combined).metrics("vs_base").items()}
            judgments += [{**j, "best_of_n": True} for j in vs.judgments(combined, per_axis)]

    records = [{**row, "response": r} for row, r in zip(rows, responses, strict=True)]
    if samples is not None and best is not None:
        records = [
            {**rec, "best_of_n_responses": s, "best_of_n_response": b}
            for rec, s, b in zip(records, samples, best, strict=True)
        ]
    data.write_jsonl(out / RESPONSES, records)
    (out / ALPACA_EVAL).write_text(json.dumps(alpaca_eval_rows(rows, responses, generator), indent=1))
    if best is not None:
        bon = alpaca_eval_rows(rows, best, f"{generator}-best-of-{ev.best_of_n}")
        (out / ALPACA_EVAL_BEST_OF_N).write_text(json.dumps(bon, indent=1))
    if judgments:
        data.write_jsonl(out / JUDGMENTS, judgments)
    track(config, metrics)
    return metrics


def track(config: EvaluateConfig, metrics: dict[str, Any]) -> None:
    """On the run's own MLflow run: this evaluation's metrics (step = iteration; an axis's or a judge's rate as
    its value, `evaluate/axes/<axis>/lc_win_rate_vs_base`, `evaluate/judges/<judge>/lc_win_rate_vs_base`), the
    best checkpoint so far as a tag, and the report of the iterations evaluated so far as an artifact."""
    tracker = tracking.current()
    blocks = {
        block: {name: {k: winrate.value_of(v) for k, v in figures.items()} for name, figures in found.items()}
        for block in ("axes", "judges")
        if isinstance(found := metrics.get(block), dict)
    }
    tracker.metrics({**metrics, **blocks}, step=config.iteration, prefix="evaluate/", parent=True)
    if not tracker.enabled or config.iteration == 0:
        return
    ws = Workspace(config.workspace)
    iterations = []
    for k in range(config.iteration + 1):
        stages = {s: contract.read_success(on_volume(ws.stage_dir(k, s))) for s in (Stage.RANK, Stage.TRAIN)}
        evaluated = {"metrics": metrics} if k == config.iteration else contract.read_success(config.evaluation_dir(k))
        found = {s.value: {"metrics": v.get("metrics", {})} for s, v in stages.items() if v}
        iterations.append(
            {"iteration": k, "stages": {**found, "evaluate": {"metrics": (evaluated or {}).get("metrics", {})}}}
        )
    rule = config.evaluation.stop_when
    history = [it["stages"]["evaluate"]["metrics"] for it in iterations[1:]]
    best = winrate.best_of(history, rule)
    if best is not None:
        uri = ws.checkpoint_uri(best + 1)
        claim = os.environ.get(PVC_CLAIM_ENV)
        if claim and uri.startswith(PVC_SCHEME):
            uri = f"{PVC_SCHEME}{claim}/{uri[len(PVC_SCHEME) :]}"  # KServe's form, as status names it
        tracker.tag("idpo.best_iteration", str(best + 1), parent=True)
        tracker.tag("idpo.best_checkpoint", uri, parent=True)
    from idpo_jobs import report

    status = {"iterations": iterations, "bestIteration": best + 1 if best is not None else None}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "report.md"
        path.write_text(report.render_markdown(status, config.run))
        tracker.artifact(path, parent=True)


def inputs(config: EvaluateConfig) -> dict[str, str]:
    found = {"model": resolve_uri(config.model), "prompts": resolve_uri(config.prompts.source)}
    if config.evaluation.prompts is not None:
        found["heldout"] = resolve_uri(config.evaluation.prompts.source)
    for name, k in (("base", config.base_iteration), ("previous", config.previous_iteration)):
        if k is not None:
            found[name] = str(config.evaluation_dir(k))
    if config.ranking.model and config.ranking.ranker != "function":
        found["ranker"] = resolve_uri(config.ranking.model)
    return found


def main() -> int:
    return contract.cli(EvaluateConfig, compute, inputs)


if __name__ == "__main__":  # the guard matters: vLLM spawns worker processes that re-import this
    contract.exit_after(main)
