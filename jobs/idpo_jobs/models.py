"""Loading policies and tokenizers the same way in every stage and engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from idpo_jobs.config import MISTRAL_CHAT_TEMPLATE
from idpo_jobs.contract import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def check_model_path(name: str, what: str = "model") -> None:
    if _looks_local(name) and not (Path(name).expanduser() / "config.json").is_file():
        reason = "does not exist" if not Path(name).expanduser().exists() else "has no config.json"
        raise StageError(f"{what} {name!r} {reason}")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(
    name: str, revision: str | None = None, chat_template: str | None = None, trust_remote_code: bool = False
) -> Any:
    """Tokenizer with a chat template (spec's, else its own, else Mistral's) and a pad token.

    `trust_remote_code` is always passed, never left to a library's default: a checkpoint's own Python
    runs only when the spec asked for it and the cluster's policy allowed it."""
    from transformers import AutoTokenizer

    check_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load tokenizer from {name!r}: {err}") from None
    if chat_template:
        tok.chat_template = chat_template
    elif not tok.chat_template:
        tok.chat_template = MISTRAL_CHAT_TEMPLATE
    if tok.pad_token is None:  # Mistral ships none; padding is masked, so eos is safe
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name: str, revision: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    check_model_path(name)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if device() == "cpu" and torch_dtype in ("auto", torch.float16, torch.bfloat16):
        torch_dtype = torch.float32  # half precision is slow or unsupported on CPU kernels
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load model from {name!r}: {err}") from None
    return model.to(device())


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt in the chat format, ending with the generation prompt.

    The template already emits BOS, so the rendered text is tokenized without special tokens:
    one BOS, never two (a classic silent quality loss with Mistral templates).
    """
    ids = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids
