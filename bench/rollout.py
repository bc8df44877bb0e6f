"""Rollout throughput: HFGenerator against plain `model.generate`, and (to come) multi-turn.

Single-turn part: the same work for both, on a Qwen3-architecture model with random weights
(nothing is downloaded): a batch of prompts of different lengths (left-padded), sampling at
temperature 1 with no top-k / top-p and no stops, exactly --new-tokens tokens per row
(`min_new_tokens` = `max_new_tokens` for `generate`). Timed: the whole call, prompt in, tokens
out, after one warm-up call each; the two are interleaved over --reps repetitions; reported:
the median, in generated tokens per second, and the ratio HFGenerator / generate.

Finished-row removal (--compaction): rows with different budgets (from --new-tokens / 8 up
to --new-tokens), HFGenerator with finished rows removed as soon as one finishes
(compact_fraction 0, the default), when at least a quarter of the batch has finished, and never
(compact_fraction 1).

    python bench/rollout.py                               # CPU, float32
    python bench/rollout.py --device cuda --dtype bfloat16 --batch 32
    python bench/rollout.py --vocab 32000 --compaction
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from ihgrpo.rollout.generator import GenerationOutput, Generator, SamplingParams
from ihgrpo.rollout.hf import HFGenerator


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64, intermediate_size=3 * args.hidden, max_position_embeddings=4096,
        tie_word_embeddings=True)
    dtype = getattr(torch, args.dtype)
    return transformers.Qwen3ForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()


def make_prompts(args) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lo, hi = args.prompt_min, args.prompt_max
    lens = [round(lo + (hi - lo) * i / max(1, args.batch - 1)) for i in range(args.batch)]
    return [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lens]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf_generate(model, prompts, new_tokens: int, device: str, seed: int) -> int:
    """`model.generate` on the left-padded batch; returns the number of generated tokens."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
    _sync(device)
    n = out.shape[1] - P
    assert n == new_tokens, (n, new_tokens)
    return n * len(prompts)


def run_ihgrpo(gen: HFGenerator, prompts, new_tokens: int, device: str, seed: int,
               budgets: list[int] | None = None) -> int:
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=seed)
    outs = gen.generate(prompts, params, max_new_tokens=budgets)
    _sync(device)
    expect = budgets or [new_tokens] * len(prompts)
    assert [len(o.token_ids) for o in outs] == expect
    return sum(expect)


def timed(fn, *a, **k) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*a, **k)
    return time.perf_counter() - t0, n


def single_turn(args, model) -> None:
    prompts = make_prompts(args)
    gen = HFGenerator(model, seed=0)
    print(f"single turn: batch {args.batch}, prompts {args.prompt_min}..{args.prompt_max} tokens, "
          f"{args.new_tokens} new tokens per row, temperature 1, {args.reps} reps (median)")
    run_hf_generate(model, prompts, args.new_tokens, args.device, 0)  # warm-up
    run_ihgrpo(gen, prompts, args.new_tokens, args.device, 0)
    t_hf, t_ih = [], []
    for r in range(args.reps):
        dt, n = timed(run_hf_generate, model, prompts, args.new_tokens, args.device, r)
        t_hf.append(n / dt)
        dt, n = timed(run_ihgrpo, gen, prompts, args.new_tokens, args.device, r)
        t_ih.append(n / dt)
    hf, ih = statistics.median(t_hf), statistics.median(t_ih)
    print(f"  model.generate : {hf:9.1f} tok/s   (runs: {', '.join(f'{x:.0f}' for x in t_hf)})")
    print(f"  HFGenerator    : {ih:9.1f} tok/s   (runs: {', '.join(f'{x:.0f}' for x in t_ih)})")
    print(f"  ratio HFGenerator / generate: {ih / hf:.2f}x")

    if args.compaction:
        n, b = args.new_tokens, args.batch
        budgets = [max(1, round(n / 8 + (n - n / 8) * i / max(1, b - 1))) for i in range(b)]
        budgets = budgets[::2] + budgets[1::2]  # not sorted by prompt length
        print(f"finished-row removal: budgets {budgets} ({sum(budgets)} tokens)")
        gens = {f"compact_fraction={f}": HFGenerator(model, seed=0, compact_fraction=f)
                for f in (0.0, 0.25, 1.0)}
        for g in gens.values():
            run_ihgrpo(g, prompts, n, args.device, 0, budgets)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in gens}
        for r in range(args.reps):
            for k, g in gens.items():
                dt, _ = timed(run_ihgrpo, g, prompts, n, args.device, r, budgets)
                times[k].append(dt)
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"  {k:20s}: {med * 1000:8.1f} ms  {sum(budgets) / med:9.1f} tok/s")


