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
    path, _, _ = tiny
    cfg = load_eval_config(None, [f"model={path}", *FAST])
    assert cfg.rollout.backend == "auto" and cfg.rollout.vllm_gpu_memory_utilization == 0.9
    res = run_eval(cfg, tmp_path / "out", benchmarks=[f"arith={arith}"], echo=QUIET)
    assert res["settings"]["backend"] == "hf"


@pytest.mark.skipif(not _no_vllm(), reason="vLLM is installed here")
def test_backend_vllm_without_vllm_exits_2(tiny, arith, tmp_path, capsys):
    path, _, _ = tiny
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
    path, _, tok = tiny
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
    # the engine options are the trainer's (one function), for an evaluation: no sleep, no per-rank dir
    from ihgrpo.rollout.backends import vllm_options

    options = {k: v for k, v in started.items() if k not in ("model", "engine")}
    assert options == vllm_options(cfg.rollout, dtype=res["settings"]["dtype"], seed=3, trust_remote_code=False)
    assert started["gpu_memory_utilization"] == 0.9 and started["logprobs_mode"] == "raw_logprobs"
    assert res["settings"]["backend"] == "vllm"
    arith_res = res["benchmarks"]["arith"]
    assert arith_res["avg@k"] == 0.5 and arith_res["pass@k"] == 0.5  # "5" is right for one problem of two
    seeds = [sp.seed for _, sp in started["engine"].requests]
    assert len(seeds) == 4 and len(set(seeds)) == 4  # each sample its own stream
    assert all(sp.stop_token_ids and sp.ignore_eos for _, sp in started["engine"].requests)


def _fake_vllm(monkeypatch, tok):
    """vllm.LLM as the fake: records what each engine was started with."""
    started = []

    def script(prompt, seed):  # noqa: ARG001
        return tok.encode("\\boxed{5}", add_special_tokens=False) + [tok.eos_token_id]

    def LLM(model, **kwargs):  # noqa: N802 - vllm.LLM
        engine = FakeVLLMEngine(script, lambda ids: tok.decode(ids), kwargs["logprobs_mode"])
        started.append({"model": model, "engine": engine, **kwargs})
        return engine

    monkeypatch.setattr(vllm_mod, "import_vllm", lambda: types.SimpleNamespace(**vars(FAKE_VLLM), LLM=LLM))
    return started


def _checkpoint(run, model_dir_writer):
    """A training checkpoint's layout: RUN/checkpoints/step-1/{state.json, model/}."""
    ck = run / "checkpoints" / "step-1"
    model_dir_writer(ck / "model")
    (ck / "state.json").write_text(json.dumps({"step": 1}))
    return ck


def test_vllm_eval_of_a_training_checkpoint_starts_on_its_model_dir(tiny, arith, tmp_path, monkeypatch):
    import shutil

    path, _, tok = tiny
    started = _fake_vllm(monkeypatch, tok)
    ck = _checkpoint(tmp_path / "run", lambda d: shutil.copytree(path, d))
    cfg = load_eval_config(None, [f"model={ck}", *FAST, "backend=vllm"])
    res = run_eval(cfg, tmp_path / "out", benchmarks=[f"arith={arith}"], echo=QUIET)
    assert [s["model"] for s in started] == [str(ck / "model")]
    assert res["benchmarks"]["arith"]["avg@k"] == 0.5


def test_vllm_eval_of_a_lora_checkpoint_syncs_the_merged_model(tiny, arith, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    path, _, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(path)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(path)

    def write(d):
        lora.save_pretrained(d)
        tok.save_pretrained(d)

    ck = _checkpoint(tmp_path / "run", write)
    merged = dict(copy.deepcopy(lora).merge_and_unload().named_parameters())
    started = _fake_vllm(monkeypatch, tok)
    cfg = load_eval_config(None, [f"model={ck}", *FAST, "backend=vllm"])
    res = run_eval(cfg, tmp_path / "out", benchmarks=[f"arith={arith}"], echo=QUIET)
    [s] = started  # one engine: on the base's config with placeholder weights, then the merged weights
    assert s["load_format"] == "dummy" and s["model"] != str(ck / "model")
    loaded = s["engine"].loaded
    assert list(loaded) == list(merged)
    for name, t in merged.items():
        torch.testing.assert_close(loaded[name], t.detach(), rtol=0, atol=1e-6)
    assert res["benchmarks"]["arith"]["avg@k"] == 0.5
