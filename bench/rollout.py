"""Rollout throughput: HFGenerator against `model.generate`, its cost per length, and multi-turn.

Decoding cost by length (--lengths): 16 rows, prompts of 16..200 tokens (left-padded), sampling at
temperature 1 with no top-k / top-p and no stops, exactly N new tokens per row. On the CPU: a
random 2-layer Qwen3 (hidden 256, 4 query / 2 key-value heads of 64, a 640-token vocabulary like
the demo's, 8k+ positions), float32, 1 thread; on a GPU (the default when one is visible) a
random Qwen3-0.6B-shaped model in bfloat16, 64 rows. Printed, side by side in one run:
* a length table (256, 512, 1,024, 2,048, 4,096 new tokens; 8,192 with --long) of HFGenerator's
  tokens/s and its ratio to 256 tokens;
* at --ref-length (2,048) tokens: HFGenerator vs itself at 256 (target >= 0.4x), vs transformers'
  `model.generate(cache_implementation="static")` on the same model and rows (target >= 1.0x,
  goal 1.5x; on a GPU also `generate` with its default dynamic cache), and HFGenerator with
  transformers' DynamicCache (`kv_cache="dynamic"`, the path before the BufferCache).
The 256- and 2,048-token runs are interleaved over --reps repetitions (median); the other
lengths run once. Every call is timed whole, prompt in, tokens out, after a short warm-up.

Single turn (the default part): the same work for HFGenerator and `model.generate` at
--new-tokens tokens, on a Qwen3-architecture model (152k vocabulary), interleaved over --reps.

Finished-row removal (--compaction): rows with different budgets (from --new-tokens / 8 up
to --new-tokens), HFGenerator with finished rows removed as soon as one finishes
(compact_fraction 0, the default), when at least a quarter of the batch has finished, and never
(compact_fraction 1).

    python bench/rollout.py --lengths                     # CPU: the length table and targets
    python bench/rollout.py --lengths --long              # ... up to 8,192 new tokens
    python bench/rollout.py --lengths --device cuda       # GPU: batch 64 vs model.generate
    python bench/rollout.py                               # single turn, CPU, float32
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
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=args.intermediate,
        max_position_embeddings=args.max_positions, tie_word_embeddings=True)
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


def run_hf_generate(model, prompts, new_tokens: int, device: str, seed: int,
                    cache_implementation: str | None = None) -> int:
    """`model.generate` on the left-padded batch; returns the number of generated tokens.
    `cache_implementation`: None (its default, a dynamic cache) or e.g. "static"."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0, **extra)
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


def decode_lengths(args, model) -> None:
    """Tokens/s by length, and the side-by-side comparisons at --ref-length (module docstring)."""
    prompts = make_prompts(args)
    base, ref = 256, args.ref_length
    lengths = sorted({256, 512, 1024, 2048, 4096, ref} | ({8192} if args.long else set()))
    ours = HFGenerator(model, seed=0)
    before = HFGenerator(model, seed=0, kv_cache="dynamic")
    impls = ["static"] + (["dynamic"] if args.device.startswith("cuda") else [])
    # On a shared CPU, wall time counts the time other processes held the core; with one thread,
    # the process's CPU time counts only ours, so both are shown (on a GPU, wall time only).
    cpu = not args.device.startswith("cuda")
    print(f"decoding by length: {args.batch} rows, prompts {args.prompt_min}..{args.prompt_max} "
          f"tokens, temperature 1, no stops; {args.reps} interleaved reps at {base} and {ref} "
          "(median), one run at the other lengths")
    run_ihgrpo(ours, prompts, 8, args.device, 0)  # warm-up
    run_ihgrpo(before, prompts, 8, args.device, 0)
    for impl in impls:
        run_hf_generate(model, prompts, 8, args.device, 0, impl)

    def rate(fn, *a) -> tuple[float, float]:
        c0 = time.process_time()
        dt, n = timed(fn, *a)
        return n / dt, n / max(time.process_time() - c0, 1e-9)

    runs: dict[str, list[tuple[float, float]]] = {}
    for r in range(args.reps):
        runs.setdefault("ours@base", []).append(rate(run_ihgrpo, ours, prompts, base, args.device, r))
        runs.setdefault("ours@ref", []).append(rate(run_ihgrpo, ours, prompts, ref, args.device, r))
        for impl in impls:
            runs.setdefault(impl, []).append(
                rate(run_hf_generate, model, prompts, ref, args.device, r, impl))
    if not args.skip_before:
        runs["before@base"] = [rate(run_ihgrpo, before, prompts, base, args.device, 0)]
        runs["before@ref"] = [rate(run_ihgrpo, before, prompts, ref, args.device, 0)]
    med = {k: (statistics.median(x for x, _ in v), statistics.median(c for _, c in v))
           for k, v in runs.items()}

    table = {base: med["ours@base"], ref: med["ours@ref"]}
    for n in lengths:
        if n not in table:
            table[n] = rate(run_ihgrpo, ours, prompts, n, args.device, 0)
    b = table[base]
    print(f"  {'new tokens':>10} | {'tok/s (wall)':>12} | {'vs 256':>6}"
          + (f" | {'tok/s (CPU time)':>16} | {'vs 256':>6}" if cpu else ""))
    for n in lengths:
        w, c = table[n]
        print(f"  {n:>10} | {w:12.1f} | {w / b[0]:5.2f}x"
              + (f" | {c:16.1f} | {c / b[1]:5.2f}x" if cpu else ""))

    def show(label: str, key: str) -> None:
        runs_s = ", ".join(f"{w:.0f}" for w, _ in runs[key])
        extra = f" | {med[key][1]:8.1f} tok/s of CPU time" if cpu else ""
        print(f"  {label:<46} {med[key][0]:8.1f} tok/s (runs: {runs_s}){extra}")

    def ratio(a: str, b: str) -> str:
        return (f"{med[a][0] / med[b][0]:.2f}x"
                + (f" (CPU time: {med[a][1] / med[b][1]:.2f}x)" if cpu else ""))

    print(f"side by side at {base} and {ref} new tokens:")
    show(f"HFGenerator (BufferCache) at {base}", "ours@base")
    show(f"HFGenerator (BufferCache) at {ref}", "ours@ref")
    for impl in impls:
        show(f'generate(cache_implementation="{impl}") at {ref}' if impl != "dynamic"
             else f"generate (default dynamic cache) at {ref}", impl)
    if not args.skip_before:
        show(f"HFGenerator with DynamicCache (before) at {base}", "before@base")
        show(f"HFGenerator with DynamicCache (before) at {ref}", "before@ref")
    print(f"  ours at {ref} / ours at {base}: {ratio('ours@ref', 'ours@base')}  [target >= 0.4]")
    for impl in impls:
        target = "  [target >= 1.0, goal 1.5]" if impl == "static" else ""
        print(f"  ours / generate[{impl}] at {ref}: {ratio('ours@ref', impl)}{target}")
    if not args.skip_before:
        print(f"  before at {ref} / before at {base}: {ratio('before@ref', 'before@base')}; "
              f"ours / before at {ref}: {ratio('ours@ref', 'before@ref')}")


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


