"""Sandbox throughput and latency: ihgrpo's pool vs what the public release did.

Baseline (the release): a fresh `python3` per call, with the trajectory's namespace
round-tripped through pickle (loaded before the cell, saved after it, unpickled by the caller),
and only a time limit: no isolation at all.

ihgrpo: persistent interpreters in bubblewrap namespaces with rlimits (isolation on), one per
session, warm interpreters started in the background.

Both run the same fixed cell mix per session (trivial cells, a numeric loop, a sympy import,
state reused across cells) over the same number of threads. Two views of ihgrpo:
  steady: sessions already have an interpreter (what each turn after the first sees);
  cold:   every session is new, so its interpreter's start is part of the measured time.

New sessions (what an RL step pays: every trajectory is a new session), measured first:
  burst:  64 new sessions' first cells, submitted at once (isolation on, --threads workers),
          vs 64 fresh bare `python -S` runs of the same cell one after another (no isolation);
  one at a time: first-cell latency of new sessions, p50 and p99, each session then ended;
          arriving --gap-ms apart (the pool has its warm interpreters ready), and back to back
          (a new session the moment the last one ended: a throughput bound, CPU-bound here).

    python bench/sandbox.py [--sessions 16] [--threads 2] [--new-sessions 64] [--gap-ms 20] [--only-new]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from ihgrpo.sandbox import SandboxPool

CELL_MIX = [
    ("trivial", "x = 12345"),
    ("trivial", "y = x * 2\ny"),
    ("numeric", "total = sum(i * i for i in range(20000))\nprint(total)"),
    ("sympy", "import sympy\nprint(sympy.factorint(2**32 + 1))"),
    ("state", "print(total % 97, y)"),
    ("trivial", "z = [t * t for t in range(1000)]"),
    ("state", "import sympy\nsympy.isprime(total)"),
    ("trivial", "len(z)"),
]

BASELINE_RUNNER = r"""
import ast, io, pickle, sys, contextlib
path, code = sys.argv[1], sys.stdin.read()
with open(path, "rb") as f:
    ns = pickle.load(f)
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        tree = ast.parse(code)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), ns)
        if last is not None:
            v = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns)
            if v is not None:
                print(repr(v))
    except Exception as e:
        print(type(e).__name__, e)
keep = {}
for k, v in ns.items():
    if k.startswith("__"):
        continue
    try:
        pickle.dumps(v)
        keep[k] = v
    except Exception:
        pass
with open(path, "wb") as f:
    pickle.dump(keep, f)
