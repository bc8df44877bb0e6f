"""The precision policy and the start-up memory estimate (ihgrpo.precision, ihgrpo.memory).

The estimate's arithmetic is checked against hand counts: a tiny Qwen3 config, and the Qwen3-8B
shape (a config object only: parameters are counted on the meta device, no weights exist).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ihgrpo.config import ConfigError  # noqa: E402
from ihgrpo.memory import (GiB, count_parameters, estimate_memory, lora_parameter_count,  # noqa: E402
                           model_shape)
from ihgrpo.precision import Precision, precision_policy  # noqa: E402

AUTO_GPU = Precision(torch.float32, torch.bfloat16)


def _tiny_config():
    return transformers.Qwen3Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    tie_word_embeddings=True)


def _qwen3_8b_config():
    # Qwen/Qwen3-8B's config.json sizes
    return transformers.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960)


def test_precision_policy():
    assert precision_policy("auto", "cuda") == Precision(torch.float32, torch.bfloat16)
    assert precision_policy("auto", "cuda").mixed_precision == "bf16"
    assert precision_policy("auto", "cpu") == Precision(torch.float32, None)
    bf16 = precision_policy("bfloat16", "cuda")
    assert bf16 == Precision(torch.bfloat16, None) and bf16.compute == torch.bfloat16
    assert bf16.mixed_precision == "no" and bf16.weights_name == "bfloat16"
    assert precision_policy("float32", "cuda").compute == torch.float32
    with pytest.raises(ValueError, match="model.dtype"):
        precision_policy("int8", "cuda")


def test_estimate_matches_a_hand_count_on_a_tiny_config():
    cfg = _tiny_config()
    # embeddings 100x16 (tied head); per layer q 16x16, k 16x8, v 16x8, o 16x16, q/k norms 8+8,
    # MLP 3 x 16x32, two norms 2x16; the final norm 16.
    per_layer = 256 + 128 + 128 + 256 + 16 + 3 * 512 + 32
    n = 1600 + 2 * per_layer + 16
    assert count_parameters(cfg) == n == 6320
    shape = model_shape(cfg)
    assert shape.kv_values_per_token == 2 * 2 * 1 * 8
    est = estimate_memory(shape, n_params=n, n_trainable=n, precision=AUTO_GPU, rows=12, tokens=300)
    assert (est.parameters, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)
    assert est.generation == 2 * n  # autocast's bf16 copy of the fp32 weights during the rollout
    assert est.kv_cache == 2 * 2 * 1 * 8 * 300 * 12 * 2
    assert est.rollout_phase == 4 * n + 8 * n + 2 * n + est.kv_cache
    assert est.total == max(est.rollout_phase, est.update_phase)
    # bf16 end to end: two bytes for everything, no separate generation copy
    bf = estimate_memory(shape, n_params=n, n_trainable=n, precision=Precision(torch.bfloat16), rows=12, tokens=300)
    assert (bf.parameters, bf.optimizer, bf.generation, bf.kv_cache) == (2 * n, 4 * n, 0, est.kv_cache)
    # LoRA r=2 on every linear layer of the blocks: r x (in + out) each
    per_layer_lora = 2 * ((16 + 16) + (16 + 8) + (16 + 8) + (16 + 16) + 3 * (16 + 32))
    assert lora_parameter_count(cfg, 2) == lora_parameter_count(cfg, 2, ["all-linear"]) == 2 * per_layer_lora
    assert lora_parameter_count(cfg, 2, ["q_proj", "v_proj"]) == 2 * 2 * ((16 + 16) + (16 + 8))


def test_estimate_for_the_qwen3_8b_shape():
    cfg = _qwen3_8b_config()
    per_layer = (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288  # q, o, k, v, MLP
                 + 2 * 128 + 2 * 4096)  # q/k norms, layer norms
    n = 2 * 151936 * 4096 + 36 * per_layer + 4096  # embeddings, untied head, blocks, final norm
    assert count_parameters(cfg) == n == 8_190_735_360
    shape = model_shape(cfg)
    est = estimate_memory(shape, n_params=n, n_trainable=n, precision=AUTO_GPU, rows=128, tokens=8192)
    # fp32 master weights + grads + AdamW: 16 bytes a parameter, ~122 GiB (131 GB) before the rest
    assert est.parameters + est.gradients + est.optimizer == 16 * n
    assert (est.parameters + est.gradients + est.optimizer) / 1e9 == pytest.approx(131.05, abs=0.01)
    # KV: 36 layers x 2 x 8 heads x 128 x 2 bytes = 144 KiB a token; 128 rows x 8192 tokens = 144 GiB
    assert est.kv_cache == 36 * 2 * 8 * 128 * 2 * 8192 * 128 == 144 * GiB
    # FSDP over 8 GPUs with 16 rows each: the sharded states and a gathered bf16 generation copy
    fsdp = estimate_memory(shape, n_params=n, n_trainable=n, precision=AUTO_GPU, rows=16, tokens=8192,
                           processes=8, fsdp=True, gradient_checkpointing=True)
    assert fsdp.parameters == 4 * n // 8 and fsdp.optimizer == 8 * n // 8
    assert fsdp.generation == 2 * n and fsdp.kv_cache == 18 * GiB
    # LoRA r=16 on all linear layers: adapters train, the frozen base is only read
    lora_n = lora_parameter_count(cfg, 16)
    per_layer_lora = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + 3 * (4096 + 12288))
    assert lora_n == 36 * per_layer_lora == 43_646_976
    lo = estimate_memory(shape, n_params=n + lora_n, n_trainable=lora_n, precision=AUTO_GPU, rows=16, tokens=8192,
                         lora=True, gradient_checkpointing=True)
    assert lo.gradients == 4 * lora_n and lo.optimizer == 8 * lora_n and lo.generation == 0
    assert lo.total < 80 * GiB < est.total


def test_refusal_is_one_line_naming_the_settings_to_change():
    cfg = _qwen3_8b_config()
    n = count_parameters(cfg)
    est = estimate_memory(model_shape(cfg), n_params=n, n_trainable=n, precision=AUTO_GPU, rows=128, tokens=8192)
    est.check(est.total)  # fits exactly: no error
    with pytest.raises(ConfigError) as exc:
        est.check(139 * GiB, "cuda:0")
    msg = str(exc.value)
    assert "\n" not in msg and "cuda:0 has 139.0 GiB free" in msg
    for setting in ("distributed.strategy=fsdp", "lora.r=", "rollout.max_batch_rows=32 (now 128 rows"):
        assert setting in msg, setting
    assert "parameters 30.5" in msg and "KV cache 144.0" in msg


def test_training_estimate_reads_the_run_settings():
    """rows = the process's share of a step (prompts_per_step / processes x group_size), capped by
    rollout.max_batch_rows; tokens = the longest prompt + max_response_tokens; FSDP and LoRA from
    the config's distributed / lora sections (counted from lora.r before adapters exist)."""
    from types import SimpleNamespace

    from ihgrpo.config import load_config
    from ihgrpo.memory import training_estimate

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(_tiny_config())
    n = count_parameters(model)
    cfg = load_config("qwen3-1.7b", ["prompts_per_step=16", "rollout.group_size=8", "rollout.max_response_tokens=1000"])
    est = training_estimate(cfg, model, precision=AUTO_GPU, processes=2, prompt_tokens=24)
    assert (est.rows, est.tokens, est.parameters, est.gradients) == (64, 1024, 4 * n, 4 * n)
    cfg = load_config("qwen3-1.7b", ["rollout.max_batch_rows=16"])
    cfg.distributed = SimpleNamespace(strategy="fsdp")  # the sections the FSDP/LoRA work adds
    cfg.lora = SimpleNamespace(r=2, target_modules=["all-linear"])
    est = training_estimate(cfg, model, precision=AUTO_GPU, processes=2, prompt_tokens=24)
    lora_n = lora_parameter_count(model, 2)
    assert est.rows == 16 and est.fsdp and est.lora
    assert est.parameters == 4 * (n + lora_n) // 2 and est.gradients == 4 * lora_n // 2


