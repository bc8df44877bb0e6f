"""LoRA through PEFT: only the adapters train and are checkpointed, resume, the KL reference is the
base with the adapters off, eval/export load base + adapter, and the one-line error without peft."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="needs the peft package (pip install 'ihgrpo[lora]')")

from ihgrpo.cli import main  # noqa: E402
from ihgrpo.config import ConfigError, LoraSection, load_config  # noqa: E402
from ihgrpo.lora import apply_lora  # noqa: E402
from ihgrpo.models import load_model_and_tokenizer  # noqa: E402
from ihgrpo.trainer import GRPOTrainer, PolicyStats, collate  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_trainer import EXAMPLES, _cfg, _strip_time, _tiny  # noqa: E402
from train_script import main as train_script  # noqa: E402

LORA = ["lora.r=4", "lora.alpha=8"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _alternating_reward():
    flip = iter(range(10**6))
    return lambda answers, golds: [float(next(flip) % 2) for _ in answers]  # noqa: ARG005


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Two LoRA steps with a KL term; what the tests below inspect."""
    out = tmp_path_factory.mktemp("lora-run")
    tok, model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(_cfg(out, *LORA, "algo.kl_coef=0.05"), model=model, tokenizer=tok, examples=EXAMPLES,
                          reward_fn=_alternating_reward())
    try:
        history = trainer.train()
        ids = torch.tensor([[5, 9, 12, 7, 30, 31, 8]])
        batch = collate([_traj(ids[0].tolist())], [1.0], trainer.pad_id, [True], trainer.execute_token_id)
        ref = trainer._ref_logprobs(batch)
        policy = trainer.dist.unwrap(trainer.policy)(batch.input_ids, batch.attention_mask, batch.labels).logp
        yield {"out": out, "trainer": trainer, "before": before, "history": history, "tok": tok, "ids": ids,
               "logits": _logits(trainer._model(), ids), "batch": batch, "ref": ref, "policy": policy.detach()}
    finally:
        trainer.close()


def _traj(ids):
    from ihgrpo.rollout import Trajectory

    return Trajectory("t", 0, 0, ids[:2], ids[2:], [1] * (len(ids) - 2), [0.0] * (len(ids) - 2))


def test_only_the_adapters_train(lora_run):
    trainer, before = lora_run["trainer"], lora_run["before"]
    assert [m["step"] for m in lora_run["history"]] == [1, 2]
    trainable = {n for n, p in trainer._model().named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = trainer._model().state_dict()
    for k, v in before.items():  # every base weight is bit for bit what it was
        live = k if k in after else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[live], v), k
    assert any(v.abs().sum() > 0 for k, v in after.items() if "lora_B" in k)  # B starts at 0: it trained


def test_checkpoint_holds_only_the_adapter(lora_run):
    from safetensors.torch import load_file

    model_dir = lora_run["out"] / "checkpoints" / "step-00000002" / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not list(model_dir.glob("model*.safetensors"))
    weights = load_file(model_dir / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    n_base = sum(v.numel() for v in lora_run["before"].values())
    assert sum(v.numel() for v in weights.values()) < n_base / 5
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert (model_dir / cfg["base_model_name_or_path"] / "config.json").is_file()  # the run's copy of the base


def test_kl_reference_is_the_base_with_adapters_off(lora_run):
    trainer = lora_run["trainer"]
    assert trainer.reference is None  # no deepcopy of the model
    tok, base = _tiny()  # the same seed: the untrained base
    b = lora_run["batch"]
    want = PolicyStats(base, trainer.execute_token_id, temperature=trainer.cfg.rollout.temperature)(
        b.input_ids, b.attention_mask, b.labels).logp.detach()
    torch.testing.assert_close(lora_run["ref"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lora_run["policy"], want, atol=1e-4)  # the adapters changed the policy
    # ... and they are back on after the reference pass
    torch.testing.assert_close(_logits(trainer._model(), lora_run["ids"]), lora_run["logits"])


def test_eval_loader_and_export_merge_the_adapter(lora_run, tmp_path, capsys):
    ck = lora_run["out"] / "checkpoints" / "step-00000002"
    for path in (ck / "model", ck):  # the checkpoint's model dir, the checkpoint
        model, tok = load_model_and_tokenizer(str(path))
        assert not any("lora_" in n for n, _ in model.named_parameters())  # merged into plain weights
        torch.testing.assert_close(_logits(model, lora_run["ids"]), lora_run["logits"], rtol=1e-5, atol=1e-5)
        assert tok.convert_tokens_to_ids("<tool_call>") == lora_run["tok"].convert_tokens_to_ids("<tool_call>")
    # ... and `ihgrpo eval --model CHECKPOINT` runs on it
    assert main(["eval", "--model", str(ck), "--benchmark", "demo", "--out", str(tmp_path / "eval"), "limit=2", "k=1",
                 "max_turns=1", "max_response_tokens=8", "sandbox_workers=1"]) == 0
    assert (tmp_path / "eval" / "results.json").is_file()
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(exported, lora_run["ids"]), lora_run["logits"], rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ck), "--out", str(out)]) == 2  # not empty: refused
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not empty" in err[0] and "does not exist" in err[1]


