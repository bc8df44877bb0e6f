"""A tokenizer and a tiny model that are not Qwen's, built offline: "any Hugging Face causal LM".

* :func:`build_plain_tokenizer`: byte-level BPE with only ``<s>`` (BOS) and ``</s>`` (EOS), no
  pad token, no chat template, and no protocol token: ``<tool_call>`` is several pieces, as in
  most vocabularies (Llama, Mistral, GPT-2, ...).
* :func:`build_tiny_llama`: a ``LlamaForCausalLM`` with random weights (an untied output
  layer by default), sized for tests.
"""

from __future__ import annotations

import random

__all__ = ["build_plain_tokenizer", "build_tiny_llama", "plain_corpus"]


def plain_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Arithmetic questions, Python blocks and answers, without any protocol token."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        op, sym = rng.choice([("times", "*"), ("plus", "+"), ("minus", "-")])
        texts.append(f"User: What is {a} {op} {b}?\nAssistant: Let me compute it.\n```python\n"
                     f"x = {a} {sym} {b}\nprint(x)\n```\nCode execution result: {eval(f'{a}{sym}{b}')}\n"
                     f"So the answer is \\boxed{{{eval(f'{a}{sym}{b}')}}}.")
    return texts


def build_plain_tokenizer(vocab_size: int = 320, *, seed: int = 0):
    """A ``PreTrainedTokenizerFast`` without a chat template or ``<tool_call>`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(plain_corpus(seed=seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None,
                                   clean_up_tokenization_spaces=False, model_max_length=2048)


def build_tiny_llama(tokenizer, *, seed: int = 0, hidden_size: int = 32, layers: int = 1, tied: bool = False):
    """A ``LlamaForCausalLM`` for ``tokenizer`` with random weights (an untied output layer unless
    ``tied``). The global torch RNG state is left as it was."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, tie_word_embeddings=tied,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