def test_kl_reference_copy_is_counted():
    """algo.kl_coef > 0 without LoRA deep-copies the model as the KL reference: its weights (in the
    weights' dtype, sharded under FSDP) stay on the GPU through both phases. With LoRA the
    reference is the base with the adapters off: no copy."""
    from types import SimpleNamespace

    from ihgrpo.config import load_config
    from ihgrpo.memory import training_estimate

    cfg = _qwen3_8b_config()
    n = count_parameters(cfg)
    kw = dict(n_params=n, n_trainable=n, precision=AUTO_GPU, rows=16, tokens=8192)
    plain = estimate_memory(model_shape(cfg), **kw)
    ref = estimate_memory(model_shape(cfg), **kw, reference=True)
    assert plain.reference == 0 and ref.reference == 4 * n  # fp32 weights, no gradients or optimizer state
    assert ref.rollout_phase == plain.rollout_phase + 4 * n and ref.update_phase == plain.update_phase + 4 * n
    bf = estimate_memory(model_shape(cfg), **{**kw, "precision": Precision(torch.bfloat16)}, reference=True)
    assert bf.reference == 2 * n
    sharded = estimate_memory(model_shape(cfg), **kw, processes=8, fsdp=True, reference=True)
    assert sharded.reference == 4 * n // 8
    assert "reference 30.5" in ref.summary()
    with pytest.raises(ConfigError, match=r"reference 30\.5.*algo\.kl_coef=0"):
        ref.check(ref.total - 1)

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(_tiny_config())
    m = count_parameters(model)
    est = training_estimate(load_config("qwen3-1.7b", ["algo.kl_coef=0.01"]), model, precision=AUTO_GPU,
                            processes=1, prompt_tokens=24)
    assert est.reference == 4 * m
    assert training_estimate(load_config("qwen3-1.7b", []), model, precision=AUTO_GPU, processes=1,
                             prompt_tokens=24).reference == 0
    lora = load_config("qwen3-1.7b", ["algo.kl_coef=0.01"])
    lora.lora = SimpleNamespace(r=2, target_modules=["all-linear"])
    assert training_estimate(lora, model, precision=AUTO_GPU, processes=1, prompt_tokens=24).reference == 0


