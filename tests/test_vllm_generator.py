"""The vLLM adapter against a FAKE engine (tests/fake_vllm.py: vLLM's 0.32 structures; vLLM is
not installed anywhere our tests run). What runs is our adapter; the engine's numbers are made up."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from fake_vllm import FAKE_EOS, FAKE_VLLM, CompletionOutput, FakeVLLMEngine, Logprob, RequestOutput, fake_logprob

from ihgrpo.protocol import TurnEnd
from ihgrpo.rollout import RolloutConfig, RolloutEngine, SamplingParams
from ihgrpo.rollout.vllm import (BackendUnavailable, VLLMGenerator, engine_weights, import_vllm,
                                 logprobs_mode_for)


def gen_for(script, decode=None, **kw):
    engine = FakeVLLMEngine(script, decode, logprobs_mode=kw.pop("logprobs_mode", "raw_logprobs"))
    return VLLMGenerator(engine, vllm_module=FAKE_VLLM, **kw), engine


def play(*tokens):
    return lambda prompt, seed: list(tokens)  # noqa: ARG005


# ----------------------------------------------------------------------------- what we send
def test_sampling_params_sent_to_vllm():
    gen, engine = gen_for(play(5, 6, 7, 9, 9, 9))
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=50, stop_token_ids=(7, 3), seed=11)
    gen.generate([[1, 2], [3, 4, 5]], params, [4, 2])
    (p0, s0), (p1, s1) = engine.requests
    assert p0 == {"prompt_token_ids": [1, 2]} and p1 == {"prompt_token_ids": [3, 4, 5]}
    for s, budget in ((s0, 4), (s1, 2)):
        assert (s.n, s.temperature, s.top_p, s.top_k, s.max_tokens) == (1, 0.8, 0.9, 20, budget)
        assert s.stop_token_ids == [7, 3]
        assert s.ignore_eos is True  # only our stop ids stop, as in HFGenerator
        assert s.logprobs == 0  # the sampled token's log-prob only
        assert s.detokenize is False and not s.stop  # token ids only, no text round trip
    # per-request seeds: distinct, reproducible, from the call's seed
    assert s0.seed != s1.seed and s0.seed is not None
    gen.generate([[1, 2], [3, 4, 5]], params, [4, 2])
    assert [s.seed for _, s in engine.requests[2:]] == [s0.seed, s1.seed]
    gen.generate([[1, 2]], dataclasses.replace(params, seed=12))
    assert engine.requests[-1][1].seed != s0.seed
    gen.generate([[1, 2]], dataclasses.replace(params, seed=None))
    assert engine.requests[-1][1].seed is None  # vLLM draws its own
    gen.generate([[1, 2], [3]], params, seeds=[123, 2**64 - 1])  # a row's own seed: used as is (int64)
    assert [s.seed for _, s in engine.requests[-2:]] == [123, 2**63 - 1]
    with pytest.raises(ValueError, match="seeds"):
        gen.generate([[1, 2]], params, seeds=[1, 2])


def test_outputs_map_to_ours_stop_token_kept_and_length():
    gen, _ = gen_for(lambda prompt, seed: [4, FAKE_EOS, 8, 7, 9, 9] if prompt[0] == 1 else [4, 5, 6, 8, 9])  # noqa: ARG005
    outs = gen.generate([[1, 2], [2]], SamplingParams(max_new_tokens=4, stop_token_ids=(7,)))
    a, b = outs
    # the fake model's EOS is not one of our stop ids: generation goes on through it (ignore_eos)
    assert a.token_ids == [4, FAKE_EOS, 8, 7] and a.finish_reason == "stop_token" and a.stop_string is None
    assert b.token_ids == [4, 5, 6, 8] and b.finish_reason == "length"
    assert a.logprobs == [fake_logprob(t, 2 + i) for i, t in enumerate(a.token_ids)]
    assert b.logprobs == [fake_logprob(t, 1 + i) for i, t in enumerate(b.token_ids)]
    assert a.extra == {} and b.extra == {}  # temperature 1 with raw_logprobs: our convention exactly


def test_stop_strings_detokenize_as_written():
    vocab = {4: "a", 5: "``", 6: "`\n", 7: "<E>", 8: "b"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    gen, engine = gen_for(play(4, 5, 6, 8, 8), decode)
    [out] = gen.generate([[1]], SamplingParams(max_new_tokens=9, stop_strings=("```\n",)))
    assert out.token_ids == [4, 5, 6] and out.finish_reason == "stop_string" and out.stop_string == "```\n"
    sp = engine.requests[-1][1]
    assert sp.detokenize and sp.stop == ["```\n"] and sp.skip_special_tokens is False
    assert sp.spaces_between_special_tokens is False and sp.include_stop_str_in_output is True


def test_logprobs_mode_and_inexact_settings_are_flagged(caplog):
    assert logprobs_mode_for(1.0) == "raw_logprobs" and logprobs_mode_for(0.0) == "raw_logprobs"
    assert logprobs_mode_for(0.7) == "processed_logprobs"
    gen, _ = gen_for(play(4, 7), logprobs_mode="processed_logprobs")
    [exact] = gen.generate([[1]], SamplingParams(temperature=0.7, stop_token_ids=(7,)))
    assert exact.extra == {}  # processed = log_softmax(z / T) when nothing is truncated
    with caplog.at_level("WARNING"):
        [inexact] = gen.generate([[1]], SamplingParams(temperature=0.7, top_p=0.9, stop_token_ids=(7,)))
    assert inexact.extra == {"logprobs_exact": False} and "not ihgrpo's log-probs" in caplog.text
    raw, _ = gen_for(play(4, 7))
    [out] = raw.generate([[1]], SamplingParams(temperature=0.5, stop_token_ids=(7,)))
    assert out.extra == {"logprobs_exact": False}  # raw log-probs ignore the temperature


def test_bad_requests_and_engine_outcomes():
    gen, engine = gen_for(play(4, 7))
    assert gen.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        gen.generate([[1]], SamplingParams(temperature=2.5))
    with pytest.raises(ValueError, match="entries"):
        gen.generate([[1]], SamplingParams(), [1, 2])
    engine._run = lambda ids, sp: RequestOutput("9", None, ids, None, [CompletionOutput(  # noqa: ARG005
        0, "", [4], None, [{4: Logprob(-1.0)}], "abort", None)], True)
    with pytest.raises(RuntimeError, match="abort"):
        gen.generate([[1]], SamplingParams())


# ----------------------------------------------------------------------------- multi-turn rollouts
def test_delayed_rollout_through_the_fake_engine(qwen_tokenizer):
    """RolloutEngine on VLLMGenerator: E ends a turn (kept), code runs, EOS ends the answer."""
    from ihgrpo.sandbox import SandboxPool

    tok = qwen_tokenizer
    E, EOS = 151657, 151645
    code = tok.encode("```python\nprint(6 * 7)\n```\n", add_special_tokens=False) + [E]
    answer = tok.encode("So \\boxed{42}.", add_special_tokens=False) + [EOS]

    seen: list[list[int]] = []

    def script(prompt, seed):  # noqa: ARG001 - code first; the second turn continues after the observation
        seen.append(prompt)
        return code if len(seen) == 1 else answer

    gen, engine = gen_for(script, lambda ids: tok.decode(ids))
    with SandboxPool(max_workers=1, timeout_s=2.0) as pool:
        engine_ = RolloutEngine(gen, tok, pool, RolloutConfig(max_turns=3))
        [traj] = engine_.rollout(["What is 6 times 7?"], 1, SamplingParams(max_new_tokens=100, seed=3))
    assert [t.end for t in traj.turns] == [TurnEnd.EXECUTE, TurnEnd.EOS]
    assert traj.answer == "42" and traj.finished and "42" in traj.turns[0].output
    assert traj.response_ids[:len(code)] == code and traj.response_ids[-len(answer):] == answer
    n_obs = len(traj.response_ids) - len(code) - len(answer)
    assert traj.mask == [1] * len(code) + [0] * n_obs + [1] * len(answer)
    start = len(traj.prompt_ids)
    assert traj.logprobs[:len(code)] == [fake_logprob(t, start + i) for i, t in enumerate(code)]
    stops = engine.requests[0][1].stop_token_ids
    assert E in stops and EOS in stops
    assert seen[1][:len(seen[0]) + len(code)] == seen[0] + code  # the second prompt extends the first turn


# ----------------------------------------------------------------------------- weights, sleep and wake
def _tiny():
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=40)
    return tok, build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=64)


def test_sync_sleep_and_wake_in_order():
    _, model = _tiny()
    gen, engine = gen_for(play(4, 7), sleep_level=2)
    params = SamplingParams(stop_token_ids=(7,))
    gen.generate([[1]], params)  # rollout
    gen.sleep()  # training uses the GPU
    with pytest.raises(RuntimeError, match="sync_weights"):
        gen.generate([[1]], params)  # level 2 dropped the weights
    gen.sync_weights(model)  # after the optimizer step
    gen.generate([[1]], params)  # the next rollout
    gen.sync_weights(model)  # awake: the prefix cache holds KV of the old weights
    assert engine.events == [("generate", 1), ("sleep", 2), ("wake_up", ["weights"]),
                             ("reload_weights", len(engine.loaded)), ("wake_up", ["kv_cache"]), ("generate", 1),
                             ("reload_weights", len(engine.loaded)), ("reset_prefix_cache",)]
    # sleep level 1 keeps the weights: wake everything on the next generate; 0: never sleeps
    gen1, engine1 = gen_for(play(4, 7), sleep_level=1)
    gen1.sleep()
    gen1.sleep()
    gen1.generate([[1]], params)
    assert engine1.events == [("sleep", 1), ("wake_up", None), ("generate", 1)]
    gen0, engine0 = gen_for(play(4, 7))
    gen0.sleep()
    assert engine0.events == []


def test_placeholder_weights_need_a_sync_first():
    _, model = _tiny()
    gen, engine = gen_for(play(4, 7), weights_loaded=False)
    with pytest.raises(RuntimeError, match="sync_weights"):
        gen.generate([[1]], SamplingParams(stop_token_ids=(7,)))
    gen.sync_weights(model)
    gen.generate([[1]], SamplingParams(stop_token_ids=(7,)))
    for name, t in model.named_parameters():
        assert torch.equal(engine.loaded[name], t)


def test_engine_weights_are_the_checkpoint_names():
    _, model = _tiny()
    names = [n for n, _ in engine_weights(model)]
    assert names == [n for n, _ in model.named_parameters()]
    # the names a Hugging Face checkpoint has (what vLLM's load_weights reads), tied weights once
    assert set(names) <= set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_lora_weights_are_merged_without_touching_the_model():
    peft = pytest.importorskip("peft")
    _, model = _tiny()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    got = dict(engine_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload()
    want = dict(merged.named_parameters())
    assert list(got) == list(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t.detach(), rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], before[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    assert all(torch.equal(before[n], p) for n, p in lora.named_parameters())  # unmodified


def test_injected_lora_model_is_merged_as_the_trainer_syncs_it():
    """The trainer syncs the model with the adapters injected (Adapters.model, no PeftModel wrapper):
    the engine still gets plain names with the adapters merged in."""
    peft = pytest.importorskip("peft")
    _, model = _tiny()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    injected = lora.get_base_model()
    got = dict(engine_weights(injected))
    want = dict(copy.deepcopy(lora).merge_and_unload().named_parameters())
    assert list(got) == list(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t.detach(), rtol=0, atol=1e-6)
    gen, engine = gen_for(play(4, 7), weights_loaded=False)
    gen.sync_weights(injected)
    assert not any("lora_" in n or "base_layer" in n for n in engine.loaded)


def test_engine_per_rank_under_torchrun_is_independent(tmp_path, monkeypatch):
    """Under torchrun (world 2) each rank starts its own engine with the external launcher and
    tensor/pipeline/data parallel sizes of 1: vLLM's "external DP", no collectives while generating,
    so ranks may send different prompts and a different number of generate calls."""
    import types

    import ihgrpo.rollout.vllm as vllm_mod
    from ihgrpo.config import load_config
    from ihgrpo.rollout.backends import vllm_options

    tok, model = _tiny()
    started = {}

    def LLM(model, **kwargs):  # noqa: N802 - vllm.LLM
        started.update(model=model, **kwargs)
        return FakeVLLMEngine(play(4, 7))

    monkeypatch.setattr(vllm_mod, "import_vllm", lambda: types.SimpleNamespace(**vars(FAKE_VLLM), LLM=LLM))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    cfg = load_config(None, ["model.path=unused", "data.train=unused", "rollout.backend=vllm"])
    opts = vllm_options(cfg.rollout, output_dir=tmp_path, dtype="bfloat16", seed=5, rank=1, world=2,
                        trust_remote_code=True)
    VLLMGenerator.for_model(model, tok, **opts)
    assert started["distributed_executor_backend"] == "external_launcher"
    sizes = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")
    assert [started[k] for k in sizes] == [1, 1, 1]
    assert started["seed"] == 6 and started["model"] == str(tmp_path / "vllm-engine" / "rank1")
    assert started["trust_remote_code"] is True and started["enable_sleep_mode"] is True
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the external launcher's requirement
    with pytest.raises(ValueError, match="data_parallel_size"):
        VLLMGenerator.launch("m", distributed=True, data_parallel_size=2)


# ----------------------------------------------------------------------------- without vLLM
def test_missing_vllm_is_a_one_line_error():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    with pytest.raises(BackendUnavailable) as exc:
        import_vllm()
    msg = str(exc.value)
    assert "\n" not in msg and "pip install 'ihgrpo[vllm]'" in msg


def test_seeds_reproduce_and_differ_per_request():
    """The fake samples with the seed it gets: same call seed, same tokens; requests differ."""
    def script(prompt, seed):  # noqa: ARG001
        rng = random.Random(seed)
        return [rng.randrange(10, 99) for _ in range(5)] + [7]

    gen, _ = gen_for(script)
    params = SamplingParams(stop_token_ids=(7,), seed=5)
    a = gen.generate([[1], [1]], params)
    b = gen.generate([[1], [1]], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].token_ids != a[1].token_ids
