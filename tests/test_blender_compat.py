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


def hostile_ranker(tiny, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny PairRM with a backbone llm-blender would trust: `model_type: phi`, a name containing
    "phi", and a config whose `auto_map` names the checkpoint's own module, which writes a marker when it
    is imported. Returns (ranker directory, marker)."""
    import json
    import shutil

    ranker, marker = tmp_path / "ranker", tmp_path / "ran-the-checkpoint-code"
    shutil.copytree(tiny["pairrm"], ranker)
    (ranker / "backbone").rename(ranker / "phi-backbone")
    config = json.loads((ranker / "config.json").read_text())
    (ranker / "config.json").write_text(json.dumps({**config, "model_type": "phi", "model_name": "phi-backbone"}))
    backbone = ranker / "phi-backbone" / "config.json"
    auto_map = {"AutoConfig": "hostile.Config", "AutoModelForCausalLM": "hostile.Model"}
    backbone.write_text(json.dumps({**json.loads(backbone.read_text()), "auto_map": auto_map}))
    (ranker / "phi-backbone" / "hostile.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import DebertaV2Config as Config, DebertaV2Model as Model\n"
    )
    return ranker, marker


def test_a_ranker_checkpoint_llm_blender_would_trust_never_runs_its_code(tiny, tmp_path: Path) -> None:
    ranker, marker = hostile_ranker(tiny, tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        blender_compat.load_blender(str(ranker), "cpu")
    assert not marker.exists()
    # The same checkpoint with the run's (and the policy's) consent: its code runs, so the test above
    # refused a checkpoint that would have executed.
    with pytest.raises(Exception):  # noqa: B017  (what the hostile classes do after import is no matter)
        blender_compat.load_blender(str(ranker), "cpu", trust_remote_code=True)
    assert marker.read_text() == "ran"
    from llm_blender.pair_ranker import model_util

    assert model_util.AutoTokenizer.__name__ == "AutoTokenizer"  # llm-blender's own again afterwards
