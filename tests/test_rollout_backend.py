"""The trainer's generation backend: the factory, the sync/sleep calls around each update, the
rollout-vs-trainer mismatch metrics every step, TIS in a real run, and vLLM missing = exit 2."""

from __future__ import annotations

import pytest

import ihgrpo.trainer as trainer_mod
from ihgrpo.config import ConfigError, load_config
from ihgrpo.data import Example
from ihgrpo.rollout.backends import make_generator
from ihgrpo.rollout.hf import HFGenerator
from ihgrpo.trainer import GRPOTrainer

EXAMPLES = [Example(f"What is {i} + {i}?", str(2 * i), str(i)) for i in range(6)]


def _tiny():
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=40)
    return tok, build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=64)


def _run(tmp_path, *extra, record=None, monkeypatch=None):
    cfg = load_config(None, ["model.path=unused", "data.train=unused", f"output_dir={tmp_path}", "max_steps=2",
                             "prompts_per_step=2", "rollout.group_size=4", "rollout.max_response_tokens=24",
                             "rollout.max_turns=2", "rollout.sandbox_workers=1", "optim.lr=0.003",
                             "algo.reward=exact", "log.progress=false", "log.tensorboard=false", *extra])
    tok, model = _tiny()
    if record is not None:
        def recording(*args, **kwargs):
            gen = make_generator(*args, **kwargs)
            for name in ("generate", "sync_weights", "sleep"):
                def call(*a, _f=getattr(gen, name), _n=name, **k):
                    record.append((_n, a[0] is model if _n == "sync_weights" else None))
                    return _f(*a, **k)
                setattr(gen, name, call)
            return gen

        monkeypatch.setattr(trainer_mod, "make_generator", recording)
    flip = iter(range(10**6))

    def reward(answers, golds):  # noqa: ARG001 - alternate rewards: every group has signal
        return [float(next(flip) % 2) for _ in answers]

    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=EXAMPLES, reward_fn=reward)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def test_hf_backend_syncs_and_sleeps_around_updates_and_logs_no_mismatch(tmp_path, monkeypatch):
    events: list = []
    trainer, history = _run(tmp_path / "none", record=events, monkeypatch=monkeypatch)
    assert isinstance(trainer.generator, HFGenerator)
    calls = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # runs of generate collapse
    # start from the trainer's weights; each step: rollout, sleep for the update, sync the updated weights
    assert calls == [("sync_weights", True), ("generate", None), ("sleep", None), ("sync_weights", True),
                     ("generate", None), ("sleep", None), ("sync_weights", True)]
    for m in history:
        # HF generator and trainer on CPU in float32: the same log-probs up to rounding
        assert m["loss/rollout_logp_absdiff"] < 1e-4
        assert abs(m["loss/rollout_ratio_max"] - 1) < 1e-4 and abs(m["loss/rollout_ratio_min"] - 1) < 1e-4
        assert m["loss/rollout_ratio_min"] <= m["loss/rollout_ratio_max"]
        assert "time_sync_weights_s" in m and "loss/rollout_is_weight_mean" not in m

    # TIS on the same run: weights ~1, the cap never binds, the update is the same up to rounding
    _, tis = _run(tmp_path / "tis", "algo.rollout_is=tis", "algo.rollout_is_cap=2")
    for a, b in zip(history, tis):
        assert b["loss/rollout_is_capped_frac"] == 0.0
        assert b["loss/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert b["loss/loss"] == pytest.approx(a["loss/loss"], rel=1e-3, abs=1e-6)


def test_config_checks():
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_config(None, ["rollout.backend=sglang"])
    with pytest.raises(ConfigError, match="rollout_is_cap"):
        load_config(None, ["algo.rollout_is=tis", "algo.rollout_is_cap=0.5"])
    with pytest.raises(ConfigError, match="algo.rollout_is"):
        load_config(None, ["algo.rollout_is=icepop"])
    with pytest.raises(ConfigError, match="vllm_sleep_level"):
        load_config(None, ["rollout.vllm_sleep_level=3"])
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator("sglang", None, None)


def test_vllm_backend_without_vllm_exits_2_with_the_install_line(tmp_path, capsys):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    from ihgrpo.cli import main

    tok, model = _tiny()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n')
    capsys.readouterr()  # drop save_pretrained's progress bars
    code = main(["train", "cpu-tiny", f"model.path={tmp_path / 'model'}", f"data.train={data}",
                 f"output_dir={tmp_path / 'out'}", "rollout.backend=vllm", "log.progress=false"])
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert code == 2 and last.startswith("ihgrpo train: error: the vLLM backend needs vLLM")
    assert last.endswith("pip install 'ihgrpo[vllm]'")
