"""Answer reward (SPEC section 3): 1.0 when the final answer is mathematically equal to the gold, else 0.0.

Equality is decided by HF ``math-verify``. Its own time limit uses ``signal.alarm``: main thread
only, whole seconds, and no signal handler runs while a computation is stuck inside C code. So it
is disabled (``parsing_timeout=None``, ``timeout_seconds=None``) and the limit is enforced here:

* ``mode="process"`` (default): a pool of persistent worker processes, this very file run as a
  script, spoken to with JSON lines over pipes. Only plain strings and status words cross, nothing
  is unpickled. Each call has a wall-clock deadline: a worker first interrupts itself (SIGALRM,
  it runs in its own main thread), and one that does not answer ``kill_grace_s`` later is killed
  and replaced. Either way the reward is 0.0 and the time-out is counted in ``stats``. Works from
  any thread. Workers also run under memory and per-request CPU limits.
* ``mode="inline"``: in-process, for the main thread only (SIGALRM again); no process start-up
  cost, but a computation stuck in C code is not interrupted.

Answers are wrapped as ``$answer$`` and golds as ``$gold$`` before parsing: of ``$...$`` and
``\\boxed{...}``, both parse every benchmark gold alike, and ``$...$`` also accepts a trailing
period (``5.``) that ``\\boxed{}`` rejects. What math-verify accepts, from the tests: ``0.5`` =
``\\frac12``, ``27`` = ``27.0``, ``\\dfrac`` = ``\\frac``, intervals compare their brackets,
``(3, \\pi/2)`` = ``\\left( 3, \\frac{\\pi}{2} \\right)``, ``x=5`` = ``5``, and text units are
dropped (``10\\text{ cm}`` = ``10``; ``\\$10`` = ``10``; ``10\\%`` = ``10``).

POSIX only (poll on pipes, setitimer, resource limits).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Iterator, Literal, Sequence

__all__ = ["RewardVerifier", "extract_answer", "math_equal", "compute_reward"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the comparison

class _Timeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that math-verify's broad
    ``except Exception`` handlers let it through instead of carrying on with the next candidate."""


class _DropDisabledTimeoutWarning(logging.Filter):
    # math-verify warns once that its timeout is disabled; here that is on purpose.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    # Imported lazily: the parent of a process pool never needs it (about 0.5 s of imports).
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    return math_verify


def _parse(latex: str) -> list:
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    # "$...$" puts bare LaTeX (the gold, or a boxed answer's content) in a math environment,
    # which LatexExtractionConfig requires; ExprExtractionConfig also catches plain "1/2".
    return mv.parse(f"${latex}$", extraction_config=config, parsing_timeout=None)


@lru_cache(maxsize=1024)
def _parse_gold(gold: str) -> list:
    # A group's G rollouts share one gold: parse it once. Golds are trusted data, answers are not
    # cached (and sympy objects are never mutated by verify).
    return _parse(gold)


def _math_equal_core(answer: str, gold: str) -> bool:
    """math-verify with its own (signal-based) time limits off; the caller bounds the time."""
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    # Order matters: math-verify's verify is not symmetric, the gold comes first.
    return bool(_math_verify().verify(gold_parsed, _parse(answer), timeout_seconds=None))


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise _Timeout in this (main) thread after ``seconds`` of wall-clock time."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("signal-based time limits only work in the main thread")

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout()

    start, previous_timer = time.monotonic(), 0.0
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer > 0:  # give a caller's own pending timer back, minus the time we used
            signal.setitimer(signal.ITIMER_REAL, max(previous_timer - (time.monotonic() - start), 1e-3))


# ----------------------------------------------------------------------------- the worker process