# Model and batch defaults by part: (CPU, GPU) for --lengths, one set for the single-turn part.
# On the CPU: the single-turn model's shape (4 / 2 heads of 64, as Qwen3 shares kv heads) with
# 2 layers and a demo-sized vocabulary, the "random 2-layer Qwen3 with 8k positions".
# The demo model's own shape: --hidden 160 --heads 5 --kv-heads 5 --head-dim 32 --intermediate 640.
_LENGTHS_CPU = dict(vocab=640, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                    intermediate=768, batch=16, dtype="float32", threads=1)
_LENGTHS_GPU = dict(vocab=151_936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                    intermediate=3072, batch=64, dtype="bfloat16", threads=0)
_SINGLE_TURN = dict(vocab=151_936, hidden=256, layers=4, heads=None, kv_heads=None, head_dim=64,
                    intermediate=None, batch=8, dtype="float32", threads=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int, help="attention heads (default: hidden / 64)")
    ap.add_argument("--kv-heads", type=int, help="key/value heads (default: hidden / 128)")
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--intermediate", type=int, help="MLP width (default: 3 x hidden)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, help="repetitions (default: 5; 2 with --lengths)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (0: torch's default; "
                    "default 1 with --lengths on the CPU)")
    ap.add_argument("--lengths", action="store_true",
                    help="decoding cost by length instead of the single-turn part")
    ap.add_argument("--long", action="store_true", help="with --lengths: also 8,192 new tokens")
    ap.add_argument("--ref-length", type=int, default=2048,
                    help="with --lengths: the length of the side-by-side comparisons")
    ap.add_argument("--skip-before", action="store_true",
                    help="with --lengths: do not time HFGenerator with a DynamicCache")
    ap.add_argument("--compaction", action="store_true",
                    help="also time finished-row removal on rows with different budgets")
    ap.add_argument("--multi-turn", action="store_true", help="also run the multi-turn part")
    args = ap.parse_args()
    defaults = (_SINGLE_TURN if not args.lengths
                else _LENGTHS_GPU if args.device.startswith("cuda") else _LENGTHS_CPU)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.heads = args.heads or max(1, args.hidden // 64)
    args.kv_heads = args.kv_heads or max(1, args.hidden // 128)
    args.intermediate = args.intermediate or 3 * args.hidden
    args.reps = args.reps or (2 if args.lengths else 5)
    longest = max(8192 if args.long else 4096, args.ref_length) if args.lengths else args.new_tokens
    args.max_positions = max(8192, args.prompt_max + longest)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen3 architecture, random weights, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads (q/kv) of {args.head_dim}, vocab {args.vocab}, "
          f"{args.max_positions} positions, {n_params / 1e6:.1f}M parameters, {args.device} "
          f"{args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.lengths:
        decode_lengths(args, model)
        return
    single_turn(args, model)
    if args.multi_turn:
        multi_turn(args, model)


if __name__ == "__main__":
    main()