def test_vllm_backend_holds_the_rollout_in_its_own_share():
    """With rollout.backend vllm the generation weights and KV cache are the engine's (inside its
    rollout.vllm_gpu_memory_utilization share); asleep during the update it gives that share back."""
    import dataclasses

    cfg = _tiny_config()
    n = count_parameters(cfg)
    est = estimate_memory(model_shape(cfg), n_params=n, n_trainable=n, precision=AUTO_GPU, rows=4, tokens=100)
    est = dataclasses.replace(est, generation=0, kv_cache=0, activations=10 * n, backend="vllm")
    free = est.rollout_phase + 1  # enough for parameters + optimizer while vLLM generates
    assert est.update_phase > free
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        est.check(free)
    est.check(free, update_headroom=est.update_phase - free)  # the sleeping engine's share


def test_train_cli_refuses_a_run_that_cannot_fit_the_gpu_it_sees(tmp_path, monkeypatch, capsys):
    """The trainer asks the GPU for its free memory before the first step (here an injected 64 MiB:
    the test runs on a CPU) and the CLI turns the refusal into one line and exit status 2."""
    from ihgrpo import memory
    from ihgrpo.cli import main
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=40)
    build_model(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, intermediate_size=64).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    seen = []
    monkeypatch.setattr(memory, "gpu_memory", lambda device: seen.append(device) or (64 * 1024**2, 80 * GiB))
    argv = ["train", "cpu-tiny", f"model.path={tmp_path / 'model'}", f"data.train={data}",
            f"output_dir={tmp_path / 'run'}", "max_steps=1", "rollout.max_response_tokens=65536",
            "prompts_per_step=64", "rollout.group_size=8"]
    capsys.readouterr()
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("ihgrpo train: error: the run needs about")
    err = errors[0]
    assert "0.1 GiB free" in err
    assert "rollout.max_batch_rows=128 (now 512 rows" in err and "lora.r=" in err
    assert seen and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main([*argv, "check_memory=false", "max_steps=0"]) == 0  # the way past a wrong estimate


def test_autocast_policy_runs_rollout_and_update_in_the_compute_dtype(tmp_path):
    """`auto` on a GPU = fp32 weights + bf16 autocast for every forward, the rollout's included
    (keys and values computed in bf16). CPU autocast dispatches the same way: a train step under
    that policy projects keys in bf16 while generating and while updating, with finite results."""
    from ihgrpo.config import load_config
    from ihgrpo.data import Example
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer
    from ihgrpo.trainer import GRPOTrainer

    tok = build_tokenizer(n_corpus=40)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    key_dtypes = {True: set(), False: set()}  # model.training -> dtypes of k_proj outputs
    model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out: key_dtypes[model.training].add(out.dtype))
    flip = iter(range(10**6))
    cfg = load_config(None, ["model.path=unused", "data.train=unused", f"output_dir={tmp_path}", "max_steps=1",
                             "prompts_per_step=2", "rollout.group_size=4", "rollout.max_response_tokens=24",
                             "rollout.max_turns=2", "rollout.sandbox_workers=1", "algo.reward=exact",
                             "log.progress=false", "log.tensorboard=false"])
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=[Example("What is 1 + 1?", "2", "1")] * 4,
                          reward_fn=lambda a, g: [float(next(flip) % 2) for _ in a])
    trainer.precision = AUTO_GPU  # the GPU policy, on the CPU
    try:
        (metrics,) = trainer.train()
    finally:
        trainer.close()
    assert key_dtypes == {False: {torch.bfloat16}, True: {torch.bfloat16}}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert metrics["groups_kept"] == 2 and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss/loss"]))