def _worker_main(memory_limit_mb: int) -> None:
    """Serve requests, one JSON object per line on stdin, one answer per line on stdout:
    ``{"id", "answer", "gold", "timeout"}`` -> ``{"id", "status"}``, status one of
    ``equal``, ``not_equal``, ``timeout``, ``error``. Exits at end of input."""
    # The protocol gets a private copy of stdout; fd 1 becomes stderr so that a stray print in
    # a library cannot corrupt the answer stream.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the CPU limit below must not dump cores
    if memory_limit_mb > 0:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = memory_limit_mb * 2**20 if hard == resource.RLIM_INFINITY else min(memory_limit_mb * 2**20, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)  # unparsable answers are routine

    _math_equal_core("1", "1")  # warm up (imports, ANTLR parser) before saying we are ready
    out.write('{"ready": true}\n')

    for line in sys.stdin.buffer:
        request = json.loads(line)
        timeout = float(request["timeout"])
        # Backstop that needs neither the GIL nor the parent: the kernel kills this process
        # (SIGXCPU) if one request burns more CPU than its time limit plus slack. It covers a
        # computation stuck in C code even when the parent died without killing us.
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_limit = int(used.ru_utime + used.ru_stime + timeout) + 3
        if cpu_hard != resource.RLIM_INFINITY:
            cpu_limit = min(cpu_limit, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_hard))
        try:
            with _alarm(timeout):
                status = "equal" if _math_equal_core(request["answer"], request["gold"]) else "not_equal"
        except _Timeout:
            status = "timeout"
        except Exception:  # RecursionError, MemoryError, a parser bug: all mean "not verified"
            status = "error"
        out.write(json.dumps({"id": request["id"], "status": status}) + "\n")


class _WorkerGone(Exception):
    """The worker died, or wrote something that is not a valid answer."""


