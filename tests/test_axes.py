"""Axes (docs/ranking.md): the spec's rules, per-prompt normalisation, the weighted combination, gates (never
chosen: a property test), pairing's length ratio, the evaluate stage's vote, and TRL's loss options checked
against the installed TRL."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from idpo_jobs import axes
from idpo_jobs.config import LOSS_TYPES, AxisSpec, PairingSpec, RankingSpec, Stage, TrainingSpec
from idpo_jobs.pairing import Drop, Pair, choose, decide
from idpo_jobs.rewards import starts_with_s
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec
from pydantic import ValidationError

from tests.conftest import merge, read_json, run_cli, tiny_spec, write_config


def axis(name: str, **fields: Any) -> AxisSpec:
    return AxisSpec.model_validate({"name": name, "kind": "function", "function": f"m:{name}", **fields})


S, LENGTH = axis("s", weight=1.0), axis("length", weight=1.0)
DISTINCT = axis("distinct", gate={"min": 0.5})


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"weight": 1, "gate": {"min": 0}}, "exactly one of `weight` (an objective) and `gate`"),
        ({}, "exactly one of `weight` (an objective) and `gate`"),
        ({"weight": 0}, "weight 0 makes no objective"),
        ({"gate": {}}, "a gate needs `min`, `max` or both"),
        ({"gate": {"min": 2, "max": 1}}, "gate min 2 is above max 1: nothing passes"),
        ({"gate": {"min": "nan"}}, "finite number"),
        ({"kind": "pairrm", "model": "m", "gate": {"min": 0}}, "PairRM's scores are relative"),
        ({"kind": "reward-model", "weight": 1}, "of kind reward-model needs `model`"),
        ({"function": None, "weight": 1}, "of kind function needs `function: module:callable`"),
        ({"name": "Not_A_Label", "weight": 1}, "should match pattern"),
        ({"name": "x" * 33, "weight": 1}, "at most 32 characters"),
    ],
    ids=[
        "both",
        "neither",
        "zero-weight",
        "empty-gate",
        "empty-band",
        "nan-bound",
        "pairrm-gate",
        "model-missing",
        "function-missing",
        "bad-name",
        "long-name",
    ],
)
def test_an_axis_is_an_objective_or_a_gate_of_a_scorer_it_can_load(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        axis(**{"name": "a", **fields})


def test_axes_have_unique_names_at_least_one_objective_and_at_most_eight() -> None:
    with pytest.raises(ValidationError, match="names must be unique; s repeated"):
        RankingSpec(axes=[S, S])
    with pytest.raises(ValidationError, match="at least one axis needs a `weight`"):
        RankingSpec(axes=[DISTINCT])
    with pytest.raises(ValidationError, match="at most 8 items"):
        RankingSpec(axes=[axis(f"a{n}", weight=1) for n in range(9)])


def test_the_single_ranker_is_one_objective_named_after_its_kind() -> None:
    (pairrm,) = RankingSpec().scorer_axes()
    assert (pairrm.name, pairrm.kind, pairrm.model, pairrm.weight) == ("pairrm", "pairrm", "llm-blender/PairRM", 1.0)
    (fn,) = RankingSpec(ranker="function", function="m:f").scorer_axes()
    assert (fn.name, fn.function, fn.model) == ("function", "m:f", None)  # its default model is not loaded
    assert RankingSpec(axes=[S, DISTINCT]).scorer_axes() == [S, DISTINCT]  # `ranker` is ignored


def test_stop_when_names_an_axis_of_the_run() -> None:
    ranking = {"axes": [S.to_wire(), DISTINCT.to_wire()]}
    evaluation = {"stopWhen": {"axis": "length", "below": 0.5}}
    refused = "stopWhen.axis: 'length' is not an axis of ranking.axes (s, distinct)"
    with pytest.raises(ValidationError, match=re.escape(refused)):
        IterativeDPORunSpec.model_validate({"ranking": ranking, "evaluation": evaluation})
    with pytest.raises(ValidationError, match=re.escape("per-axis figures come with ranking.axes")):
        IterativeDPORunSpec.model_validate({"evaluation": evaluation})
    IterativeDPORunSpec.model_validate({"ranking": ranking, "evaluation": {"stopWhen": {"axis": "s", "below": 0.5}}})
    with pytest.raises(ValidationError, match="`below`, `patience` or `maxLengthRatio`"):
        IterativeDPORunSpec.model_validate({"evaluation": {"stopWhen": {"axis": "s"}}})


# ---------------------------------------------------------------------------------------------
# Normalisation and combination
# ---------------------------------------------------------------------------------------------
def test_rank_normalisation_scales_ranks_to_0_1_and_averages_ties() -> None:
    assert axes.normalize([3.0, -1.0, 10.0, 3.0], "rank") == [0.5, 0.0, 1.0, 0.5]
    assert axes.normalize([2.0, 2.0], "rank") == [0.5, 0.5]
    assert axes.normalize([1.0, 2.0, 3.0], "zscore") == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)
    assert axes.normalize([4.0, 4.0], "zscore") == [0.0, 0.0]
    assert axes.normalize([4.0, -7.5], "none") == [4.0, -7.5]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=8), how=st.sampled_from(["rank", "zscore"]))
def test_normalisation_keeps_each_prompts_order(values: list[float], how: str) -> None:
    out = axes.normalize(values, how)
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:
                assert out[i] <= out[j]
    if how == "rank":
        assert all(0.0 <= v <= 1.0 for v in out)


def test_objectives_combine_by_weight_on_a_common_scale_and_one_objective_keeps_its_raw_scores() -> None:
    scores = {"s": [0.9, 0.1, 0.5], "length": [10.0, 30.0, 20.0], "distinct": [1.0, 0.0, 1.0]}
    # s ranks (1, 0, .5), length ranks (0, 1, .5): equal weights tie the first two; a heavier s breaks it.
    assert axes.combine(scores, [S, LENGTH, DISTINCT], "rank") == [1.0, 1.0, 1.0]
    heavy = axis("s", weight=3.0)
    assert axes.combine(scores, [heavy, LENGTH], "rank") == [3.0, 1.0, 2.0]
    minimise = axis("length", weight=-1.0)
    assert axes.combine(scores, [S, minimise], "rank") == [1.0, -1.0, 0.0]
    assert axes.combine(scores, [LENGTH, DISTINCT], "rank") == [10.0, 30.0, 20.0]  # a gate is no objective


# ---------------------------------------------------------------------------------------------
# Gates and pairing
# ---------------------------------------------------------------------------------------------
def test_a_response_that_fails_a_gate_is_rejected_before_any_that_passes() -> None:
    scores = {"s": [0.9, 0.5, 0.1, 0.2], "distinct": [0.1, 0.9, 0.9, 0.9]}
    gated = [S, DISTINCT]
    combined, ok = axes.combine(scores, gated, "rank"), axes.passing(scores, gated)
    assert ok == [False, True, True, True]
    # The best-scored response fails the gate: the best passing one is chosen and the failing one rejected.
    assert decide(combined, ["a", "b", "c", "d"], PairingSpec(), ok) == Pair(chosen=1, rejected=0)
    assert axes.closed_gates({"s": [1, 2], "distinct": [0.1, 0.2]}, gated) == ["distinct"]
    assert decide([1.0, 2.0], ["a", "b"], PairingSpec(), [False, False]) is Drop.GATE


responses = st.lists(st.text(alphabet="ab ", max_size=12), min_size=2, max_size=6)


@settings(max_examples=500, deadline=None)
@given(
    data=st.data(),
    texts=responses,
    penalty=st.sampled_from([0.0, 0.5, 5.0]),
    ratio=st.sampled_from([None, 0.5, 1.0, 1.5]),
    drop_ties=st.booleans(),
    how=st.sampled_from(["rank", "zscore", "none"]),
)
def test_a_response_failing_a_gate_is_never_chosen_and_a_prompt_without_one_is_dropped(
    data: st.DataObject, texts: list[str], penalty: float, ratio: float | None, drop_ties: bool, how: str
) -> None:
    n = len(texts)
    column = st.lists(st.floats(-10, 10), min_size=n, max_size=n)
    scores = {"s": data.draw(column), "length": data.draw(column), "distinct": data.draw(column)}
    band = axis("band", gate={"min": -2.0, "max": 5.0})
    gated = [S, LENGTH, axis("distinct", gate={"min": 0.0}), band]
    scores["band"] = data.draw(column)
    low = data.draw(st.none() | st.floats(0.5, 1.0))
    spec = PairingSpec(length_penalty=penalty, max_length_ratio=ratio, min_length_ratio=low, drop_ties=drop_ties)
    ok = axes.passing(scores, gated)
    found = decide(axes.combine(scores, gated, how), texts, spec, ok)
    if not any(ok):
        assert found is Drop.GATE
        for name in axes.closed_gates(scores, gated):  # a gate counts the prompts it alone closes
            gate = next(a.gate for a in gated if a.name == name)
            assert gate is not None and not any(gate.passes(v) for v in scores[name])
    elif isinstance(found, Pair):
        assert ok[found.chosen], "a response that fails a gate was chosen"
        assert found.chosen != found.rejected
        assert ratio is None or len(texts[found.chosen]) <= ratio * len(texts[found.rejected])
        assert low is None or len(texts[found.chosen]) >= low * len(texts[found.rejected])
        assert scores["distinct"][found.chosen] >= 0.0 and -2.0 <= scores["band"][found.chosen] <= 5.0
    else:
        assert found in (Drop.TIE, Drop.LENGTH_RATIO)


def test_max_length_ratio_pairs_the_best_with_the_worst_it_is_not_much_longer_than() -> None:
    texts = ["x" * 100, "x" * 40, "x" * 90, "x" * 10]
    scores = [4.0, 3.0, 2.0, 1.0]
    assert choose(scores, texts, PairingSpec()) == Pair(0, 3)
    assert choose(scores, texts, PairingSpec(max_length_ratio=1.2)) == Pair(0, 2)  # 100 <= 1.2 x 90
    assert decide(scores, texts, PairingSpec(max_length_ratio=1.05)) is Drop.LENGTH_RATIO  # nothing is 96+ long
    assert choose([4.0, 1.0], ["", ""], PairingSpec(max_length_ratio=1.0, drop_ties=False)) == Pair(0, 1)


def test_a_length_band_pairs_the_best_with_the_worst_of_about_its_length_either_way() -> None:
    texts = ["x" * 60, "x" * 100, "x" * 55, "x" * 10]
    scores = [4.0, 3.0, 2.0, 1.0]
    assert choose(scores, texts, PairingSpec(max_length_ratio=1.0)) == Pair(0, 1)  # one-sided: only longer ones lose
    band = PairingSpec(max_length_ratio=1.2, min_length_ratio=0.8)
    assert choose(scores, texts, band) == Pair(0, 2)  # 55 and 60 within the band; 100 and 10 not
    assert decide([4.0, 3.0, 1.0], ["x" * 60, "x" * 100, "x" * 10], band) is Drop.LENGTH_RATIO
    assert choose(scores, texts, PairingSpec(min_length_ratio=0.9)) == Pair(0, 3)  # one-sided: only shorter ones lose


def test_the_single_ranker_pairs_as_before() -> None:
    """Without gates or a ratio, `decide` is the pairing of the single-ranker form (tests/test_pairing.py)."""
    for scores, texts in (([0.1, 0.9, -0.5, 0.3], "abcd"), ([0.5, 0.5, 0.5], "abc"), ([0.2, 0.2, 0.1], "aab")):
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        tie = scores[best] == scores[worst] or texts[best] == texts[worst]
        assert decide(scores, list(texts), PairingSpec()) == (Drop.TIE if tie else Pair(best, worst))


# ---------------------------------------------------------------------------------------------
# The evaluate stage's vote
# ---------------------------------------------------------------------------------------------
def test_the_vote_puts_gates_first_then_weighs_each_objectives_preference() -> None:
    both, heavy = [S, LENGTH, DISTINCT], [axis("s", weight=3.0), LENGTH]
    assert axes.vote({"s": 1.0, "length": 1.0}, {"distinct": (False, True)}, both) == 0.0
    assert axes.vote({"s": 0.0, "length": 0.0}, {"distinct": (True, False)}, both) == 1.0
    assert axes.vote({"s": 1.0, "length": 0.0}, {"distinct": (True, True)}, both) == 0.5
    assert axes.vote({"s": 1.0, "length": 0.0}, {}, heavy) == 0.75
    assert axes.vote({"s": 0.3}, {}, [S]) == pytest.approx(0.3)  # one objective: its own preference
    assert axes.best({"s": [0.9, 0.5, 0.1], "distinct": [0.0, 1.0, 1.0]}, [S, DISTINCT], "rank") == 1


# ---------------------------------------------------------------------------------------------
# TRL's losses
# ---------------------------------------------------------------------------------------------
def test_the_loss_names_are_the_installed_trls() -> None:
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(LOSS_TYPES)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    assert {"loss_weights", "ld_alpha", "use_weighting", "label_smoothing"} <= fields


@pytest.mark.parametrize(
    ("training", "says"),
    [
        ({"lossType": ["sigmoid", "sft"], "lossWeights": [1.0]}, "lossWeights: 1 weights for 2 loss types"),
        ({"lossType": ["sigmoid", "sigmoid"]}, "names a loss twice"),
        ({"lossType": "exo_pair"}, "labelSmoothing: loss exo_pair needs it above 0"),
        ({"lossType": ["aot"], "useWeighting": True}, "useWeighting: TRL does not weight the aot losses"),
        ({"lossType": "simpo"}, "lossType"),
        ({"ldAlpha": 1.5}, "ldAlpha"),
    ],
    ids=["weights", "twice", "exo-pair", "weighted-aot", "unknown", "ld-alpha"],
)
def test_a_loss_combination_trl_refuses_is_refused_naming_the_field(training: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        TrainingSpec.model_validate(training)


def test_trl_itself_refuses_what_the_spec_refuses_and_takes_what_it_allows(tiny, tmp_path) -> None:
    """The refused combinations fail in TRL too (so refusing them early loses nothing); an allowed combination of
    every option builds TRL's config and trainer."""
    import datasets
    from idpo_jobs import train
    from idpo_jobs.models import load_causal_lm, load_tokenizer
    from trl import DPOConfig, DPOTrainer

    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0], use_cpu=True)
    allowed = {"lossType": ["sigmoid_norm", "sft"], "lossWeights": [1.0, 0.2], "ldAlpha": 0.5, "useWeighting": True}
    spec = tiny_spec(tiny, training=allowed)
    _, config = write_config(spec, tmp_path, StageKey(1, Stage.TRAIN))
    args = train.dpo_config(config, tmp_path / "out", cuda=False)  # type: ignore[arg-type]
    assert (args.loss_type, args.loss_weights, args.ld_alpha, args.use_weighting) == (
        ["sigmoid_norm", "sft"],
        [1.0, 0.2],
        0.5,
        True,
    )
    turns = (("user", "Hi"), ("assistant", "sun"), ("assistant", "moon"))
    user, chosen, rejected = ({"role": r, "content": c} for r, c in turns)
    pairs = datasets.Dataset.from_list([{"prompt": [user], "chosen": [chosen], "rejected": [rejected]}] * 2)
    model, tokenizer = load_causal_lm(str(tiny["policy"]), None, "float32"), load_tokenizer(str(tiny["policy"]))
    for refused in ({"loss_type": ["aot"], "use_weighting": True}, {"loss_type": ["exo_pair"]}):
        bad = DPOConfig(output_dir=str(tmp_path / "bad"), use_cpu=True, report_to="none", **refused)
        with pytest.raises((ValueError, NotImplementedError)):
            DPOTrainer(model=model, args=bad, train_dataset=pairs, processing_class=tokenizer)
    DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------
