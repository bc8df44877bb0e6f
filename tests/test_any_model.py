"""Any Hugging Face causal LM: a Llama-architecture model whose tokenizer has no `<tool_call>` and
no chat template is evaluated and trained under both protocols."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ihgrpo.cli import main
from ihgrpo.config import ConfigError, load_config
from ihgrpo.protocol import EXECUTE_TOKEN
from ihgrpo.rollout import ChatFormat
from ihgrpo.testing.plain import build_plain_tokenizer, build_tiny_llama
from ihgrpo.trainer import GRPOTrainer

OBS_END = "</tool_call>"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    tok = build_plain_tokenizer()
    assert len(tok.encode(EXECUTE_TOKEN, add_special_tokens=False)) > 1 and not tok.chat_template
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def arith(tmp_path):
    path = tmp_path / "arith.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _single(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def test_missing_protocol_tokens_are_added_and_initialised(caplog):
    from ihgrpo.vocab import add_protocol_tokens

    tok = build_plain_tokenizer()
    model = build_tiny_llama(tok)
    n = len(tok)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    pieces = {t: tok.encode(t, add_special_tokens=False) for t in (EXECUTE_TOKEN, OBS_END)}
    with caplog.at_level("WARNING"):
        assert add_protocol_tokens(model, tok, EXECUTE_TOKEN) == [EXECUTE_TOKEN, OBS_END]
    assert (_single(tok, EXECUTE_TOKEN), _single(tok, OBS_END)) == (n, n + 1)
    assert tok.encode("print(x)\n```\n<tool_call>", add_special_tokens=False)[-1] == n
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == n + 2
    assert torch.equal(emb[:n], emb0) and torch.equal(head[:n], head0)  # the old rows are untouched
    for i, t in ((n, EXECUTE_TOKEN), (n + 1, OBS_END)):  # input: its text's pieces; output: the mean row
        assert torch.allclose(emb[i], emb0[pieces[t]].mean(0))
        assert torch.allclose(head[i], head0.mean(0))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and EXECUTE_TOKEN in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert add_protocol_tokens(model, tok, EXECUTE_TOKEN) == []  # already there: nothing, silently
    assert not caplog.records and len(tok) == n + 2


def test_tied_embeddings_stay_tied_and_a_vocabulary_with_the_tokens_is_left_alone():
    from ihgrpo.demo.tokenizer import build_tokenizer
    from ihgrpo.vocab import add_protocol_tokens

    tok = build_plain_tokenizer()
    model = build_tiny_llama(tok, tied=True)
    pieces = tok.encode(EXECUTE_TOKEN, add_special_tokens=False)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    add_protocol_tokens(model, tok, EXECUTE_TOKEN)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.allclose(model.get_input_embeddings().weight[len(tok) - 2], emb0[pieces].mean(0))
    demo_tok = build_tokenizer(n_corpus=40)  # has both tokens already
    demo_model = build_tiny_llama(demo_tok)
    assert add_protocol_tokens(demo_model, demo_tok, EXECUTE_TOKEN) == []
    assert demo_model.get_input_embeddings().weight.shape[0] == len(demo_tok)


def test_plain_prompt_without_a_chat_template():
    tok = build_plain_tokenizer()
    chat = ChatFormat(tok, require_execute_token=False)
    assert chat.execute_token_id is None
    assert chat.prompt_ids("What is 2 plus 2?") == [tok.bos_token_id] + tok.encode(
        "User: What is 2 plus 2?\nAssistant:", add_special_tokens=False)
    with pytest.raises(ValueError, match="must be one token"):
        ChatFormat(tok)  # the delayed protocol needs E


@pytest.mark.parametrize("protocol", ["coupled", "delayed"])
def test_eval_of_a_model_without_the_execute_token(llama_dir, arith, tmp_path, protocol):
    out = tmp_path / protocol
    code = main(["eval", "--model", str(llama_dir), "--benchmark", f"arith={arith}", "--k", "2", "--protocol",
                 protocol, "--out", str(out), "max_response_tokens=24", "max_turns=2", "sandbox_workers=1"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["protocol"] == protocol and res["benchmarks"]["arith"]["n_problems"] == 4
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8
    # the model folder is read, never written
    from transformers import AutoTokenizer

    assert _single(AutoTokenizer.from_pretrained(llama_dir), EXECUTE_TOKEN) is None


def _train_cfg(model, data, out, mode, *extra):
    return load_config(None, [f"model.path={model}", f"data.train={data}", f"output_dir={out}", "max_steps=2",
                              "save_every=2", "prompts_per_step=2", "rollout.group_size=2",
                              "rollout.max_response_tokens=24", "rollout.max_turns=2", "rollout.sandbox_workers=1",
                              f"rollout.mode={mode}", "algo.reward=exact", "algo.dynamic_sampling=false",
                              "optim.lr=0.01", "log.progress=false", "log.tensorboard=false", *extra])


def _alternate(answers, golds):  # noqa: ARG001 - every group has signal
    return [float(i % 2) for i in range(len(answers))]


def _train(cfg):
    trainer = GRPOTrainer(cfg, reward_fn=_alternate)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def test_two_training_steps_under_both_protocols_then_resume_and_eval(llama_dir, arith, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(llama_dir))
    for mode, lam in (("delayed", "1e-3"), ("coupled", "0")):
        trainer, history = _train(_train_cfg(llama_dir, arith, tmp_path / mode, mode, f"algo.lam={lam}"))
        assert [m["step"] for m in history] == [1, 2]
        assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in history)
        ck = tmp_path / mode / "checkpoints" / "step-00000002" / "model"
        saved = AutoTokenizer.from_pretrained(ck)
        if mode == "delayed":  # E was added: the checkpoint's tokenizer has the ids training used
            assert trainer.execute_token_id == _single(saved, EXECUTE_TOKEN) == n
            assert _single(saved, OBS_END) == n + 1
            assert AutoModelForCausalLM.from_pretrained(ck).config.vocab_size == n + 2
        else:  # the coupled protocol needs no E: the vocabulary is left as it was
            assert len(saved) == n and _single(saved, EXECUTE_TOKEN) is None
            assert "loss/p_execute" not in history[0]
    # resume continues from the checkpoint (the same ids, the same shapes)
    _, more = _train(_train_cfg(llama_dir, arith, tmp_path / "delayed", "delayed", "max_steps=3", "resume=true"))
    assert [m["step"] for m in more] == [3]
    # the checkpoint evaluates under the delayed protocol with the ids it was trained with
    out = tmp_path / "eval-ck"
    assert main(["eval", "--model", str(tmp_path / "delayed" / "checkpoints" / "step-00000003" / "model"),
                 "--benchmark", f"arith={arith}", "--k", "1", "--out", str(out), "max_response_tokens=16",
                 "max_turns=2", "sandbox_workers=1"]) == 0


def test_coupled_without_the_execute_token_needs_lam_0(llama_dir, arith, tmp_path):
    with pytest.raises(ConfigError, match="algo.lam=0"):
        GRPOTrainer(_train_cfg(llama_dir, arith, tmp_path, "coupled", "algo.lam=1e-3"), reward_fn=_alternate)


def test_vllm_on_a_folder_without_the_execute_token_is_a_one_line_error(llama_dir, arith, tmp_path, monkeypatch):
    """vLLM reads the weights from the folder, so the vocabulary cannot grow in memory: say so
    before starting an engine."""
    import types

    import ihgrpo.rollout.vllm as vllm_mod
    from ihgrpo.config import load_eval_config
    from ihgrpo.eval import EvalError, run_eval

    fake = types.SimpleNamespace(LLM=lambda *a, **k: pytest.fail("an engine was started"))
    monkeypatch.setattr(vllm_mod, "import_vllm", lambda: fake)
    cfg = load_eval_config(None, [f"model={llama_dir}", "backend=vllm", "k=1", "max_response_tokens=16"])
    with pytest.raises(EvalError, match="--backend hf") as exc:
        run_eval(cfg, tmp_path / "out", benchmarks=[f"arith={arith}"], echo=lambda m: None)
    assert "\n" not in str(exc.value) and EXECUTE_TOKEN in str(exc.value)


def test_lora_on_a_grown_vocabulary_names_the_runs_own_base(llama_dir, arith, tmp_path):
    """With LoRA a checkpoint holds only the adapters: its base must be the model with the added
    rows (the run's copy), not model.path, whose vocabulary lacks them."""
    pytest.importorskip("peft", reason="LoRA needs peft (the lora/test extra)")
    from transformers import AutoTokenizer

    _train(_train_cfg(llama_dir, arith, tmp_path / "lora", "delayed", "lora.r=4", "lora.alpha=8", "max_steps=1",
                      "save_every=1"))
    ck = tmp_path / "lora" / "checkpoints" / "step-00000001"
    base = json.loads((ck / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (ck / "model" / base).resolve() == (tmp_path / "lora" / "base").resolve()
    assert _single(AutoTokenizer.from_pretrained(tmp_path / "lora" / "base"), EXECUTE_TOKEN) is not None
    out = tmp_path / "eval-lora"
    assert main(["eval", "--model", str(ck), "--benchmark", f"arith={arith}", "--k", "1", "--out", str(out),
                 "max_response_tokens=16", "max_turns=2", "sandbox_workers=1"]) == 0
