"""Scores and statistics of samples (SPEC section 5): avg@k, pass@k, delay-call rate, ... Pure Python."""

from __future__ import annotations

__all__ = ["score_samples", "sample_stats", "benchmark_metrics"]


def score_samples(correct: dict[int, list[bool]]) -> tuple[float, float]:
    """(avg@k, pass@k) from each problem's per-sample correctness.

    avg@k is the mean correctness over all samples (= the mean over problems of each problem's
    accuracy when every problem has k samples); pass@k is the fraction of problems with at
    least one correct sample among its k.
    """
    if not correct:
        return 0.0, 0.0
    flat = [bool(c) for cs in correct.values() for c in cs]
    avg = sum(flat) / len(flat) if flat else 0.0
    passed = sum(any(cs) for cs in correct.values()) / len(correct)
    return avg, passed


def sample_stats(traj) -> dict:
    """Per-sample statistics (the terms of batch_stats, before averaging)."""
    execs = [r for r in traj.turns if r.code is not None]
    blocks = sum(r.blocks_run for r in execs)
    model_tokens = sum(traj.mask)
    return {
        "turns": len(traj.turns),
        "tool_calls": len(execs),
        "blocks_run": blocks,
        "deferred_blocks": sum(r.blocks_run - 1 for r in execs),
        "code_errors": sum(not r.ok for r in execs),
        "exec_timeouts": sum(bool(r.timed_out) for r in execs),
        "truncated": bool(traj.truncated),
        "void": bool(traj.void),
        "response_tokens": model_tokens,
        "observation_tokens": len(traj.response_ids) - model_tokens,
        "finish": traj.turns[-1].end.value if traj.turns else None,
    }


def benchmark_metrics(records: list[dict], n_problems: int, k: int) -> dict:
    """SPEC section 5 metrics of one benchmark from its ledger records (n_problems * k of them)."""
    correct: dict[int, list[bool]] = {}
    for r in records:
        correct.setdefault(int(r["problem"]), []).append(bool(r["correct"]))
    avg, passed = score_samples(correct)
    n = max(1, len(records))
    st = [r.get("stats", {}) for r in records]
    calls = sum(s.get("tool_calls", 0) for s in st)
    blocks = sum(s.get("blocks_run", 0) for s in st)
    return {
        "avg@k": avg,
        "pass@k": passed,
        "k": k,
        "n_problems": n_problems,
        "n_samples": len(records),
        "accuracy": avg,
        "delay_call_rate": sum(s.get("deferred_blocks", 0) for s in st) / blocks if blocks else 0.0,
        "tool_calls_per_trajectory": calls / n,
        "code_using_fraction": sum(s.get("tool_calls", 0) > 0 for s in st) / n,
        "code_error_rate": sum(s.get("code_errors", 0) for s in st) / calls if calls else 0.0,
        "truncated_fraction": sum(bool(s.get("truncated")) for s in st) / n,
        "void_fraction": sum(bool(s.get("void")) for s in st) / n,
        "turns_per_trajectory": sum(s.get("turns", 0) for s in st) / n,
        "mean_response_tokens": sum(s.get("response_tokens", 0) for s in st) / n,
    }
