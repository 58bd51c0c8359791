"""What a stage process leaves out of its start-up: imports that cost seconds and that no stage uses.

transformers imports what is installed of its optional dependencies as soon as a model class or tokenizer is
loaded:

- scikit-learn, with SciPy, for one function of assisted generation (a ROC curve in
  `generation.candidate_generator` that tunes an assistant model's threshold), and SciPy's optimizer for the
  object-detection losses (`transformers.loss`). The stage image has both (alpaca_eval and MLflow depend on
  them); stages load causal LMs and sequence classifiers and never generate with an assistant model.
- mistral-common, for every tokenizer of the Mistral family: it probes the checkpoint for Mistral's own
  tokenizer file (`tekken.json`) and, where one exists, loads `MistralCommonBackend` instead of the Hugging
  Face tokenizer. The image has it because vLLM depends on it. Stages use the Hugging Face tokenizer files
  (`tokenizer.json`, with the chat template and the special tokens TRL and the rankers read), so a checkpoint
  tokenizes the same way in every image, whether or not vLLM's dependencies are installed; a checkpoint with
  only `tekken.json` is not supported.

The imports are 1 to 2 CPU-seconds of every stage process that loads a model (`python bench/startup.py`).
transformers has no switch for them, so `skip_unused_imports` answers its availability checks for them with
False the moment it defines them; a package anything else imports still loads (vLLM's own tokenizer modes),
and a process that never imports transformers (a function-ranked rank stage, a torchrun world's launcher)
pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

CHECKS = "transformers.utils.import_utils"  # where transformers defines `is_<package>_available`
UNUSED = ("sklearn", "scipy", "mistral_common")  # optional packages of transformers that no stage uses


class _AfterDefining(importlib.abc.MetaPathFinder):
    """Finds CHECKS as the path finder would, and has its loader answer for UNUSED once the module ran."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name != CHECKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        loader = spec.loader if spec else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        define = loader.exec_module

        def define_then_answer(module: ModuleType) -> None:
            define(module)
            for package in UNUSED:
                if callable(getattr(module, f"is_{package}_available", None)):
                    setattr(module, f"is_{package}_available", _unavailable)

        loader.exec_module = define_then_answer  # type: ignore[method-assign]  # this module's loader only
        return spec


def _unavailable() -> bool:
    return False


def skip_unused_imports() -> None:
    """From now on in this process, transformers treats UNUSED as not installed (no effect if it was
    imported already)."""
    if CHECKS not in sys.modules and not any(isinstance(f, _AfterDefining) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterDefining())