# Per-axis figures in summaries, status, stop rules, reports and tracking
# ---------------------------------------------------------------------------------------------
LONGEST = [f"{'x' * 31}{n}" for n in range(8)]  # 8 axes of 32-character names: the caps


def evaluate_metrics(previous: int = 99) -> dict[str, Any]:
    """What the evaluate stage reports at the caps: 8 axes (one of them a gate), best-of-N, tracking ids."""
    from idpo_jobs import winrate

    c = winrate.compare([1, 0, 0.5, 1, 0, 1, 1, 0, 1, 0.5] * 20, [n * 37.3 - 1000 for n in range(200)])
    metrics: dict[str, Any] = {"prompts": 200, "mean_response_chars": 1534.44, "empty_responses": 0,
                               "generator": "r" * 253 + "-iter-100", "ranker": "axes", "temperature": 0.7,
                               "best_of_n": 64, "best_of_n_mean_response_chars": 1534.44,
                               "mean_length_ratio_vs_base": 1.2345, "mlflow_run_id": "a" * 32,
                               "mlflow_iteration_run_id": "b" * 32}  # fmt: skip
    for name, k in (("base", 0), ("previous", previous)):
        metrics |= {**c.metrics(f"vs_{name}"), f"{name}_iteration": k}
    metrics |= {f"best_of_n_{k}": v for k, v in c.metrics("vs_base").items()}
    metrics["axes"] = {n: {**c.figures("vs_base"), **c.figures("vs_previous")} for n in LONGEST}
    metrics["axes"][LONGEST[-1]]["pass_rate"] = 0.987
    return metrics


