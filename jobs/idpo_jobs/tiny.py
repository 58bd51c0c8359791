"""Tiny models built locally in seconds, so tests and the demo need no download.

- `policy/`: a random-weight Mistral (head_dim 32, as vLLM's CPU attention requires) with a BPE
  tokenizer trained in-process and Mistral's chat template.
- `pairrm/`: a PairRM-format ranker in llm-blender's directory layout (`config.json` RankerConfig,
  `model.safetensors`, backbone in `backbone/`), briefly trained (seconds) towards responses with more
  'kind' words (POSITIVE), so its scores are not ties. It is a format fixture, not a good judge:
  its pairwise accuracy on that preference is about 0.6.
- `reward/`: a random-weight Mistral sequence classifier (one logit) sharing the policy's
  tokenizer, for the `reward-model` ranker.
- `policy-stops/`: the same policy with a stop rate of its own, so its responses end at varied lengths (66
  characters on average at temperature 1, a few empty, some at the token cap): what length control acts on
  (`examples/tiny-axes.yaml`). Its EOS logit has a bias that only the EOS row's training moves (see
  `build_tiny_stopping_policy`); `policy/` almost never ends before its token cap.
- `prompts.jsonl`: templated prompts with ids.

    idpo make-tiny .idpo/tiny
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from idpo_jobs.config import MISTRAL_CHAT_TEMPLATE

WORDS = """
the a an and or but of to in on at for with from by about as into like through after over between
out against during without before under around among time person year way day thing man world life
hand part child eye woman place work week case point number group problem fact water tree river
mountain city garden ocean forest cat dog bird fish horse music song book story poem letter plan
idea question answer reason color light sound voice dream memory friend teacher doctor student write
explain describe list compare give tell make find think know help show try ask need feel become
leave put mean keep let begin seem talk turn start hold bring happen provide sit stand lose pay meet
include continue set learn change lead understand watch follow stop create speak read allow add
spend grow open walk win offer remember love consider appear buy wait serve die send expect build
stay fall cut reach kill remain good new first last long great little own other old right big high
different small large next early young important few public bad same able blue red green yellow
bright dark quiet loud happy sad simple clear short warm cold fast slow strong soft sweet careful
honest gentle brave calm curious friendly helpful polite kind wise funny
""".split()
TOPICS = """
gardening cooking chess astronomy volcanoes bicycles photosynthesis rainbows friendship robots
libraries honeybees tides coffee deserts violins glaciers sleep kites bridges recycling penguins
thunderstorms pottery maps trains lighthouses origami dolphins mushrooms clocks
""".split()
TEMPLATES = [
    "Write a short poem about {t}.",
    "Explain how {t} works to a child.",
    "Give three tips about {t}.",
    "Describe {t} in two sentences.",
    "What is the most interesting fact about {t}?",
    "Tell a funny story about {t}.",
    "Compare {t} and {u} in a few words.",
    "Why do people like {t}?",
]
SPECIALS = ["<unk>", "<s>", "</s>"]
RANKER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_prompts() -> list[str]:
    prompts = []
    for n, (tmpl, t) in enumerate(itertools.product(TEMPLATES, TOPICS)):
        prompts.append(tmpl.format(t=t, u=TOPICS[(n * 7 + 3) % len(TOPICS)]))
    return prompts


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    text = tiny_prompts() + ["[INST] " + p + " [/INST]" for p in tiny_prompts()]
    for _ in range(lines):
        text.append(" ".join(rng.choice(WORDS + TOPICS) for _ in range(rng.randint(4, 16))).capitalize() + ".")
    return text


def _train_bpe(corpus: list[str], vocab_size: int, specials: list[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[0] if "<unk>" in specials else "[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def _tiny_mistral(raw: Any) -> tuple[Any, Any]:  # tokenizers.Tokenizer -> (PreTrainedTokenizerFast, MistralConfig)
    """A tokenizer with Mistral's conventions over `raw`, and the config of a tiny Mistral for it."""
    from tokenizers import processors
    from transformers import MistralConfig, PreTrainedTokenizerFast

    bos = raw.token_to_id("<s>")
    # Like Mistral's tokenizer: encode() adds BOS; apply_chat_template emits it in the text instead.
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=1024
    )
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=bos,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    return tok, config


