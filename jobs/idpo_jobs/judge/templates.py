"""Judge prompts and how their answers are read (docs/evaluation.md: LLM judges).

`alpaca-eval` and `pairwise` are AlpacaEval's own annotators, read from the installed `alpaca_eval`
package's data files: `weighted_alpaca_eval_gpt4_turbo` (AlpacaEval 2.0's: one output token, P(first
output preferred) from the probabilities of its two labels in `top_logprobs`) and `gpt4_turbo` (the
same task answered in words, `Output (a)` or `Output (b)`, for judges without log-probabilities). Their
prompt text, request parameters, labels and answer patterns all come from the package's files.

The package is not imported, only read: `import alpaca_eval` loads a `.env` file into the environment
(python-dotenv, from the current directory under `python -c` or a debugger) and imports its whole
pipeline (datasets, pandas, scipy.stats, scikit-learn: seconds), and its parsers sit behind that package
import. The parsing is its arithmetic, restated below (and checked against its functions in
tests/test_judges.py), with one difference: a label token is matched with surrounding whitespace
stripped, since judges behind vLLM with SentencePiece tokenizers return labels as ` m`.

`pointwise` is ours (AlpacaEval has no single-answer annotator): a 1-9 rating, each a one-token answer in
every tokenizer, so the expected rating over the digits' probabilities in `top_logprobs` is exact; a
judge that returns no log-probabilities is read from the first digit of its answer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ALPACA_EVAL = "alpaca_eval"  # the distribution, and its package directory
ALPACA_EVAL_CONFIGS = "alpaca_eval/evaluators_configs"
ALPACA_EVAL_2 = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2.0's default annotator
ALPACA_EVAL_TEXT = "gpt4_turbo"  # the same judge, answering in words
CHATML = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.DOTALL)
PLACEHOLDER = re.compile(r"\{(instruction|output_1|output_2|output)\}")
RATINGS = range(1, 10)
# One answer as it is kept in the judgment cache: the text and the first token's alternatives.
Answer = dict[str, Any]

POINTWISE_PROMPT = """<|im_start|>system
You are a careful evaluator of the answers of AI assistants.
<|im_end|>
<|im_start|>user
Rate how well the response below follows the instruction: its helpfulness, accuracy and clarity, from a human \
perspective. Use a scale from 1 (useless) to 9 (excellent). Answer with the rating alone: one digit from 1 to 9, \
nothing else.

## Instruction

{instruction}

## Response

{output}