def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_script(str(full), 4, False, *LORA)
    train_script(str(resumed), 2, False, *LORA)
    train_script(str(resumed), 4, True, *LORA)
    a = (full / "metrics.jsonl").read_text().splitlines()
    b = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(a) == 4 and _strip_time(a) == _strip_time(b)
    assert all(not list((c / "model").glob("model*.safetensors")) for c in (resumed / "checkpoints").iterdir())
    # resuming with other LoRA settings is a clear error, not a silent restart
    with pytest.raises(ConfigError, match="lora"):
        train_script(str(resumed), 5, True, "lora.r=8")


def test_without_peft_lora_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    _, model = _tiny()
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ihgrpo\[lora\]'"):
        apply_lora(model, LoraSection(r=8))
    assert apply_lora(model, LoraSection(r=0)) is None  # off: peft is not needed
    model_dir, data = tmp_path / "m", tmp_path / "d.jsonl"
    tok, model = _tiny()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data.write_text('{"question": "q", "answer": "1"}\n')
    capsys.readouterr()
    assert main(["train", "cpu-tiny", f"model.path={model_dir}", f"data.train={data}", "lora.r=8",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ihgrpo[lora]'" in err
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(None, ["lora.r=-1"])
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config(None, ["lora.dropout=1.5"])
    for value in ("[q_proj,v_proj]", "q_proj,v_proj"):
        assert load_config(None, [f"lora.target_modules={value}"]).lora.target_modules == ["q_proj", "v_proj"]
    _, model = _tiny()
    with pytest.raises(ConfigError, match="output layer"):
        apply_lora(model, LoraSection(r=2, target_modules=["q_proj", "lm_head"]))
    _, model = _tiny()
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(model, LoraSection(r=2, target_modules=["no_such_layer"]))


def test_train_demo_with_lora_from_the_cli(tmp_path, monkeypatch):
    """`ihgrpo train demo lora.r=8 lora.alpha=16 max_steps=2`, on a stand-in for the demo's
    cached SFT start (training the real one takes minutes; test_demo_learning covers it)."""
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.pipeline import DemoSettings, sft_key
    from ihgrpo.demo.tokenizer import build_tokenizer

    monkeypatch.setenv("IHGRPO_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "demo-sft" / sft_key(DemoSettings.full())
    tok = build_tokenizer()
    build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, intermediate_size=64).save_pretrained(cache)
    tok.save_pretrained(cache)
    (cache / "DONE").write_text("ok\n")
    out = tmp_path / "run"
    assert main(["train", "demo", "lora.r=8", "lora.alpha=16", "max_steps=2", f"output_dir={out}",
                 "log.progress=false", "rollout.max_response_tokens=48", "rollout.max_tokens_per_turn=24"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "model" / "adapter_model.safetensors").is_file()
    model, _ = load_model_and_tokenizer(str(out / "checkpoints" / "step-00000002"))  # the run's base + adapter
    assert model.config.hidden_size == 32
