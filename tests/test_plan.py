"""The plan: stage order, hand-off of checkpoints, and configs, without any process or server."""

from __future__ import annotations

from pathlib import Path

from idpo_jobs.config import GenerateConfig, RankConfig, Stage, TrainConfig, Workspace
from idpo_operator import plan
from idpo_operator.plan import StageKey
from idpo_operator.spec import parse_manifest

from tests.conftest import manifest

WS = Workspace("/ws/run-1234")


def spec(**override):
    return parse_manifest(manifest(**override)).spec


def test_stages_run_generate_rank_train_per_iteration_in_order() -> None:
    keys = plan.all_stages(spec(iterations=2))
    assert [(k.iteration, k.stage.value) for k in keys] == [
        (1, "generate"),
        (1, "rank"),
        (1, "train"),
        (2, "generate"),
        (2, "rank"),
        (2, "train"),
    ]


def test_next_stage_follows_completed_ones_and_ends_with_none() -> None:
    s = spec(iterations=2)
    done = plan.all_stages(s)[:4]
    assert plan.next_stage(s, done) == StageKey(2, Stage.RANK)
    assert plan.next_stage(s, plan.all_stages(s)) is None


def test_a_stage_after_a_gap_is_pending_again() -> None:
    s = spec(iterations=1)
    gen, rank, train = plan.all_stages(s)
    assert plan.pending(s, [gen, train]) == [rank, train]


def test_each_iteration_starts_from_the_previous_checkpoint() -> None:
    s = spec(iterations=3)
    g1 = plan.stage_config(s, "run", WS, StageKey(1, Stage.GENERATE))
    g3 = plan.stage_config(s, "run", WS, StageKey(3, Stage.GENERATE))
    t3 = plan.stage_config(s, "run", WS, StageKey(3, Stage.TRAIN))
    assert isinstance(g1, GenerateConfig) and g1.model == "tiny://policy"
    assert isinstance(g3, GenerateConfig) and g3.model == "/ws/run-1234/iter-2/train/model"
    assert isinstance(t3, TrainConfig)
    assert t3.model == t3.reference_model == "/ws/run-1234/iter-2/train/model"
    assert t3.input_dir == "/ws/run-1234/iter-3/rank"


def test_initial_reference_policy_keeps_the_base_model_as_reference() -> None:
    t2 = plan.stage_config(spec(training={"referencePolicy": "initial"}), "run", WS, StageKey(2, Stage.TRAIN))
    assert isinstance(t2, TrainConfig)
    assert (t2.model, t2.reference_model) == ("/ws/run-1234/iter-1/train/model", "tiny://policy")


def test_shard_counts_flow_from_producer_to_consumer() -> None:
    s = spec(generation={"shards": 3}, ranking={"shards": 2})
    rank = plan.stage_config(s, "run", WS, StageKey(1, Stage.RANK))
    train = plan.stage_config(s, "run", WS, StageKey(1, Stage.TRAIN))
    assert isinstance(rank, RankConfig) and (rank.shards, rank.input_shards) == (2, 3)
    assert isinstance(train, TrainConfig) and (train.shards, train.input_shards) == (1, 2)


def test_stage_configs_round_trip_through_json(tmp_path: Path) -> None:
    from idpo_jobs.config import load_stage_config

    config = plan.stage_config(spec(), "run", WS, StageKey(1, Stage.RANK))
    config.dump(tmp_path / "c.json")
    assert load_stage_config(tmp_path / "c.json", RankConfig) == config
