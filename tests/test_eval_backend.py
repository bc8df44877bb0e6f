"""`ihgrpo eval --backend hf|vllm|auto`: the choice, vLLM missing = exit 2, and an evaluation
through the vLLM adapter on a FAKE engine (tests/fake_vllm.py; vLLM itself is never installed here)."""

from __future__ import annotations

import json
import types

import pytest
from fake_vllm import FAKE_VLLM, FakeVLLMEngine

import ihgrpo.rollout.vllm as vllm_mod
from ihgrpo.config import load_eval_config
from ihgrpo.eval import run_eval
from ihgrpo.eval.cli import main as eval_main

QUIET = lambda msg: None  # noqa: E731
FAST = ["max_response_tokens=24", "max_turns=2", "sandbox_workers=1", "viewer_samples=1", "k=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=60)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@pytest.fixture
def arith(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "What is 2 + 3?", "answer": "5"},
                                                           {"question": "What is 7 - 1?", "answer": "6"}]))
    return path


def _no_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        return True
    return False


def test_auto_is_hf_without_vllm_or_gpu(tiny, arith, tmp_path):
    import torch

    if not _no_vllm() and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are here: auto is vllm")
    path, _ = tiny
    cfg = load_eval_config(None, [f"model={path}", *FAST])
    assert cfg.rollout.backend == "auto" and cfg.rollout.vllm_gpu_memory_utilization == 0.9
    res = run_eval(cfg, tmp_path / "out", benchmarks=[f"arith={arith}"], echo=QUIET)
    assert res["settings"]["backend"] == "hf"


@pytest.mark.skipif(not _no_vllm(), reason="vLLM is installed here")
def test_backend_vllm_without_vllm_exits_2(tiny, arith, tmp_path, capsys):
    path, _ = tiny
    code = eval_main(["--model", str(path), "--benchmark", f"arith={arith}", "--out", str(tmp_path / "o"),
                      "--backend", "vllm", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ihgrpo eval: error: the vLLM backend needs vLLM")
    assert err[-1].endswith("pip install 'ihgrpo[vllm]'")
    ledger = tmp_path / "o" / "samples.jsonl"
    assert not ledger.exists() or ledger.read_text() == ""  # nothing was generated


def test_eval_through_the_vllm_adapter(tiny, arith, tmp_path, monkeypatch):
    """--backend vllm: the engine starts on the model path (no weights loaded here), gets per-sample
    seeds, and its outputs are scored like any other."""
    path, tok = tiny
    started = {}

    def script(prompt, seed):  # noqa: ARG001 - an answer, then EOS
        return tok.encode("\\boxed{5}", add_special_tokens=False) + [tok.eos_token_id]

    def LLM(model, **kwargs):  # noqa: N802 - vllm.LLM
        started.update(model=model, **kwargs)
        started["engine"] = FakeVLLMEngine(script, lambda ids: tok.decode(ids), kwargs["logprobs_mode"])
        return started["engine"]

    fake = types.SimpleNamespace(**vars(FAKE_VLLM), LLM=LLM)
    monkeypatch.setattr(vllm_mod, "import_vllm", lambda: fake)
    monkeypatch.setattr("ihgrpo.models.load_model_and_tokenizer", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = load_eval_config(None, [f"model={path}", *FAST, "backend=vllm", "seed=3"])
    res = run_eval(cfg, tmp_path / "out", benchmarks=[f"arith={arith}"], echo=QUIET)
    assert started["model"] == str(path) and started["seed"] == 3
    assert started["gpu_memory_utilization"] == 0.9 and started["logprobs_mode"] == "raw_logprobs"
    assert res["settings"]["backend"] == "vllm"
    arith_res = res["benchmarks"]["arith"]
    assert arith_res["avg@k"] == 0.5 and arith_res["pass@k"] == 0.5  # "5" is right for one problem of two
    seeds = [sp.seed for _, sp in started["engine"].requests]
    assert len(seeds) == 4 and len(set(seeds)) == 4  # each sample its own stream
    assert all(sp.stop_token_ids and sp.ignore_eos for _, sp in started["engine"].requests)
