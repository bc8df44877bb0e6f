"""A small tokenizer for the demo, built in code (nothing is downloaded).

Byte-level BPE trained deterministically on demo traces, with digits split one by one before
the byte-level step (numbers stay digit-level: a model can copy and compare them digit by
digit). Byte-level means every string round-trips exactly: ``decode(encode(text)) == text``.

Special tokens, each one id: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS),
and the protocol's ``<tool_call>`` (the execute token) and ``</tool_call>``. The chat template
has Qwen's shape: ``<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ihgrpo.protocol import EXECUTE_TOKEN, OBSERVATION_PREFIX

__all__ = ["PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "EXECUTE_TOKEN", "OBSERVATION_END_TOKEN",
           "SPECIAL_TOKENS", "STRUCTURE_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "tokenizer_corpus", "render_chat"]

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
OBSERVATION_END_TOKEN = "</tool_call>"
# Ids 0..4 in this order.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, EXECUTE_TOKEN, OBSERVATION_END_TOKEN]
# Frequent structural strings as single (non-special) tokens, matched before BPE: a block's
# opening and closing fence lines and the observation prefix. After a closing fence the policy's
# next token is then either "```python\n" (write another block) or <tool_call> (execute): the
# high-level decision is one token.
STRUCTURE_TOKENS = ["```python\n", "\n```\n", OBSERVATION_PREFIX]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_chat(user_content: str) -> str:
    """What CHAT_TEMPLATE renders for one user message with the generation prompt."""
    return f"{BOS_TOKEN}user\n{user_content}{EOS_TOKEN}\n{BOS_TOKEN}assistant\n"


def tokenizer_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Texts of whole demo trajectories (prompt, turns, observations) for training the merges:
    every style, plus the protocol's fixed messages."""
    from ihgrpo.protocol import (NO_OUTPUT_MESSAGE, NOTHING_PENDING_MESSAGE, TIMEOUT_MESSAGE,
                                 build_prompt)

    from .sft import DEMO_INSTRUCTION, STYLES, trace_texts
    from .task import generate_problems

    rng = random.Random(f"ihgrpo-tok-{seed}")
    texts = []
    for i, p in enumerate(generate_problems(n, seed=f"tok-{seed}", split="train")):
        style = STYLES[i % len(STYLES)]
        turns, observations, _ = trace_texts(p, style, rng)
        parts = [render_chat(build_prompt(p.question, instruction=DEMO_INSTRUCTION))]
        for j, t in enumerate(turns):
            parts.append(t)
            if j < len(observations):
                parts.append(observations[j])
        texts.append("".join(parts) + EOS_TOKEN)
    texts += [NO_OUTPUT_MESSAGE, NOTHING_PENDING_MESSAGE, TIMEOUT_MESSAGE]
    return texts


def build_tokenizer(vocab_size: int = 640, *, corpus: list[str] | None = None, n_corpus: int = 600,
                    seed: int = 0, structure_tokens: bool = True) -> PreTrainedTokenizerFast:
    """The demo tokenizer: 5 special tokens + 256 bytes + merges up to ``vocab_size`` (the demo's
    corpus runs out of merges near 470 tokens: every word of the task is then one token).

    Deterministic: the corpus comes from a fixed seed and ties between merges are broken by the
    trainer's ordering, so two builds give the same vocabulary (a test checks it).
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(n_corpus, seed), trainer)
    if structure_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False,
                                   lstrip=False, rstrip=False) for t in STRUCTURE_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=None, additional_special_tokens=[BOS_TOKEN, EXECUTE_TOKEN, OBSERVATION_END_TOKEN],
        clean_up_tokenization_spaces=False, model_max_length=4096, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast
