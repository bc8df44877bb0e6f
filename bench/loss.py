"""Benchmark the IH-GRPO loss: time and peak memory against plain GRPO and a naive full-vocab loss.

    python bench/loss.py                      # B=1, T=2048, V=151,936, H=64, on CPU (a few minutes)
    python bench/loss.py --T 256 --V 32000    # smaller
    python bench/loss.py --device cuda        # on a GPU

Variants, each a full forward + backward of the same PPO-clipped token-mean loss, on-policy:
  logits path (input: fp32 logits [B, T, V] that require grad)
    naive         log_softmax(logits.float()).gather(labels)   (what most trainers do)
    grpo          ih_grpo_loss(..., lam=0)
    ih            ih_grpo_loss(..., lam=1e-3)
  hidden path (input: hidden [B, T, H] and the output layer [V, H], both require grad)
    naive-hidden  logits = hidden @ W^T, then naive
    ih-hidden     logits = hidden @ W^T, then ih_grpo_loss
    ih-chunked    chunked_token_stats + ih_grpo_loss_from_stats (no [T, V] tensor)

How memory is measured (honestly): every variant runs in a fresh subprocess, which builds its
inputs and then runs one forward + backward. Reported "peak" = high-water mark during that call
minus the memory in use just before it, i.e. the extra memory the loss needs, .grad buffers included.
  - CPU: torch's CPU allocations are invisible to tracemalloc, so we read the kernel's resident-set
    high-water mark: write "5" to /proc/self/clear_refs (resets VmHWM to the current RSS), run, read
    VmHWM - VmRSS(before) from /proc/self/status. Big tensors are mmap'd by glibc and given back on
    free, so the mark follows live tensors; allocator noise is a few MB. Where clear_refs cannot be
    written, fall back to ru_maxrss (lifetime peak; valid because inputs are built before the run and
    nothing before it peaks higher) and say so in the "mem method" column.
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated().
Time: one subprocess per path builds the inputs once and runs its variants interleaved, one round
of warm-up and then --reps rounds, so that machine noise hits them alike; median per variant.

Targets: IH / GRPO time <= 1.10x and peak <= 1.05x on the logits path; ih-chunked peak <= 25% of
naive-hidden (the chunked peak is about one [chunk, V] fp32 buffer, so that target needs
T >= 2 * chunk-size). Prints PASS/FAIL per target and exits 0 regardless.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

try:
    from ihgrpo.losses import chunked_token_stats, ih_grpo_loss, ih_grpo_loss_from_stats
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from ihgrpo.losses import chunked_token_stats, ih_grpo_loss, ih_grpo_loss_from_stats

QWEN3_EXECUTE_ID = 151657  # <tool_call>
LOGITS_VARIANTS = ("naive", "grpo", "ih")
HIDDEN_VARIANTS = ("naive-hidden", "ih-hidden", "ih-chunked")


def naive_loss(logits: torch.Tensor, labels: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Full-vocab fp32 log-softmax + gather, then the same PPO clip / dual clip, token-mean."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    a = adv[:, None]
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    loss = torch.where(a < 0, torch.minimum(loss, -3.0 * a), loss)
    return (loss * mask).sum() / mask.sum()


def build(variants: tuple[str, ...], args, device: torch.device) -> dict[str, Callable[[], None]]:
    """Shared inputs and, per variant, a closure running one forward + backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, V, H = args.B, args.T, args.V, args.hidden
    exec_id = QWEN3_EXECUTE_ID if V > QWEN3_EXECUTE_ID else V - 1
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, ::50] = exec_id  # some E tokens
    labels = labels.to(device)
    mask = torch.ones(B, T, device=device)
    adv = torch.linspace(-1.0, 1.0, B).add(0.5).to(device)
    kw = dict(execute_token_id=exec_id, chunk_size=args.chunk_size)
    logits_path = variants[0] in LOGITS_VARIANTS
    if logits_path:
        logits = torch.randn(B, T, V, generator=g).to(device).requires_grad_(True)
        params = [logits]
    else:
        hidden = (torch.randn(B, T, H, generator=g) / H**0.5).to(device).requires_grad_(True)
        weight = torch.randn(V, H, generator=g).to(device).requires_grad_(True)
        params = [hidden, weight]

    def loss_of(variant: str) -> torch.Tensor:
        if variant == "naive":
            return naive_loss(logits, labels, adv, mask)
        if variant in ("grpo", "ih"):
            return ih_grpo_loss(logits, labels, adv, mask, lam=0.0 if variant == "grpo" else 1e-3, **kw)[0]
        if variant == "naive-hidden":
            return naive_loss(hidden @ weight.T, labels, adv, mask)
        if variant == "ih-hidden":
            return ih_grpo_loss(hidden @ weight.T, labels, adv, mask, lam=1e-3, **kw)[0]
        ts = chunked_token_stats(hidden, weight, labels, exec_id, chunk_size=args.chunk_size)
        return ih_grpo_loss_from_stats(ts.logp, ts.logp_exec, ts.z_exec, labels, adv, mask, lam=1e-3,
                                       execute_token_id=exec_id)[0]

    def make_run(variant: str) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            loss_of(variant).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    return {v: make_run(v) for v in variants}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_peak(run, device: torch.device) -> tuple[float, str]:
    """Extra peak memory (MiB) of one run() over what is in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        run()
        return (_status_kb("VmHWM") - before) / 1024, "VmHWM (clear_refs)"
    except OSError:
        before = _status_kb("VmRSS")
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss delta"


def worker(args) -> None:
    device = torch.device(args.device)
    mode, what = args.worker.split(":")
    if mode == "mem":  # a fresh process per variant: one call, nothing warmed up holds memory
        run = build((what,), args, device)[what]
        peak, method = measure_peak(run, device)
        print(json.dumps({"variant": what, "peak_mib": peak, "method": method}))
        return
    # Time: all variants of one path share the inputs and run interleaved, round after round, so that
    # machine noise hits them alike; round 0 is the warm-up.
    runs = build(LOGITS_VARIANTS if what == "logits" else HIDDEN_VARIANTS, args, device)
    times: dict[str, list[float]] = {v: [] for v in runs}
    for rnd in range(args.reps + 1):
        for v, run in runs.items():
            t0 = time.perf_counter()
            run()
            if rnd:
                times[v].append(time.perf_counter() - t0)
    print(json.dumps({v: statistics.median(t) for v, t in times.items()}))


def _sub(args, worker: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--B", str(args.B), "--T", str(args.T),
           "--V", str(args.V), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
           "--reps", str(args.reps), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{worker}: failed\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--V", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=64, help="H of the hidden-state path (small: quick CPU matmuls)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        return worker(args)

    print(f"B={args.B} T={args.T} V={args.V} H={args.hidden} chunk={args.chunk_size} device={args.device} "
          f"reps={args.reps} torch={torch.__version__} threads={torch.get_num_threads()}")
    logits_gib = args.B * args.T * args.V * 4 / 2**30
    print(f"one fp32 [B, T, V] tensor = {logits_gib:.2f} GiB")
    res: dict[str, dict] = {v: {} for v in LOGITS_VARIANTS + HIDDEN_VARIANTS}
    for v in res:
        if (r := _sub(args, f"mem:{v}")) is not None:
            res[v].update(r)
    for path in ("logits", "hidden"):
        for v, t in (_sub(args, f"time:{path}") or {}).items():
            res[v]["time_s"] = t

    print(f"\n{'variant':<14}{'time (s)':>10}{'peak (MiB)':>12}  mem method")
    for v, r in res.items():
        print(f"{v:<14}{r.get('time_s', float('nan')):>10.3f}{r.get('peak_mib', float('nan')):>12.0f}  "
              f"{r.get('method', '-')}")

    def ratio(num: str, den: str, key: str) -> float:
        try:
            return res[num][key] / res[den][key]
        except (KeyError, ZeroDivisionError):
            return float("nan")

    print()
    for name, num, den, key, limit in [
        ("time  IH / GRPO (logits path)", "ih", "grpo", "time_s", 1.10),
        ("peak  IH / GRPO (logits path)", "ih", "grpo", "peak_mib", 1.05),
        ("peak  IH chunked / naive (hidden path)", "ih-chunked", "naive-hidden", "peak_mib", 0.25),
    ]:
        r = ratio(num, den, key)
        print(f"{name:<42}{r:7.3f}  target <= {limit:.2f}  {'PASS' if r <= limit else 'FAIL'}")
    print("for reference:")
    for name, num, den, key in [
        ("time  IH / naive (logits path)", "ih", "naive", "time_s"),
        ("peak  IH / naive (logits path)", "ih", "naive", "peak_mib"),
        ("time  IH chunked / naive (hidden path)", "ih-chunked", "naive-hidden", "time_s"),
        ("peak  IH unchunked / naive (hidden path)", "ih-hidden", "naive-hidden", "peak_mib"),
    ]:
        print(f"{name:<42}{ratio(num, den, key):7.3f}")


if __name__ == "__main__":
    main()