def test_an_evaluation_with_eight_axes_fits_its_termination_message_with_every_metric(tmp_path) -> None:
    from idpo_jobs import contract

    log = tmp_path / "term"
    summary = {"stage": "evaluate", "iteration": 100, "shard": 0, "shards": 1, "metrics": evaluate_metrics(),
               "startTime": 1.0e9, "completionTime": 1.0e9, "digest": "0123456789abcdef",
               "warnings": ["w" * 300] * 5}  # fmt: skip
    contract.write_termination_log(contract.StageConfig.model_construct(termination_log=str(log)), summary)
    written = json.loads(log.read_text())
    assert len(log.read_bytes()) <= contract.TERMINATION_LIMIT
    assert written["metrics"] == json.loads(json.dumps(summary["metrics"]))  # warnings went first, not metrics
    assert len(written["warnings"]) == 1


def test_a_run_with_eight_axes_at_the_caps_keeps_its_status_under_256_kib_and_its_axis_decidable() -> None:
    from idpo_operator.status import build_status

    from tests.test_status import METRICS, WS, at_the_caps

    s, records, frozen = at_the_caps()
    rule = {"axis": LONGEST[3], "patience": 100, "maxLengthRatio": 100}
    ranking = {"axes": [{"name": n, "kind": "function", "function": "m:f", "weight": 1} for n in LONGEST]}
    s = s.model_validate({**s.to_wire(), "ranking": ranking, "evaluation": {"stopWhen": rule}})
    ranked = {n: {"mean_chosen_score": 1.2345, "mean_rejected_score": -0.9876, "dropped_prompts": 17} for n in LONGEST}
    for key, record in records.items():
        if key.stage is Stage.EVALUATE:
            record.metrics = evaluate_metrics(max(key.iteration - 1, 0))
        elif key.stage is Stage.RANK:
            record.metrics = {**METRICS[Stage.RANK], "dropped_gates": 3, "axes": ranked}
    status = build_status(s, records, WS, claim="c" * 253, frozen=frozen)
    size = len(json.dumps(status, separators=(",", ":")))
    assert size < 256 * 1024, size
    oldest, latest = status["iterations"][1]["stages"]["evaluate"], status["iterations"][-1]["stages"]["evaluate"]
    assert latest["metrics"] == evaluate_metrics(99)  # the latest iterations stay whole
    # An old iteration keeps what stopWhen and bestIteration read: its axis's figures and the length ratio.
    assert oldest["compacted"] and oldest["metrics"]["axes"] == {
        LONGEST[3]: {"lc_win_rate_vs_base": 0.598, "lc_win_rate_vs_previous": 0.598}
    }
    assert oldest["metrics"]["mean_length_ratio_vs_base"] == 1.2345
    assert status["bestIteration"] == 1  # every iteration ties: the earliest