sys.stdout.write(out.getvalue())
"""


class Baseline:
    """A fresh interpreter per call; the namespace lives in a pickle file between calls."""

    def __init__(self, timeout_s: float = 10.0):
        self.dir = tempfile.mkdtemp(prefix="ihgrpo-bench-")
        self.timeout_s = timeout_s

    def execute(self, session: str, code: str) -> str:
        path = os.path.join(self.dir, session + ".pkl")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                pickle.dump({}, f)
        out = subprocess.run([sys.executable, "-c", BASELINE_RUNNER, path], input=code,
                             capture_output=True, text=True, timeout=self.timeout_s)
        with open(path, "rb") as f:
            pickle.load(f)  # the release loaded the namespace back in the caller (the defect)
        return out.stdout


def run_mix(execute, sessions: list[str], threads: int) -> tuple[float, dict[str, list[float]], list[str]]:
    """Each session runs the mix in order; sessions run concurrently. Returns (wall, latencies, outputs)."""
    lat: dict[str, list[float]] = {}
    outputs: list[str] = []

    def one(session: str) -> list[tuple[str, float, str]]:
        rows = []
        for kind, code in CELL_MIX:
            t0 = time.perf_counter()
            out = execute(session, code)
            rows.append((kind, time.perf_counter() - t0, out))
        return rows

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for rows in ex.map(one, sessions):
            for kind, dt, out in rows:
                lat.setdefault(kind, []).append(dt)
            outputs.append("".join(o for _, _, o in rows))
    return time.perf_counter() - start, lat, outputs


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(name: str, wall: float, lat: dict[str, list[float]]) -> dict:
    n = sum(len(v) for v in lat.values())
    allv = [x for v in lat.values() for x in v]
    row = {"name": name, "cells": n, "cells_per_s": n / wall,
           "p50_ms": 1000 * statistics.median(allv), "p99_ms": 1000 * pct(allv, 0.99),
           "trivial_p50_ms": 1000 * statistics.median(lat["trivial"]),
           "trivial_p99_ms": 1000 * pct(lat["trivial"], 0.99)}
    print(f"{name:<26} {n:>6} {row['cells_per_s']:>9.1f} {row['p50_ms']:>8.2f} {row['p99_ms']:>9.2f}"
          f" {row['trivial_p50_ms']:>11.2f} {row['trivial_p99_ms']:>11.2f}")
    return row


FIRST_CELL = "x = 6 * 7\nprint(x)"


def new_sessions(threads: int, n: int, latency_n: int, gap_s: float) -> None:
    """New sessions' first cells: a concurrent burst vs bare interpreters, and one at a time."""
    start = time.perf_counter()
    for _ in range(n):
        out = subprocess.run([sys.executable, "-S", "-c", FIRST_CELL], capture_output=True, text=True, check=True)
    bare = time.perf_counter() - start
    assert out.stdout == "42\n"

    async def burst(pool: SandboxPool, tag: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(pool.execute(f"{tag}{i}", FIRST_CELL) for i in range(n)))
        first = time.perf_counter() - t0
        assert all(r.ok and r.stdout == "42\n" for r in res), res[0]
        t0 = time.perf_counter()
        await asyncio.gather(*(pool.end_session(f"{tag}{i}") for i in range(n)))
        return first, time.perf_counter() - t0

    with SandboxPool(max_workers=threads, timeout_s=10) as pool:
        pool.execute_sync("warmup", "1")  # the pool is made once per run; its start is not a session's
        pool.end_session_sync("warmup")
        time.sleep(1)
        first, end = asyncio.run(burst(pool, "burst"))
        lat: dict[float, list[float]] = {}
        for gap in (gap_s, 0.0):
            time.sleep(1)
            lat[gap] = []
            for i in range(latency_n):
                time.sleep(gap)
                t0 = time.perf_counter()
                r = pool.execute_sync(f"one{gap}-{i}", FIRST_CELL)
                lat[gap].append(time.perf_counter() - t0)
                assert r.stdout == "42\n", r
                pool.end_session_sync(f"one{gap}-{i}")
        isolation, stats = pool.isolation, dict(pool.stats)
    print(f"new sessions (isolation: {isolation}; {threads} workers; {os.cpu_count()} CPUs; load "
          f"{os.getloadavg()[0]:.1f}; pool stats {stats})")
    print(f"  {n} bare `python -S` runs, one after another: {bare:.3f} s")
    print(f"  {n} new sessions' first cells, concurrent:    {first:.3f} s  (ending them: {end:.3f} s)")
    print(f"  ratio new sessions / bare interpreters: {first / bare:.2f}x (target <= 0.5x)")
    for gap, how in ((gap_s, f"{1000 * gap_s:g} ms apart"), (0.0, "back to back")):
        p50, p99 = 1000 * statistics.median(lat[gap]), 1000 * pct(lat[gap], 0.99)
        print(f"  new-session first cell, one at a time, {how} ({latency_n}): p50 {p50:.2f} ms "
              f"(target <= 5 ms), p99 {p99:.2f} ms (target <= 30 ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-sessions", type=int, default=6, help="the baseline is slow: fewer sessions")
    ap.add_argument("--new-sessions", type=int, default=64, help="sessions in the new-session burst")
    ap.add_argument("--latency-sessions", type=int, default=200, help="new sessions timed one at a time")
    ap.add_argument("--gap-ms", type=float, default=20.0, help="pause before each of them")
    ap.add_argument("--only-new", action="store_true", help="only the new-session measurements")
    args = ap.parse_args()

    new_sessions(args.threads, args.new_sessions, args.latency_sessions, args.gap_ms / 1000)
    if args.only_new:
        return
    print()

    print(f"cell mix: {len(CELL_MIX)} cells per session; {args.threads} threads; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    header = f"{'variant':<26} {'cells':>6} {'cells/s':>9} {'p50 ms':>8} {'p99 ms':>9} {'trivial p50':>11} {'trivial p99':>11}"

    base = Baseline()
    sess = [f"b{i}" for i in range(args.baseline_sessions)]
    wall_b, lat_b, out_b = run_mix(base.execute, sess, args.threads)

    with SandboxPool(max_workers=args.threads, timeout_s=10, preload=("sympy",),
                     warm=args.threads) as pool:
        print(f"isolation: {pool.isolation}")
        # steady state: every session already has its interpreter
        steady = [f"s{i}" for i in range(args.sessions)]
        for s in steady:
            pool.execute_sync(s, "pass")
        wall_s, lat_s, out_s = run_mix(lambda s, c: pool.execute_sync(s, c).stdout, steady, args.threads)
        for s in steady:
            pool.end_session_sync(s)
        time.sleep(2)  # let the warm interpreters refill
        cold = [f"c{i}" for i in range(args.sessions)]
        wall_c, lat_c, out_c = run_mix(lambda s, c: pool.execute_sync(s, c).stdout, cold, args.threads)

    assert out_s[0] == out_c[0] == out_b[0], (out_s[0], out_b[0])  # same work, same answers
    print(header)
    b = report("baseline (fresh+pickle)", wall_b, lat_b)
    s = report("ihgrpo steady (isolated)", wall_s, lat_s)
    c = report("ihgrpo cold (isolated)", wall_c, lat_c)
    print()
    print(f"cells/s ratio, steady vs baseline: {s['cells_per_s'] / b['cells_per_s']:.1f}x (target >= 20x)")
    print(f"cells/s ratio, cold   vs baseline: {c['cells_per_s'] / b['cells_per_s']:.1f}x")
    print(f"trivial-cell p50, steady: {s['trivial_p50_ms']:.2f} ms (target <= 5 ms); "
          f"baseline {b['trivial_p50_ms']:.1f} ms")


if __name__ == "__main__":
    main()