class _Worker:
    """One worker process and its pipes. Used by one thread at a time."""

    def __init__(self, memory_limit_mb: int | None) -> None:
        # -P: do not put this file's folder (src/ihgrpo) on sys.path, where a module named
        # like a stdlib one would shadow it. The worker needs math-verify, not the ihgrpo package.
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", str(memory_limit_mb or 0)]
        # New session: a Ctrl-C in the terminal reaches the trainer, which then closes the
        # pool, rather than killing the workers under it mid-request.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)
        self._buf = b""
        self._ready = False
        self._next_id = 0
        self.busy = False  # checked out by a thread, which then owns the pipes

    def _readline(self, deadline: float) -> bytes | None:
        """One line from the worker, None if the deadline passes first."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # poll, not select: trainer processes can hold fds above 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not poller.poll(remaining * 1000):
                    return None
                chunk = os.read(fd, 65536)
            except OSError as e:
                raise _WorkerGone(str(e)) from None
            if not chunk:
                raise _WorkerGone("worker closed its output")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def wait_ready(self, timeout: float) -> None:
        if self._ready:
            return
        try:
            line = self._readline(time.monotonic() + timeout)
        except _WorkerGone:
            line = None
        if line != b'{"ready": true}':
            raise RuntimeError(f"reward worker (pid {self.proc.pid}) did not start within {timeout:.0f} s; "
                               "is math-verify installed for this interpreter? (its stderr is above)")
        self._ready = True

    def request(self, answer: str, gold: str, soft_timeout: float, deadline: float) -> str | None:
        """The worker's status word, or None when it missed the deadline."""
        self._next_id += 1
        message = json.dumps({"id": self._next_id, "answer": answer, "gold": gold, "timeout": soft_timeout})
        try:
            self.proc.stdin.write(message.encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:  # BrokenPipeError: it died; ValueError: pipe closed
            raise _WorkerGone(str(e)) from None
        line = self._readline(deadline)
        if line is None:
            return None
        try:
            reply = json.loads(line)  # plain JSON only; the worker never echoes the answer back
            ok = isinstance(reply, dict) and reply.get("id") == self._next_id
        except ValueError:
            ok = False
        if not ok or reply.get("status") not in ("equal", "not_equal", "timeout", "error"):
            raise _WorkerGone("malformed reply")
        return reply["status"]

    def kill(self, close_pipes: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()  # reap: no zombie left behind
        if close_pipes:
            for pipe in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()


def _kill_all(workers: set[_Worker]) -> None:
    # Module-level and given only the set (not the verifier), so that weakref.finalize can run it
    # at garbage collection or interpreter exit without keeping the verifier alive.
    for worker in list(workers):
        # A busy worker's thread is reading its pipe: it sees end-of-file and closes the pipes
        # itself; closing them here could hand their fd numbers to another file under its feet.
        worker.kill(close_pipes=not worker.busy)
        workers.discard(worker)


# ----------------------------------------------------------------------------- the verifier

def _default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class RewardVerifier:
    """Time-limited math-verify equality with 0/1 rewards; safe to call from any thread.

    >>> with RewardVerifier(num_workers=2, timeout_s=5.0) as v:
    ...     v.verify_batch([r"\\frac{1}{2}", "3", None], ["0.5", "4", "1"])
    [1.0, 0.0, 0.0]

    ``verify``/``verify_batch`` take extracted answers (the content of the last ``\\boxed{}``);
    ``reward``/``reward_batch`` take the model's full text and extract it. A missing or empty
    answer, or one longer than ``max_answer_chars`` (real answers are short; math-verify on a
    20,000-character sum takes seconds), is 0.0 without touching a worker.

    ``timeout_s`` bounds one comparison; a hung worker is killed ``kill_grace_s`` after that.
    ``memory_limit_mb`` caps each worker's address space (0 or None: no cap). ``stats`` counts
    what happened.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        *,
        mode: Literal["process", "inline"] = "process",
        kill_grace_s: float = 1.0,
        startup_timeout_s: float = 60.0,
        max_answer_chars: int | None = 1000,
        memory_limit_mb: int | None = 4096,
    ) -> None:
        if mode not in ("process", "inline"):
            raise ValueError(f"mode must be 'process' or 'inline', not {mode!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_answer_chars = max_answer_chars
        self.memory_limit_mb = memory_limit_mb
        self.num_workers = 0 if mode == "inline" else (num_workers or _default_num_workers())
        self._closed = False
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("calls", "equal", "skipped", "timeouts", "killed", "crashed", "errors"), 0)
        self._workers: set[_Worker] = set()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)  # also runs at exit
        for _ in range(self.num_workers):  # start them all now: their imports run in parallel
            self._idle.put(self._spawn())
        if mode == "inline":
            # Import and warm up now: not under a time limit, and never interrupted mid-import.
            _math_equal_core("1", "1")

    # -- public API
    def verify(self, answer: str | None, gold: str, timeout_s: float | None = None) -> float:
        """1.0 if ``answer`` (already extracted) equals ``gold`` mathematically, else 0.0."""
        if self._closed:
            raise RuntimeError("RewardVerifier is closed")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if timeout <= 0:
            raise ValueError("timeout_s must be > 0")
        self._count("calls")
        if (not isinstance(answer, str) or not answer.strip() or not isinstance(gold, str) or not gold.strip()
                or (self.max_answer_chars is not None and len(answer) > self.max_answer_chars)):
            self._count("skipped")
            return 0.0
        if self.mode == "inline":
            equal = self._verify_inline(answer, gold, timeout)
        else:
            equal = self._verify_in_worker(answer, gold, timeout)
        if equal:
            self._count("equal")
        return 1.0 if equal else 0.0

    def verify_batch(self, answers: Sequence[str | None], golds: Sequence[str],
                     timeout_s: float | None = None) -> list[float]:
        """Rewards for aligned answers and golds, in order, spread over the worker pool."""
        if len(answers) != len(golds):
            raise ValueError(f"{len(answers)} answers but {len(golds)} golds")
        if self.mode == "inline" or self.num_workers == 1 or len(answers) <= 1:
            return [self.verify(a, g, timeout_s) for a, g in zip(answers, golds)]
        # Threads only wait on pipes; the work happens in the worker processes.
        with ThreadPoolExecutor(max_workers=min(self.num_workers, len(answers)),
                                thread_name_prefix="reward") as pool:
            return list(pool.map(lambda ag: self.verify(ag[0], ag[1], timeout_s), zip(answers, golds)))

    def reward(self, model_text: str | None, gold: str) -> float:
        """Reward of a full model text: its last ``\\boxed{}`` against ``gold``."""
        return self.verify(extract_answer(model_text), gold)

    def reward_batch(self, model_texts: Sequence[str | None], golds: Sequence[str]) -> list[float]:
        return self.verify_batch([extract_answer(t) for t in model_texts], golds)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: calls, equal, skipped (no/empty/too long answer), timeouts (all of them),
        killed (timeouts that needed a kill), crashed (worker died), errors (exception in the
        comparison)."""
        with self._lock:
            return dict(self._stats)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [w.proc.pid for w in list(self._workers) if w.proc.poll() is None]

    def close(self) -> None:
        """Kill every worker (idempotent). Calls still in flight return 0.0."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> RewardVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals
    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_limit_mb)
        self._workers.add(worker)
        return worker

    def _verify_inline(self, answer: str, gold: str, timeout: float) -> bool:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("RewardVerifier(mode='inline') times out with SIGALRM, which only works in "
                               "the main thread; use mode='process' (the default) from other threads")
        try:
            with _alarm(timeout):
                return _math_equal_core(answer, gold)
        except _Timeout:
            self._count("timeouts")
        except Exception:
            log.debug("math-verify failed", exc_info=True)
            self._count("errors")
        return False

    def _checkout(self) -> _Worker:
        while not self._closed:
            try:
                worker = self._idle.get(timeout=0.2)  # short waits so that close() is noticed
            except queue.Empty:
                continue
            worker.busy = True
            if self._closed:  # close() ran while we were taking it
                worker.kill()
                break
            return worker
        raise RuntimeError("RewardVerifier is closed")

    def _checkin(self, worker: _Worker) -> None:
        worker.busy = False
        self._idle.put(worker)

    def _verify_in_worker(self, answer: str, gold: str, timeout: float) -> bool:
        worker = self._checkout()
        status: str | None = "crashed"
        try:
            # Start-up time is not the comparison's: wait for readiness before the clock starts.
            worker.wait_ready(self.startup_timeout_s)
            status = worker.request(answer, gold, timeout, time.monotonic() + timeout + self.kill_grace_s)
        except _WorkerGone:
            status = "crashed"
        except BaseException:
            # Start-up failure or an interrupt mid-request: the worker's state is unknown.
            self._replace(worker)
            if self._closed:  # close() killed it while it was starting
                return False
            raise
        if status in ("equal", "not_equal", "error"):
            self._checkin(worker)
            if status == "error":
                self._count("errors")
            return status == "equal"
        if status == "timeout":  # it interrupted itself and is ready for more
            self._count("timeouts")
            self._checkin(worker)
            return False
        if status is None:
            self._count("timeouts")
            self._count("killed")
            log.warning("reward worker missed its %.1f s deadline; killed and replaced", timeout)
        elif not self._closed:
            self._count("crashed")
            log.warning("reward worker (pid %d) died; replaced", worker.proc.pid)
        self._replace(worker)
        return False

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            if self._closed:
                return
            # Spawning returns at once; the new worker imports in the background and the next
            # caller waits for it to be ready.
            self._idle.put(self._spawn())


# ----------------------------------------------------------------------------- functions

def extract_answer(model_text: str | None) -> str | None:
    """The content of the last ``\\boxed{}`` of the model's text, None if there is none."""
    if not model_text:
        return None
    # Imported here, not at the top: the worker runs this file as a script and must not need
    # the ihgrpo package.
    from ihgrpo.protocol import extract_boxed

    return extract_boxed(model_text)


_default: RewardVerifier | None = None
_default_lock = threading.Lock()


def _default_verifier() -> RewardVerifier:
    global _default
    with _default_lock:
        if _default is None:
            _default = RewardVerifier(num_workers=2)  # killed at exit by its finalizer
        return _default


def math_equal(answer: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether an extracted answer equals the gold, with a time limit. Uses a shared 2-worker
    process pool, started on first use (about a second) and killed at exit."""
    return _default_verifier().verify(answer, gold, timeout_s=timeout_s) == 1.0


def compute_reward(model_text: str | None, gold: str, timeout_s: float = 5.0) -> float:
    """1.0 if the last ``\\boxed{}`` of ``model_text`` equals ``gold``, else 0.0 (shared pool)."""
    return _default_verifier().verify(extract_answer(model_text), gold, timeout_s=timeout_s)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(int(sys.argv[2]))