# ==================================================================================
# MULTI-TURN PART (sandbox wait share): to be written by the rollout-engine author.
# Intended: RolloutEngine with HFGenerator + SandboxPool on tool-using prompts; report
# the share of wall time spent waiting for the sandbox vs generating.
# ==================================================================================
class _TimedScript(Generator):
    """Real model compute, scripted content: for each prefix the real HFGenerator decodes as
    many tokens as the script's next turn has (so the cost is a real model's), then the script's
    tokens are returned (so the content is code that runs)."""

    def __init__(self, hf: Generator, script):
        self.hf, self.script = hf, script

    def generate(self, prefixes, params, max_new_tokens=None, *, request_ids=None, seeds=None):  # noqa: ARG002
        turns = [self.script(rid, p) for rid, p in zip(request_ids, prefixes)]
        budgets = max_new_tokens or [params.max_new_tokens] * len(prefixes)
        turns = [t[:b] for t, b in zip(turns, budgets)]
        free = SamplingParams(temperature=params.temperature, max_new_tokens=max(len(t) for t in turns))
        self.hf.generate(prefixes, free, [len(t) for t in turns])  # the compute, output discarded
        outs = []
        for t in turns:
            reason = "stop_token" if t[-1] in params.stop_token_ids else "length"
            outs.append(GenerationOutput(t, [-1.0] * len(t), reason))
        return outs


MULTI_TURN_SCRIPT = [
    "Let me set up the sum first.\n```python\nN = 300000\ntotal = sum(k * k % 7 for k in range(N))\n```\n"
    "Then factor something with sympy.\n```python\nimport sympy\nf = sympy.factorint(2**64 + 1)\n"
    "print(total, f)\n```\n<tool_call>",
    "Now combine them.\n```python\nprint(total % 1000 + len(f))\n```\n<tool_call>",
    "So the answer is \\boxed{42}.<|im_end|>",
]


def multi_turn(args, model) -> None:
    """Engine + HFGenerator + SandboxPool on tool-using trajectories: where does the time go?"""
    from ihgrpo.rollout import RolloutConfig, RolloutEngine
    from ihgrpo.sandbox import SandboxPool
    from ihgrpo.testing.qwen_tokenizer import build_qwen3_tokenizer

    if args.vocab != 151_936:
        print("multi turn: needs the Qwen vocabulary (--vocab 151936); skipped")
        return
    tok = build_qwen3_tokenizer()
    turns = [tok.encode(t, add_special_tokens=False) for t in MULTI_TURN_SCRIPT]
    cursor: dict[str, int] = {}

    def script(rid, prefix):  # noqa: ARG001
        i = cursor.get(rid, 0)
        cursor[rid] = i + 1
        return turns[min(i, len(turns) - 1)]

    hf = HFGenerator(model, tok, seed=0)
    groups, group_size = max(1, args.batch // 4), 4
    print(f"multi turn: {groups} prompts x {group_size} rollouts, 3 turns, 2 executions each "
          "(numeric loop, sympy import and factorisation), sandbox isolation on")
    for wait, label in ((None, "deterministic rounds"), (0.2, "straggler_wait_s=0.2")):
        cursor.clear()
        with SandboxPool(max_workers=2, timeout_s=10, preload=("sympy",)) as pool:
            time.sleep(2)  # warm interpreters ready
            engine = RolloutEngine(_TimedScript(hf, script), tok, pool,
                                   RolloutConfig(max_response_tokens=1024, straggler_wait_s=wait))
            t0 = time.perf_counter()
            trajs = engine.rollout([f"question {i}" for i in range(groups)], group_size,
                                   SamplingParams(max_new_tokens=256))
            wall = time.perf_counter() - t0
        timing = engine.last_timing
        toks = sum(t.model_tokens for t in trajs)
        ok = sum(r.ok is True for t in trajs for r in t.turns if r.code)
        print(f"  {label:<24} wall {wall:6.2f} s | generate {timing['generate_time_s']:6.2f} s "
              f"({100 * timing['generate_time_s'] / wall:4.1f}%) | waiting on the sandbox "
              f"{timing['exec_wait_time_s']:5.2f} s ({100 * timing['exec_wait_time_s'] / wall:4.1f}%) | "
              f"{toks / wall:6.1f} model tok/s | executions ok {ok}/{2 * len(trajs)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--compaction", action="store_true",
                    help="also time finished-row removal on rows with different budgets")
    ap.add_argument("--multi-turn", action="store_true", help="also run the multi-turn part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen3 architecture, random weights, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {n_params / 1e6:.1f}M parameters, {args.device} {args.dtype}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    single_turn(args, model)
    if args.multi_turn:
        multi_turn(args, model)


if __name__ == "__main__":
    main()