def test_a_summary_carries_bounded_per_axis_figures_and_nothing_deeper() -> None:
    from idpo_operator.observe import parse_summary

    figures = {"lc_win_rate_vs_base": [0.61, 0.52, float("nan")], "pass_rate": 0.9}
    parsed = parse_summary(json.dumps({"metrics": {"prompts": 8, "axes": {"s": figures}}}))
    assert parsed.metrics["axes"] == {"s": {"lc_win_rate_vs_base": [0.61, 0.52, None], "pass_rate": 0.9}}
    assert "axes.s.lc_win_rate_vs_base" in parsed.warnings[0]
    for bad, says in (
        ({f"a{n}": {} for n in range(9)}, "not a map of at most 8 axes"),
        ({"s": [1]}, "not a map of at most 64 metrics"),
        ({"s": {"deeper": {"x": 1}}}, "metric 'axes.s.deeper' is a dict"),
        ([1, 2], "not a map of at most 8 axes"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_summary(json.dumps({"metrics": {"axes": bad}}))


def test_shards_merge_per_axis_figures_as_they_merge_the_stage_metrics() -> None:
    from idpo_operator.status import merge_metrics

    parts = [
        {"pairs": 3, "axes": {"s": {"mean_chosen_score": 1.0, "dropped_prompts": 1}}},
        {"pairs": 1, "axes": {"s": {"mean_chosen_score": 3.0, "dropped_prompts": 2}, "t": {"mean_chosen_score": 5.0}}},
    ]
    merged = merge_metrics(Stage.RANK, parts)
    assert merged["axes"] == {"s": {"mean_chosen_score": 1.5, "dropped_prompts": 3}, "t": {"mean_chosen_score": 5.0}}


def history(*rows: tuple[float, float, float]) -> list[dict[str, Any]]:
    """Evaluations 1..n: (combined LC vs base, axis s's LC vs base, length ratio)."""
    return [
        {"lc_win_rate_vs_base": c, "axes": {"s": {"lc_win_rate_vs_base": [a, a - 0.1, a + 0.1]}},
         "mean_length_ratio_vs_base": r}
        for c, a, r in rows
    ]  # fmt: skip


def test_stop_when_and_the_best_iteration_follow_an_axis_and_the_length_guard() -> None:
    from idpo_jobs import winrate
    from idpo_jobs.config import StopWhen

    runs = history((0.7, 0.4, 1.0), (0.6, 0.6, 1.1), (0.9, 0.8, 1.6))
    assert winrate.best_of(runs, None) == 2
    assert winrate.best_of(runs, StopWhen(axis="s", below=0.1)) == 2
    assert winrate.best_of(runs, StopWhen(axis="s", below=0.1, max_length_ratio=1.5)) == 1  # 3 is too long
    assert winrate.should_stop(runs[:1], StopWhen(axis="s", below=0.5)) == (
        True,
        "lcWinRateVsBase of axis s 0.400 is below 0.5",
    )
    assert winrate.should_stop(runs[:2], StopWhen(axis="s", below=0.5))[0] is False
    stop, why = winrate.should_stop(runs, StopWhen(max_length_ratio=1.5))
    assert stop and why == "the mean response length is 1.60 times the base model's, above 1.5"
    assert winrate.should_stop(runs[:2], StopWhen(max_length_ratio=1.5)) == (False, "")


def test_the_memory_plan_is_the_largest_axis_and_says_so() -> None:
    from idpo_operator import memory

    skywork = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    axes_spec = [
        {"name": "pair", "kind": "pairrm", "model": "llm-blender/PairRM", "weight": 1},
        {"name": "rm", "kind": "reward-model", "model": skywork, "weight": 1},
        {"name": "fmt", "kind": "function", "function": "m:f", "gate": {"min": 0}},
    ]
    spec = IterativeDPORunSpec.model_validate({"ranking": {"axes": axes_spec}})
    rank = memory.plan_memory(spec).stage("rank")
    single = IterativeDPORunSpec.model_validate({"ranking": {"ranker": "reward-model", "model": skywork}})
    alone = memory.plan_memory(single).stage("rank")
    pairrm = memory.plan_memory(IterativeDPORunSpec()).stage("rank")
    assert rank.total == alone.total and rank.total is not None and pairrm.total is not None
    assert rank.total < alone.total + pairrm.total  # the largest, not the sum
    assert rank.variant == "3 axes, one at a time: memory is the largest, axis rm"
    assert rank.notes[:3] == (
        f"axis pair (pairrm): {pairrm.total / memory.GB:.1f} GB",
        f"axis rm (reward-model): {rank.total / memory.GB:.1f} GB",
        "axis fmt (function): 0.0 GB",
    )
    assert "memory is the largest, axis rm" in memory.format_plan(memory.plan_memory(spec))


def test_every_function_axis_is_under_the_policy() -> None:
    from idpo_operator import policy

    axes_spec = [
        {"name": "s", "kind": "function", "function": "idpo_jobs.rewards:starts_with_s", "weight": 1},
        {"name": "env", "kind": "function", "function": "os:getenv", "gate": {"min": 0}},
    ]
    spec = IterativeDPORunSpec.model_validate({"ranking": {"axes": axes_spec}})
    assert policy.violations(spec, policy.default("ghcr.io/x/jobs:1")) == [
        "spec.ranking.axes[1].function: module of 'os:getenv' is not allowed (modules: idpo_jobs.rewards)"
    ]


def axes_status() -> dict[str, Any]:
    evaluations = [
        {"prompts": 96, "mean_response_chars": 60.0, "axes": {"d": {"pass_rate": 1.0}}},
        {"prompts": 96, "mean_response_chars": 66.0, "mean_length_ratio_vs_base": 1.1,
         "axes": {"s": {"win_rate_vs_base": [0.7, 0.6, 0.78], "lc_win_rate_vs_base": [0.68, 0.55, 0.79]},
                  "d": {"win_rate_vs_base": [0.5, 0.4, 0.6], "pass_rate": 0.99}}},
    ]  # fmt: skip
    rank = {"axes": {"s": {"mean_chosen_score": 0.2, "mean_rejected_score": 0.05}, "d": {"dropped_prompts": 2}}}
    return {
        "iterations": [
            {"iteration": 0, "stages": {"evaluate": {"metrics": evaluations[0]}}},
            {"iteration": 1, "stages": {"evaluate": {"metrics": evaluations[1]}, "rank": {"metrics": rank}}},
        ]
    }


def test_the_report_has_a_table_and_a_plot_per_axis() -> None:
    from idpo_jobs import report

    text = report.render_markdown(axes_status())
    rows = [line for line in text.split("## Axes")[1].splitlines() if line.startswith("| 1 |")]
    assert rows == [
        "| 1 | s | 0.700 [0.600, 0.780] | 0.680 [0.550, 0.790] | – | – | – | 0.200 / 0.050 | – |",
        "| 1 | d | 0.500 [0.400, 0.600] | – | – | – | 0.990 | – | 2 |",
    ]
    assert "| 1 | 1.10 | 66.0 |" in text.replace("| – ", "")  # the length against the base model's
    page = report.render_html(axes_status())
    assert page.count("data:image/png;base64,") == 2 and "<td>0.680 [0.550, 0.790]</td>" in page
    assert "## Axes" not in report.render_markdown({"iterations": [{"iteration": 1, "stages": {}}]})


def test_idpo_status_shows_each_axis_and_the_length_against_the_base_model() -> None:
    from idpo_operator import table

    lines = table.render(axes_status()).splitlines()
    block = lines[lines.index("axes: LC win rate vs base (gates: pass rate)") + 1 :]
    assert [line.split() for line in block] == [
        ["ITER", "D", "S", "LENGTH/BASE"],
        ["0", "pass", "1.000", "-", "-"],
        ["1", "pass", "0.990", "0.680", "1.1"],
    ]


def test_tracking_logs_each_axis_figure_under_its_path() -> None:
    from idpo_jobs import tracking

    assert tracking.numbers({"loss": 0.5, "axes": {"s": {"pass_rate": 0.9, "ci": [1, 2]}}, "name": "x"}) == {
        "loss": 0.5,
        "axes/s/pass_rate": 0.9,
    }


# ---------------------------------------------------------------------------------------------
# The rank stage: axis by axis, resumable
# ---------------------------------------------------------------------------------------------
R1 = StageKey(1, Stage.RANK)
TWO_AXES = {
    "axes": [
        {"name": "s", "kind": "function", "function": "rewards:starts_with_s", "weight": 1.0},
        {"name": "distinct", "kind": "function", "function": "idpo_jobs.rewards:distinct_words", "gate": {"min": 0.9}},
    ],
    "batchSize": 2,
    "chunkPrompts": 2,  # 8 chunks of 16 prompts per axis
}


@pytest.fixture(scope="module")
def generated(tiny, tmp_path_factory) -> Path:
    """Iteration 1's generations: 16 prompts, 3 responses each."""
    from tests.test_resume_stages import PROMPTS, ok

    ws = tmp_path_factory.mktemp("generated")
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS), ws, StageKey(1, Stage.GENERATE))
    ok(run_cli("generate", config))
    return ws