def build_tiny_policy(out: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    import torch
    from transformers import MistralForCausalLM

    out = Path(out)
    tok, config = _tiny_mistral(_train_bpe(_corpus(seed), vocab_size, SPECIALS))
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


STOPPING_POLICY = "policy-stops"
# `policy-stops` stops at a rate that DPO moves through the EOS token's own row, as it moves any other token's.
# A tiny model's weights are about as small as Adam's steps, so one iteration of training turns its final hidden
# states by tens of degrees: an EOS logit read off a random direction of those states (an EOS row of norm 4, as
# before) went up or down by logits, whatever the pairs taught (docs/ranking.md, "What the tiny models show").
# Mistral's head has no bias; this gives it one. Every token embedding gets EOS_SHIFT along one direction, far more
# than the layers add, so every final hidden state is almost that direction, and a row's component along it is a
# bias: the EOS row's is EOS_BIAS logits (the base stop rate), plus EOS_GAIN times a random direction's projection.
EOS_SHIFT = 5.0
EOS_BIAS = 1.5
EOS_GAIN = 0.3


def build_tiny_stopping_policy(out: str | Path, policy: str | Path, seed: int = 0) -> Path:
    """`policy` with a stop rate of its own (above), a little higher or lower depending on the context: DPO teaches it
    to stop sooner or later through the EOS row, not as a side effect of what else it learns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    generator = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        shared = torch.randn(model.config.hidden_size, generator=generator)
        model.get_input_embeddings().weight += EOS_SHIFT * shared / shared.norm()
        chats = [[{"role": "user", "content": p}] for p in tiny_prompts()[:64]]
        texts = tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        encoded = [tokenizer(t, add_special_tokens=False, return_tensors="pt") for t in texts]
        mean = torch.cat([model(**e, output_hidden_states=True).hidden_states[-1][0] for e in encoded]).mean(0)
        direction = torch.randn(mean.shape[0], generator=generator)
        direction -= (direction @ mean) / (mean @ mean) * mean
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = EOS_BIAS * mean / (mean @ mean) + EOS_GAIN * direction / direction.norm()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def build_tiny_reward_model(out: str | Path, policy: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, MistralForSequenceClassification

    config = AutoConfig.from_pretrained(policy, num_labels=1)
    config.pad_token_id = config.eos_token_id
    torch.manual_seed(seed + 2)
    MistralForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return Path(out)


POSITIVE = set(
    "good great happy kind wise bright helpful friendly honest gentle brave calm clear warm sweet "
    "polite careful curious funny simple".split()
)


def _candidate(rng: random.Random) -> str:
    """Random words with a random share of POSITIVE ones: the tiny ranker's notion of quality."""
    share = rng.random()
    positive, other = sorted(POSITIVE), [w for w in WORDS if w not in POSITIVE]
    return " ".join(rng.choice(positive if rng.random() < share else other) for _ in range(rng.randint(3, 12)))


def positive_words(text: str) -> float:
    return float(sum(w in POSITIVE for w in text.lower().split()))


def build_tiny_pairrm(out: str | Path, seed: int = 0, steps: int = 150) -> Path:
    import safetensors.torch
    import torch
    from tokenizers import processors
    from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

    from idpo_jobs.blender_compat import add_batch_encode_plus, import_llm_blender

    import_llm_blender()
    from llm_blender.pair_ranker.config import RankerConfig
    from llm_blender.pair_ranker.model_util import build_collator, build_ranker, build_tokenizer

    out = Path(out)
    backbone = out / "backbone"
    raw = _train_bpe(_corpus(seed + 1, lines=1500), 768, RANKER_SPECIALS)
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    DebertaV2Model(config).save_pretrained(backbone)
    tok.save_pretrained(backbone)

    ranker_config = RankerConfig(
        ranker_type="pairranker",
        model_type="deberta",
        model_name="backbone",
        source_maxlength=64,
        candidate_maxlength=48,
        fp16=False,
        drop_out=0.0,
    )
    # The same construction llm-blender's load_ranker performs (collator first: it adds tokens).
    tokenizer = add_batch_encode_plus(build_tokenizer(str(backbone)))
    collator = build_collator("pairranker", tokenizer, 64, 48)
    ranker_config.model_name = str(backbone)
    ranker = build_ranker("pairranker", "deberta", str(backbone), None, ranker_config, tokenizer)

    rng = random.Random(seed)
    optim = torch.optim.AdamW(ranker.parameters(), lr=1e-3)
    ranker.train()
    for _ in range(steps):
        batch = []
        for _ in range(4):
            cands = [_candidate(rng) for _ in range(4)]
            batch.append(
                {
                    "source": rng.choice(tiny_prompts()),
                    "candidates": cands,
                    "scores": [[positive_words(c)] for c in cands],
                }
            )
        loss = ranker(**collator(batch))["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
    ranker.eval()

    safetensors.torch.save_model(ranker, str(out / "model.safetensors"))
    ranker_config.model_name = "backbone"  # relative: resolved inside the ranker dir on load
    (out / "config.json").write_text(json.dumps(ranker_config.to_dict(), indent=2))
    return out


def build_tiny(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build everything the tiny demo needs under `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt_id": f"p{n:04d}", "prompt": p}) + "\n" for n, p in enumerate(tiny_prompts()))
    )
    policy = build_tiny_policy(out / "policy", seed=seed)
    return {
        "policy": policy,
        STOPPING_POLICY: build_tiny_stopping_policy(out / STOPPING_POLICY, policy, seed=seed),
        "pairrm": build_tiny_pairrm(out / "pairrm", seed=seed),
        "reward": build_tiny_reward_model(out / "reward", policy, seed=seed),
        "prompts": prompts,
    }


def tiny_cache() -> Path:
    """Where `idpo run` keeps the tiny models: built once per machine (not once per run directory), in a
    folder named after this builder's code and the libraries that write the files, so a change of either
    builds afresh. `IDPO_TINY_CACHE` moves it from ~/.cache/idpo/tiny."""
    import hashlib
    from importlib import metadata

    versions = "|".join(metadata.version(name) for name in ("torch", "transformers", "tokenizers", "llm-blender"))
    key = hashlib.sha256(Path(__file__).read_bytes() + versions.encode()).hexdigest()[:12]
    return Path(os.environ.get("IDPO_TINY_CACHE") or Path.home() / ".cache" / "idpo" / "tiny") / key


def ensure_tiny(root: Path) -> Path:
    """The tiny models under `root`, built there if absent. Built aside and renamed into place, so
    shards that race on first use never read half a model (the builds are seeded: any winner will do)."""
    done = root / "_SUCCESS"
    if not done.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        _add_aside(root, lambda tmp: (build_tiny(tmp), (tmp / "_SUCCESS").touch()))
    elif not (root / STOPPING_POLICY).exists():  # built by an idpo from before it had one
        _add_aside(root / STOPPING_POLICY, lambda tmp: build_tiny_stopping_policy(tmp, root / "policy"))
    return root


def _add_aside(final: Path, build: Callable[[Path], Any]) -> None:
    """`build` into a temporary sibling of `final`, renamed into place; a racing twin's result is as good (the
    builds are seeded)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _judge_example(rng: random.Random, name: str) -> tuple[list[dict[str, str]], str]:
    """A judge prompt of template `name` over random candidates and the tiny judge's answer: the candidate
    with the larger share of POSITIVE words wins, and a rating grows with that share."""
    from idpo_jobs.judge.templates import template

    tmpl, instruction = template(name), rng.choice(tiny_prompts())
    if not tmpl.pairwise:
        output = _candidate(rng)
        return tmpl.render(instruction, output), str(1 + round(8 * positive_share(output)))
    first, second = _candidate(rng), _candidate(rng)
    share_1, share_2 = positive_share(first), positive_share(second)
    first_wins = share_1 > share_2 or (share_1 == share_2 and rng.random() < 0.5)
    if tmpl.labels[0]:
        answer = tmpl.labels[0] if first_wins else tmpl.labels[1]
    else:
        answer = "Output (a)" if first_wins else "Output (b)"
    return tmpl.render(instruction, first, second), answer


def positive_share(text: str) -> float:
    words = text.split()
    return positive_words(text) / len(words) if words else 0.0


JUDGE_TEMPLATES = ("alpaca-eval", "pairwise", "pointwise")


def build_tiny_judge(out: str | Path, seed: int = 0, steps: int = 450) -> Path:
    """A tiny chat model trained (seconds) to answer the judge templates of `idpo_jobs.judge` in their formats
    (`m`/`M`, `Output (a)`, a digit), its answers following the share of POSITIVE words. Its tokenizer is
    trained on those templates, so a judge prompt is a few hundred tokens and each label has tokens of its
    own. In that time it learns the formats, hardly the preference: a format fixture for the judge tests,
    served by vLLM's OpenAI server, not a judge to trust."""
    import torch
    from transformers import MistralForCausalLM

    out = Path(out)
    rng = random.Random(seed)
    examples = [_judge_example(rng, JUDGE_TEMPLATES[n % 3]) for n in range(300)]
    corpus = _corpus(seed, lines=1000) + [m["content"] for msgs, _ in examples for m in msgs]
    corpus += [a for _, a in examples] + [str(n) for n in range(10)] * 500
    tok, config = _tiny_mistral(_train_bpe(corpus, 1024, [*SPECIALS, "[INST]", "[/INST]"]))
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: more threads only contend, several times slower on a busy machine
    for step in range(steps):
        ids, labels = [], []
        for _ in range(8):
            messages, answer = _judge_example(rng, JUDGE_TEMPLATES[step % 3])
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(x) for x in ids)
        pad = tok.eos_token_id
        batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        target = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(input_ids=batch, attention_mask=mask, labels=target).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
