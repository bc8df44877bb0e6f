"""Tests for ihgrpo.rewards: math-verify equality with a time limit, in worker processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ihgrpo.rewards import RewardVerifier, compute_reward, extract_answer, math_equal

TIMEOUT_S = 2.0
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def verifier():
    with RewardVerifier(num_workers=2, timeout_s=TIMEOUT_S) as v:
        yield v


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _warm(v: RewardVerifier) -> None:
    """Make sure every worker has started, so that a timed call measures the comparison only.
    The idle queue is FIFO, so n calls in a row visit all n workers."""
    for _ in range(v.num_workers):
        assert v.verify("1", "1") == 1.0


# ----------------------------------------------------------------------------- equality

EQUAL = [
    (r"0.5", r"\frac{1}{2}"),
    (r"\frac{1}{2}", r"0.5"),
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    (r"\left(1,2\right]", r"(1, 2]"),
    (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"27", r"27.0"),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
    (r"-3", r"-3"),
    (r"204", r"204"),
    (r"(-\infty, 3)", r"(-\infty,3)"),
    (r"x^2+2x+1", r"(x+1)^2"),
    (r"1,2,3", r"1, 2, 3"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"5.", r"5"),  # a trailing period: why answers are wrapped in $...$ rather than \boxed{}
    # What math-verify does with text units: they are dropped, on either side.
    (r"10\text{ cm}", r"10"),
    (r"10", r"10\text{ cm}"),
    (r"\$10", r"10"),
    (r"10\%", r"10"),
    # ...and "x = 5" counts as the value 5.
    (r"x=5", r"5"),
]

NOT_EQUAL = [
    (r"[1,2]", r"(1, 2]"),  # wrong bracket
    (r"(1,2)", r"(1, 2]"),
    (r"(3, \pi)", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"-5", r"5"),  # sign
    (r"6", r"5"),
    (r"0.3333", r"\frac{1}{3}"),  # rounding, not approximation
    (r"\frac{1}{3}", r"0.5"),
    (r"2", r"\pm 2"),
]


@pytest.mark.parametrize(("answer", "gold"), EQUAL)
def test_equal_pairs(verifier, answer, gold):
    assert verifier.verify(answer, gold) == 1.0


@pytest.mark.parametrize(("answer", "gold"), NOT_EQUAL)
def test_not_equal_pairs(verifier, answer, gold):
    assert verifier.verify(answer, gold) == 0.0


@pytest.mark.parametrize("answer", [None, "", "   "])
def test_missing_answer_is_zero(verifier, answer):
    assert verifier.verify(answer, "5") == 0.0
    assert verifier.reward(answer, "5") == 0.0


def test_full_text_entry_point(verifier):
    text = r"First \boxed{3}, but then I recheck: the answer is $\boxed{\dfrac{1}{2}}$."
    assert extract_answer(text) == r"\dfrac{1}{2}"
    assert verifier.reward(text, "0.5") == 1.0
    assert verifier.reward(text, "3") == 0.0  # only the last \boxed counts
    assert verifier.reward("no answer here", "3") == 0.0
    # An unterminated \boxed{ is skipped, not read to the end of the text.
    assert verifier.reward(r"\boxed{3} and finally \boxed{\frac{1}{2", "3") == 1.0
    assert extract_answer(r"\boxed{") is None
    assert verifier.reward_batch([r"\boxed{4}", r"\boxed{", None], ["4", "4", "4"]) == [1.0, 0.0, 0.0]


def test_module_functions():
    assert math_equal(r"\frac{1}{2}", "0.5") is True
    assert math_equal("2", "3", timeout_s=1.0) is False
    assert compute_reward(r"so the answer is \boxed{27}", "27.0") == 1.0
    assert compute_reward(r"so the answer is \boxed{28}", "27.0") == 0.0
    assert compute_reward(None, "27.0") == 0.0


# ----------------------------------------------------------------------------- hostile input

@pytest.mark.parametrize("answer", [
    r"\frac{" * 100 + "1" + "}{2}" * 100,  # deeply nested (under the length cap)
    "{" * 400 + "1" + "}" * 400,
    r"9^{9^{9^{9}}}",  # sympy tries to compute the integer
    r"\boxed{",
    "}}}{{{\\\\$$$&&&^^^___",
    "\x00\udcff\u202e",  # NUL, lone surrogate, bidi override: must survive JSON and the worker
])
def test_hostile_answers_are_zero_within_the_limit(verifier, answer):
    _warm(verifier)
    start = time.monotonic()
    assert verifier.verify(answer, "5", timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 1.0 + verifier.kill_grace_s + 1.0
    assert verifier.verify("5", "5") == 1.0  # the pool keeps serving


def test_pathological_expression_times_out_and_pool_keeps_serving(verifier):
    _warm(verifier)
    before = verifier.stats["timeouts"]
    start = time.monotonic()
    assert verifier.verify(r"9^{9^{9^{9}}}", "387420489", timeout_s=1.0) == 0.0
    assert 0.9 < time.monotonic() - start < 1.0 + verifier.kill_grace_s + 1.0
    assert verifier.stats["timeouts"] == before + 1
    assert verifier.verify_batch(["1", "2", "3"], ["1", "2", "4"]) == [1.0, 1.0, 0.0]


def test_too_long_answer_is_skipped_and_uncapped_one_is_time_limited():
    long_answer = "+".join(["1"] * 20000)  # math-verify needs seconds for this
    with RewardVerifier(num_workers=1, timeout_s=1.0) as capped:
        start = time.monotonic()
        assert capped.verify(long_answer, "20000") == 0.0
        assert time.monotonic() - start < 0.1
        assert capped.stats["skipped"] == 1
    with RewardVerifier(num_workers=1, timeout_s=1.0, max_answer_chars=None) as uncapped:
        _warm(uncapped)
        start = time.monotonic()
        assert uncapped.verify(long_answer, "20000") == 0.0
        assert time.monotonic() - start < 1.0 + uncapped.kill_grace_s + 1.0
        assert uncapped.stats["timeouts"] == 1


def test_unresponsive_worker_is_killed_and_replaced():
    # A stopped process can neither answer nor interrupt itself: the same as one stuck in C code.
    with RewardVerifier(num_workers=1, timeout_s=0.5, kill_grace_s=0.5) as v:
        _warm(v)
        [pid] = v.worker_pids
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        assert v.verify("2", "2") == 0.0
        assert time.monotonic() - start < 2.0
        assert not _alive(pid)  # killed and reaped
        assert v.stats["killed"] == 1 and v.stats["timeouts"] == 1
        assert v.verify("2", "2") == 1.0
        assert v.worker_pids and v.worker_pids != [pid]


def test_dead_worker_is_replaced():
    with RewardVerifier(num_workers=1, timeout_s=2.0) as v:
        assert v.verify("1", "1") == 1.0
        [pid] = v.worker_pids
        os.kill(pid, signal.SIGKILL)
        assert v.verify("1", "1") == 0.0  # the request meets a dead worker
        assert v.stats["crashed"] == 1
        assert v.verify("1", "1") == 1.0


# ----------------------------------------------------------------------------- batch, threads

def test_verify_batch_keeps_order(verifier):
    n = 40
    answers = [str(i) if i % 3 else str(i + 1) for i in range(n)]
    golds = [str(i) for i in range(n)]
    expected = [1.0 if i % 3 else 0.0 for i in range(n)]
    # A slow item in the middle must not shift the others.
    answers[7], expected[7] = r"9^{9^{9^{9}}}", 0.0
    assert verifier.verify_batch(answers, golds, timeout_s=1.0) == expected
    assert verifier.verify_batch([], []) == []
    with pytest.raises(ValueError):
        verifier.verify_batch(["1"], [])


def test_works_from_a_non_main_thread(verifier):
    results: list = []
    worker = threading.Thread(target=lambda: results.append(
        (verifier.verify("0.5", r"\frac12"), verifier.verify_batch(["1", "2"], ["1", "3"]))))
    worker.start()
    worker.join(30)
    assert results == [(1.0, [1.0, 0.0])]


def test_inline_mode_main_thread_only():
    v = RewardVerifier(mode="inline", timeout_s=1.0)
    assert v.worker_pids == []
    assert v.verify_batch([r"\dfrac{1}{2}", "3"], ["0.5", "4"]) == [1.0, 0.0]

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        start = time.monotonic()
        assert v.verify(r"9^{9^{9^{9}}}", "1") == 0.0  # interrupted by its SIGALRM time limit
        assert time.monotonic() - start < 2.0
        assert v.stats["timeouts"] == 1
        assert signal.getsignal(signal.SIGALRM) is handler  # the caller's handler is given back
    finally:
        signal.signal(signal.SIGALRM, previous)

    errors: list = []

    def in_thread():
        try:
            v.verify("1", "1")
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(10)
    assert errors and "main thread" in errors[0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        RewardVerifier(mode="thread")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RewardVerifier(timeout_s=0)


# ----------------------------------------------------------------------------- lifecycle

def test_close_leaves_no_child_process():
    v = RewardVerifier(num_workers=2, timeout_s=2.0)
    assert v.verify_batch(["1", "2"], ["1", "2"]) == [1.0, 1.0]
    pids = v.worker_pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    v.close()
    v.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    assert v.worker_pids == []
    for pid in pids:  # reaped, not zombies: they are no longer our children at all
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    with pytest.raises(RuntimeError, match="closed"):
        v.verify("1", "1")


def test_close_with_a_call_in_flight():
    v = RewardVerifier(num_workers=1, timeout_s=30.0)
    _warm(v)
    pids = v.worker_pids
    results: list = []
    caller = threading.Thread(target=lambda: results.append(v.verify(r"9^{9^{9^{9}}}", "1")))
    caller.start()
    time.sleep(0.3)  # let the request reach the worker
    start = time.monotonic()
    v.close()
    caller.join(10)
    assert results == [0.0] and time.monotonic() - start < 5.0
    assert not any(_alive(p) for p in pids) and v.worker_pids == []


def test_garbage_collection_kills_workers():
    v = RewardVerifier(num_workers=1, timeout_s=2.0)
    pids = v.worker_pids
    del v  # the finalizer (also registered for interpreter exit) kills the pool
    import gc

    gc.collect()
    assert pids and not any(_alive(p) for p in pids)


# ----------------------------------------------------------------------------- real benchmark rows

def _golds(name: str, limit: int) -> list[str]:
    pq = pytest.importorskip("pyarrow.parquet")
    rows = pq.read_table(SHARED_DATA / "math" / name, columns=["reward_model"]).to_pylist()
    return [r["reward_model"]["ground_truth"] for r in rows[:limit]]


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "limit"), [("aime24.parquet", 30), ("math500.parquet", 60)])
def test_benchmark_golds(verifier, name, limit):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (the shared/ folder beside the repo)")
    golds = _golds(name, limit)
    assert verifier.verify_batch(golds, golds) == [1.0] * len(golds)
    # A wrong number: AIME answers are integers (off by one); MATH golds are never 987654321.
    wrong = [str(int(g) + 1) if g.strip().isdigit() else "987654321" for g in golds]
    assert verifier.verify_batch(wrong, golds) == [0.0] * len(golds)
    # The same answers as a model writes them.
    texts = [f"... so the final answer is $\\boxed{{{g}}}$." for g in golds[:10]]
    assert verifier.reward_batch(texts, golds[:10]) == [1.0] * len(texts)