def test_the_rank_stage_scores_axis_by_axis_and_writes_the_evidence(tiny, generated: Path, tmp_path: Path) -> None:
    from tests.test_resume_stages import PROMPTS, hooks_env, ok

    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, ranking=TWO_AXES), generated, R1, out_dir=tmp_path)
    log = tmp_path / "progress.log"
    ok(run_cli("rank", config, **hooks_env(IDPO_TEST_PROGRESS_LOG=str(log))))
    part = tmp_path / "iter-1" / "rank" / "part-00000"
    metrics = read_json(part / "_SUCCESS.json")["metrics"]
    pairs = [json.loads(line) for line in (part / "pairs.jsonl").read_text().splitlines()]
    assert metrics["prompts"] == 16 and metrics["pairs"] == len(pairs) >= 1
    assert metrics["pairs"] + metrics["dropped_ties"] + metrics["dropped_gates"] == 16
    assert metrics["axes"]["distinct"]["dropped_prompts"] <= metrics["dropped_gates"]
    for pair in pairs:
        texts = pair["all_generated_responses"]
        assert set(pair["axis_scores"]) == {"s", "distinct"}
        assert pair["axis_scores"]["s"] == pair["all_rm_scores"] == [starts_with_s("", t) for t in texts]
        chosen = texts.index(pair["chosen"][-1]["content"])
        assert pair["axis_scores"]["distinct"][chosen] >= 0.9  # the gate holds
    # The axes scored one after the other: every report of the first before any of the second.
    reports = [line.split()[2:] for line in log.read_text().splitlines()]
    assert [int(d) for d, _ in reports] == sorted(int(d) for d, _ in reports) and reports[-1] == ["32", "32"]


