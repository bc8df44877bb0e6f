"""A tiny Qwen3-architecture causal LM for the demo, built from a config (no weights downloaded).

Sized for speed on 2 CPU cores: 0.9 M parameters with the default knobs (two layers, tied input
and output embeddings over the demo's ~470-token vocabulary). Two layers are the least that can
copy (an induction head needs a previous-token head below it), and copying numbers from the
question into code is most of the task. The architecture is the real
``Qwen3ForCausalLM`` (RMSNorm, q/k norms, RoPE, grouped-query attention, SwiGLU), so every code
path that runs on Qwen3 at scale (HFGenerator, the loss, save / load) runs on it unchanged.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

__all__ = ["DemoModelConfig", "make_config", "build_model", "count_parameters"]


class DemoModelConfig:
    """Size knobs (defaults: the demo's model)."""

    hidden_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 5
    num_key_value_heads: int = 5
    head_dim: int = 32
    intermediate_size: int = 640
    max_position_embeddings: int = 1024  # a whole trajectory (prompt + response) fits easily
    rope_theta: float = 10000.0
    initializer_range: float = 0.02


def make_config(tokenizer, **overrides) -> Qwen3Config:
    """A ``Qwen3Config`` for ``tokenizer`` (vocabulary, EOS and pad ids); ``overrides`` replace
    any field (e.g. ``hidden_size=128``)."""
    d = DemoModelConfig
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        head_dim=d.head_dim,
        max_position_embeddings=d.max_position_embeddings,
        rope_theta=d.rope_theta,
        initializer_range=d.initializer_range,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        attention_bias=False,
        use_sliding_window=False,
        use_cache=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def build_model(tokenizer, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", **overrides) -> Qwen3ForCausalLM:
    """A freshly initialised model; the same seed gives the same weights. The global torch RNG
    state is left as it was."""
    config = make_config(tokenizer, **overrides)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