## Rating (1-9)
<|im_end|>"""


@dataclass(frozen=True)
class Template:
    """A judge prompt as chat messages with `{instruction}`, `{output_1}`/`{output_2}` or `{output}` slots,
    the request parameters it is asked with, and how an answer is read."""

    name: str
    pairwise: bool
    messages: tuple[tuple[str, str], ...]  # (role, content)
    request: dict[str, Any]
    labels: tuple[str, str] = ("", "")  # logprob form: the first output's label, the second's
    patterns: tuple[re.Pattern[str], ...] = field(default=())  # text form: the first output's, the second's

    def render(self, instruction: str, *outputs: str) -> list[dict[str, str]]:
        """The messages with the slots filled in one pass: a response that contains `{output_2}` stays as it is."""
        names = ("output_1", "output_2") if self.pairwise else ("output",)
        values = {"instruction": instruction, **dict(zip(names, outputs, strict=True))}
        return [{"role": r, "content": PLACEHOLDER.sub(lambda m: values[m.group(1)], c)} for r, c in self.messages]

    def read(self, answer: Answer) -> float | None:
        """Pairwise: P(the first output is preferred), in [0, 1]. Pointwise: the rating. None: unreadable."""
        if self.pairwise:
            return label_probability(answer, self.labels) if self.labels[0] else first_match(answer, self.patterns)
        return expected_rating(answer)


def _package_file(relative: str) -> Path:
    """A data file of the installed `alpaca_eval` distribution, found without importing the package."""
    try:
        found = Path(str(metadata.distribution(ALPACA_EVAL).locate_file(f"{ALPACA_EVAL_CONFIGS}/{relative}")))
    except metadata.PackageNotFoundError:
        raise RuntimeError("the judge templates need the `alpaca_eval` package: pip install 'idpo[jobs]'") from None
    if not found.is_file():
        raise RuntimeError(f"alpaca_eval {metadata.version(ALPACA_EVAL)} has no {relative}")
    return found


def chatml_messages(prompt: str) -> tuple[tuple[str, str], ...]:
    """AlpacaEval's ChatML prompt file as (role, content) messages, as `alpaca_eval.utils.prompt_to_chatml`
    splits it (roles and contents stripped)."""
    found = tuple((role.strip(), content.strip()) for role, content in CHATML.findall(prompt.strip()))
    if not found:
        raise ValueError("not a ChatML prompt: no <|im_start|>role ... <|im_end|> block")
    return found


def _annotator(config: str) -> dict[str, Any]:
    return yaml.safe_load(_package_file(f"{config}/configs.yaml").read_text())[config]


@cache
def template(name: str) -> Template:
    """The template called `name` in `JudgeSpec.template`."""
    if name == "pointwise":
        request = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}
        return Template(name, False, chatml_messages(POINTWISE_PROMPT), request)
    if name not in ("alpaca-eval", "pairwise"):
        raise ValueError(f"unknown judge template {name!r}")
    annotator = _annotator(ALPACA_EVAL_2 if name == "alpaca-eval" else ALPACA_EVAL_TEXT)
    messages = chatml_messages(_package_file(annotator["prompt_template"]).read_text())
    # The model comes from the judge's endpoint; the batch size is 1 in both annotators (one pair a prompt).
    request = {k: v for k, v in annotator["completions_kwargs"].items() if k != "model_name"}
    if name == "alpaca-eval":
        kwargs = annotator["completion_parser_kwargs"]
        second = [t for t in kwargs["denominator_tokens"] if t != kwargs["numerator_token"]]
        return Template(name, True, messages, request, labels=(kwargs["numerator_token"], *second))
    matches = annotator["completion_parser_kwargs"]["outputs_to_match"]
    return Template(name, True, messages, request, patterns=(re.compile(matches[1]), re.compile(matches[2])))


def _alternatives(answer: Answer) -> dict[str, float]:
    """The first answer token's alternatives as stripped text -> probability (variants of one label add up)."""
    found: dict[str, float] = {}
    for token, logprob in answer.get("top_logprobs") or []:
        key = token.strip()
        found[key] = found.get(key, 0.0) + math.exp(logprob)
    return found


def label_probability(answer: Answer, labels: tuple[str, str]) -> float | None:
    """P(first label) / (P(first label) + P(second label)) over the first token's `top_logprobs`, as
    alpaca_eval's `logprob_parser` (not binarized); a label absent from them has probability 0, and
    None when both are."""
    probs = _alternatives(answer)
    first, second = probs.get(labels[0], 0.0), probs.get(labels[1], 0.0)
    return first / (first + second) if first + second > 0 else None


def first_match(answer: Answer, patterns: tuple[re.Pattern[str], ...]) -> float | None:
    """1.0 if the first output's pattern matches first in the answer, 0.0 if the second's does, as
    alpaca_eval's `regex_parser` orders matches; None when neither matches."""
    text = answer.get("text") or ""
    hits = [(m.start(), k) for k, p in enumerate(patterns) if (m := p.search(text))]
    return None if not hits else 1.0 - min(hits)[1]


def expected_rating(answer: Answer) -> float | None:
    """The rating's expected value over the digits 1-9 among the first token's `top_logprobs`
    (renormalised over them); without log-probabilities, the first digit 1-9 of the answer."""
    probs = {int(t): p for t, p in _alternatives(answer).items() if t.isdigit() and int(t) in RATINGS}
    if probs:
        return sum(k * p for k, p in probs.items()) / sum(probs.values())
    if answer.get("top_logprobs"):
        return None  # the judge answered with log-probabilities, none of them on a rating
    digit = re.search(r"[1-9]", answer.get("text") or "")
    return float(digit.group()) if digit else None