def test_a_killed_rank_stage_scores_only_the_unfinished_chunks_of_the_unfinished_axis(
    tiny, generated: Path, tmp_path: Path
) -> None:
    """Killed in the second axis's third chunk, then run again with other weights, gates and pairing: the first
    axis is not scored again, the second resumes at its third chunk, and the pairs are those of the new spec."""
    from tests.test_resume_stages import PROMPTS, hooks_env, ok

    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, ranking=TWO_AXES), generated, R1, out_dir=tmp_path)
    killed = run_cli("rank", config, **hooks_env(IDPO_TEST_KILL_AT="marker:distinct/chunk-00002"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    changed = merge(TWO_AXES, {"pairing": {"maxLengthRatio": 2.0}})
    changed["axes"] = [{**TWO_AXES["axes"][0], "weight": 3.0}, {**TWO_AXES["axes"][1], "gate": {"min": 0.5}}]
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, ranking=changed), generated, R1, out_dir=tmp_path)
    log = tmp_path / "progress.log"
    ok(run_cli("rank", config, **hooks_env(IDPO_TEST_PROGRESS_LOG=str(log))))
    done = [int(line.split()[2]) for line in log.read_text().splitlines()]
    assert min(done) == 16 + 4 + 2  # the first report: the second axis's third chunk
    metrics = read_json(tmp_path / "iter-1" / "rank" / "part-00000" / "_SUCCESS.json")["metrics"]
    assert metrics["resumed_prompts"] == 4
    once = tmp_path / "once"
    config, _ = write_config(tiny_spec(tiny, prompts=PROMPTS, ranking=changed), generated, R1, out_dir=once)
    ok(run_cli("rank", config))
    pairs = (once / "iter-1" / "rank" / "part-00000" / "pairs.jsonl").read_text()
    assert (tmp_path / "iter-1" / "rank" / "part-00000" / "pairs.jsonl").read_text() == pairs


