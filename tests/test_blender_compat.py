"""llm-blender under transformers 5: the shim restores what it needs, and only that."""

from __future__ import annotations

from pathlib import Path

import pytest
from idpo_jobs import blender_compat


def test_llm_blender_imports_after_the_cache_constant_is_restored() -> None:
    import transformers.utils.hub as hub
    from huggingface_hub import constants

    module = blender_compat.import_llm_blender()
    assert hub.TRANSFORMERS_CACHE == constants.HF_HUB_CACHE
    assert module.Blender.__name__ == "Blender"


def test_batch_encode_plus_is_added_to_one_instance_only(tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["pairrm"] / "backbone")
    other = AutoTokenizer.from_pretrained(tiny["pairrm"] / "backbone")
    blender_compat.add_batch_encode_plus(tok)
    encoded = tok.batch_encode_plus(
        ["a b", "c"], padding="max_length", max_length=6, truncation=True, return_tensors="pt"
    )
    assert (
        encoded["input_ids"].tolist()
        == tok(["a b", "c"], padding="max_length", max_length=6, return_tensors="pt")["input_ids"].tolist()
    )
    assert not hasattr(other, "batch_encode_plus") and not hasattr(type(tok), "batch_encode_plus")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (None, "does not exist"),
        ([], "lacks config.json, model.safetensors or pytorch_model.bin"),
        (["config.json"], "lacks model.safetensors or pytorch_model.bin"),
    ],
    ids=["no-dir", "empty-dir", "no-weights"],
)
def test_incomplete_ranker_directories_are_named(tmp_path: Path, files, message) -> None:
    path = tmp_path / "ranker"
    if files is not None:
        path.mkdir()
        for f in files:
            (path / f).write_text("{}")
    with pytest.raises(FileNotFoundError, match=message):
        blender_compat.check_ranker_dir(path)


def test_relative_backbone_resolves_inside_the_ranker_dir(tiny) -> None:
    path = tiny["pairrm"]
    assert blender_compat.backbone_override(path, {"model_name": "backbone"}) == {"model_name": str(path / "backbone")}
    assert blender_compat.backbone_override(path, {"model_name": "microsoft/deberta-v3-large"}) == {}


def test_tiny_pairrm_loads_offline_and_gives_untied_pairwise_scores(tiny) -> None:
    blender = blender_compat.load_blender(str(tiny["pairrm"]), "cpu")
    candidates = [["river mountain city garden", "the the the the", "kind gentle warm", "a"]] * 2
    scores = blender.rank(
        ["Describe rainbows.", "Give three tips about chess."],
        candidates,
        return_scores=True,
        disable_tqdm=True,
    )
    assert scores.shape == (2, 4)
    assert all(len(set(row.round(6))) == 4 for row in scores)  # no ties
    assert abs(float(scores.sum())) < 1e-4  # PairRM scores from an antisymmetric comparison matrix
