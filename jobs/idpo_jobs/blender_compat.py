"""Make llm-blender 0.0.2 (the PairRM runtime) work under transformers 5, without forking it.

Two things broke upstream:
1. `from transformers.utils.hub import TRANSFORMERS_CACHE` at import time: the constant is gone.
   We restore it as the hub cache directory before the first import (what it used to alias).
2. Its collators call `tokenizer.batch_encode_plus`, which transformers 5 removed. We give the
   ranker's own tokenizer instance a `batch_encode_plus` that forwards to `__call__` (the
   documented replacement), instead of patching the tokenizer class for the whole process.

Also, a ranker directory's `config.json` names its backbone (`model_name`); a relative name that
exists inside the ranker directory is resolved there, so a self-contained ranker directory loads
with no network (the tiny test ranker and air-gapped PVC copies of PairRM rely on this).

And llm-blender decides on its own to run a checkpoint's code: it loads a backbone whose `model_type`
starts with "phi", and the tokenizer of any backbone whose *name* contains "phi", with
`trust_remote_code=True`. A ranker directory (or Hub repository) could name such a backbone and have its
Python run in the rank stage. While a ranker loads, the two transformers entry points llm-blender calls
that way are pinned to the run's own choice (`trustRemoteCode`, off unless the spec and the cluster's
policy allow it), so no choice of llm-blender's reaches transformers.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RANKER_FILES = ("config.json",)
RANKER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _restore_transformers_cache() -> None:
    import transformers.utils.hub as hub

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub import constants

        hub.TRANSFORMERS_CACHE = constants.HF_HUB_CACHE


def import_llm_blender() -> types.ModuleType:
    _restore_transformers_cache()
    import llm_blender

    return llm_blender


def _batch_encode_plus(tokenizer: Any) -> Any:
    def batch_encode_plus(texts: list[str], **kwargs: Any) -> Any:
        return tokenizer(texts, **kwargs)

    return batch_encode_plus


def add_batch_encode_plus(tokenizer: Any) -> Any:
    """Give one tokenizer instance the pre-v5 `batch_encode_plus` (no-op where it exists)."""
    if not hasattr(tokenizer, "batch_encode_plus"):
        tokenizer.batch_encode_plus = _batch_encode_plus(tokenizer)
    return tokenizer


def check_ranker_dir(path: Path) -> dict[str, Any]:
    """The ranker's RankerConfig as a dict, or a clear error naming what is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"ranker directory {path} does not exist")
    missing = [f for f in RANKER_FILES if not (path / f).is_file()]
    if not any((path / w).is_file() for w in RANKER_WEIGHTS):
        missing.append(" or ".join(RANKER_WEIGHTS))
    if missing:
        raise FileNotFoundError(f"ranker directory {path} lacks {', '.join(missing)}")
    return json.loads((path / "config.json").read_text())


def backbone_override(path: Path, ranker_config: dict[str, Any]) -> dict[str, Any]:
    name = ranker_config.get("model_name")
    if name and not Path(name).is_absolute() and (path / name).is_dir():
        return {"model_name": str(path / name)}
    return {}


# The names llm-blender's model_util module calls `from_pretrained(..., trust_remote_code=True)` on.
REMOTE_CODE_LOADERS = ("AutoTokenizer", "AutoModelForCausalLM")


class _Pinned:
    """A transformers Auto class whose `from_pretrained` always gets `trust_remote_code=trust`."""

    def __init__(self, auto: Any, trust: bool) -> None:
        self._auto, self._trust = auto, trust

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        return self._auto.from_pretrained(*args, **{**kwargs, "trust_remote_code": self._trust})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._auto, name)


@contextmanager
def remote_code(trust: bool) -> Iterator[None]:
    """While llm-blender loads a ranker: its remote-code entry points follow `trust`, not its own rule."""
    from llm_blender.pair_ranker import model_util

    saved = {name: getattr(model_util, name) for name in REMOTE_CODE_LOADERS}
    for name, auto in saved.items():
        setattr(model_util, name, _Pinned(auto, trust))
    try:
        yield
    finally:
        for name, auto in saved.items():
            setattr(model_util, name, auto)


def load_blender(ranker_path: str, device: str, trust_remote_code: bool = False) -> Any:
    """An `llm_blender.Blender` with its ranker loaded from `ranker_path` (dir or hub id). The ranker's
    checkpoint code runs only with `trust_remote_code`."""
    llm_blender = import_llm_blender()
    path = Path(ranker_path)
    overrides = backbone_override(path, check_ranker_dir(path)) if path.exists() else {}
    blender = llm_blender.Blender()
    with remote_code(trust_remote_code):
        blender.loadranker(str(path), device=device, **overrides)
    add_batch_encode_plus(blender.ranker_tokenizer)
    return blender