def test_an_axis_chunks_identity_changes_with_its_scorer_only(tiny, tmp_path: Path) -> None:
    from idpo_jobs import resume
    from idpo_jobs.rank import scorer_inputs

    def identity(ranking: dict[str, Any], n: int) -> str:
        _, config = write_config(tiny_spec(tiny, ranking=ranking), tmp_path, R1)
        axis = config.ranking.scorer_axes()[n]  # type: ignore[attr-defined]
        view = config.model_copy(update={"ranking": axes.scoring_view(config.ranking, axis)})  # type: ignore[attr-defined]
        return resume.identity(view, scorer_inputs(config, [axis]), shard=0)  # type: ignore[arg-type]

    other_function = [TWO_AXES["axes"][0], {**TWO_AXES["axes"][1], "function": "rewards:starts_with_s"}]
    reweighted = [{**TWO_AXES["axes"][0], "weight": -2.0}, {**TWO_AXES["axes"][1], "gate": {"max": 0.1}}]
    assert identity(TWO_AXES, 0) == identity({**TWO_AXES, "axes": other_function}, 0)
    assert identity(TWO_AXES, 1) != identity({**TWO_AXES, "axes": other_function}, 1)
    assert identity(TWO_AXES, 1) == identity({**TWO_AXES, "axes": reweighted, "combine": {"normalize": "none"}}, 1)
    assert identity(TWO_AXES, 0) != identity({**TWO_AXES, "batchSize": 4}, 0)
