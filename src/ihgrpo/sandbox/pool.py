"""A pool of persistent, isolated Python interpreters: one per session (trajectory).

Each session's variables live in its own worker process, like a notebook kernel; they are never
serialized. Only JSON text crosses from a worker, and it is type-checked before use.

Threads, not asyncio, manage the processes: every blocking call runs on the pool's own
long-lived threads (an executor bounded by `max_workers`, plus one thread that keeps warm
interpreters ready). Workers are started only from those threads, because bwrap's
--die-with-parent follows the *thread* that started it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .isolation import (BASE_ENV, WORKER_PATH, SandboxUnavailable, bwrap_argv,
                        resolve_isolation)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one cell. `ok` is False when the cell raised, crashed, was killed or timed out."""

    stdout: str
    stderr: str
    ok: bool
    timed_out: bool = False
    state_lost: bool = False  # the session's interpreter was replaced before this cell ran
    crashed: bool = False  # the interpreter died during this cell (its state is lost)
    error: str = ""  # one line: the exception, time-out or crash description
    duration_s: float = 0.0


class SandboxError(RuntimeError):
    """Misuse of the pool (closed, bad arguments) or a worker that cannot be started."""


class _WorkerDied(Exception):
    pass


def _exit_description(code: int | None) -> str:
    if code is None:
        return "the interpreter stopped responding"
    sig = -code if code < 0 else code - 128 if code > 128 else 0  # bwrap reports 128 + signal
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the interpreter was killed by {name}"
    return f"the interpreter exited with code {code}"


class _Worker:
    """One interpreter process and its JSON-lines control pipe."""

    MAX_LINE = 16 << 20  # a response larger than this is a protocol violation

    def __init__(self, proc: subprocess.Popen, slot: int, workdir: str | None):
        self.proc = proc
        self.slot = slot
        self.workdir = workdir
        self._buf = bytearray()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise _WorkerDied(str(exc)) from None

    def read(self, deadline: float) -> dict | None:
        """The next JSON message, or None if the deadline passes first."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(left * 1000):
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _WorkerDied("control pipe closed")
            self._buf += chunk
            if len(self._buf) > self.MAX_LINE:
                raise _WorkerDied("oversized message from the interpreter")
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        try:
            msg = json.loads(line)
        except ValueError:
            raise _WorkerDied("malformed message from the interpreter") from None
        if not isinstance(msg, dict):
            raise _WorkerDied("malformed message from the interpreter")
        return msg

    def kill(self) -> int | None:
        """SIGKILL (the PID namespace takes everything inside with it) and reap."""
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
            code = None
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code


class _Session:
    __slots__ = ("lock", "worker", "lost", "last_used")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: _Worker | None = None
        self.lost = False
        self.last_used = time.monotonic()


class SandboxPool:
    """Persistent isolated interpreters, one per session, with bounded concurrency.

    >>> pool = SandboxPool(max_workers=4, timeout_s=3.0, memory_mb=1024)
    >>> pool.execute_sync("traj-0", "x = 2\\nprint(x)").stdout
    '2\\n'
    >>> pool.close()
    """

    def __init__(
        self,
        max_workers: int = 4,
        timeout_s: float = 3.0,
        memory_mb: int = 1024,
        *,
        isolation: str = "auto",
        warm: int | None = None,
        max_sessions: int = 512,
        max_output_bytes: int = 64 * 1024,
        max_processes: int = 64,
        max_file_mb: int = 64,
        max_open_files: int = 256,
        cpu_limit_s: int = 600,
        grace_s: float = 1.0,
        preload: tuple[str, ...] = (),
        python: str | None = None,
        uid_base: int | None = None,
        startup_timeout_s: float = 30.0,
    ):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
        self.max_workers = max_workers
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.max_sessions = max_sessions
        self.max_output_bytes = max_output_bytes
        self.grace_s = grace_s
        self.startup_timeout_s = startup_timeout_s
        self.python = python or sys.executable
        self.isolation = resolve_isolation(isolation, self.python)
        self.as_root = os.geteuid() == 0
        # As root, each interpreter gets its own uid: uid_base + slot. The default base is distinct
        # per process and per pool, so pools side by side on one machine never share a uid.
        self._uid_base = default_uid_base() if uid_base is None else uid_base
        self._settings = {
            "preload": list(preload),
            "rlimits": {
                "RLIMIT_AS": [memory_mb << 20, memory_mb << 20],
                "RLIMIT_NPROC": [max_processes, max_processes],
                "RLIMIT_FSIZE": [max_file_mb << 20, max_file_mb << 20],
                "RLIMIT_NOFILE": [max_open_files, max_open_files],
                "RLIMIT_CORE": [0, 0],
                "RLIMIT_CPU": [cpu_limit_s, cpu_limit_s + 1],
            },
        }
        self._tmpfs_bytes = max_file_mb << 20
        if self.isolation == "bwrap":
            self._argv = bwrap_argv(self.python, bwrap=shutil.which("bwrap"),
                                    as_root=self.as_root, tmpfs_bytes=self._tmpfs_bytes)

        self._lock = threading.Lock()
        self._idle_cv = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._idle: collections.deque[_Worker] = collections.deque()
        self._all: set[_Worker] = set()
        self._free_slots: list[int] = []
        self._next_slot = itertools.count()
        self._ids = itertools.count(1)
        self._closed = False
        self.stats = collections.Counter()

        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="ihgrpo-sandbox")
        self._warm = max_workers if warm is None else warm
        # Kill every worker even if close() is never called (garbage collection, interpreter exit).
        self._finalizer = weakref.finalize(self, _kill_all, self._all, self._lock)
        self._filler = threading.Thread(target=self._fill_loop, name="ihgrpo-sandbox-warm", daemon=True)
        self._filler.start()

    # ------------------------------------------------------------------ public API
    async def execute(self, session_id: str, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run `code` in the session's interpreter (created on first use)."""
        fut = self._submit(self._execute_blocking, session_id, code, timeout_s)
        return await asyncio.wrap_future(fut)

    def execute_sync(self, session_id: str, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Blocking form of `execute`."""
        return self._submit(self._execute_blocking, session_id, code, timeout_s).result()

    async def end_session(self, session_id: str) -> None:
        """Kill the session's interpreter and forget it."""
        await asyncio.wrap_future(self._submit(self._end_blocking, session_id))

    def end_session_sync(self, session_id: str) -> None:
        self._submit(self._end_blocking, session_id).result()

    @property
    def sessions(self) -> list[str]:
        with self._lock:
            return [s for s, v in self._sessions.items() if v.worker is not None]

    def worker_pids(self) -> list[int]:
        """Host PIDs of all live worker processes (for monitoring and tests)."""
        with self._lock:
            return [w.pid for w in self._all]

    def close(self) -> "_Closed":
        """Kill every interpreter and stop the pool's threads. Idempotent; may also be awaited."""
        with self._lock:
            if self._closed:
                return _Closed()
            self._closed = True
            self._idle_cv.notify_all()
        self._filler.join(timeout=30)
        _kill_all(self._all, self._lock)
        self._executor.shutdown(wait=True, cancel_futures=True)
        _kill_all(self._all, self._lock)  # anything started by a call that was already running
        self._finalizer.detach()
        return _Closed()

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "SandboxPool":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals
    def _submit(self, fn, *args):
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        try:
            return self._executor.submit(fn, *args)
        except RuntimeError:
            raise SandboxError("the sandbox pool is closed") from None

    def _execute_blocking(self, session_id: str, code: str, timeout_s: float | None) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be str, got {type(code).__name__}")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        sess = self._session(session_id)
        with sess.lock:
            state_lost = sess.lost
            if sess.worker is not None and not sess.worker.alive():
                self._discard(sess.worker)  # died between cells
                sess.worker, state_lost = None, True
            if sess.worker is None:
                self._make_room(sess)
                sess.worker = self._take_worker()
            sess.lost = False
            sess.last_used = time.monotonic()
            worker = sess.worker
            rid = next(self._ids)
            start = time.monotonic()
            failure = None
            try:
                worker.send({"id": rid, "code": code, "timeout": timeout,
                             "max_output": self.max_output_bytes})
                msg = worker.read(deadline=start + timeout + self.grace_s)
            except _WorkerDied as exc:
                msg, failure = None, str(exc)
            duration = time.monotonic() - start
            result = None if msg is None else _parse_result(msg, rid)
            if result is not None:
                self.stats["cells"] += 1
                return ExecResult(**result, state_lost=state_lost, duration_s=duration)

            # The interpreter is gone or unusable: replace it; its variables are lost.
            code_ = self._discard(worker)
            sess.worker, sess.lost = None, True
            if msg is None and failure is None:
                self.stats["hard_timeouts"] += 1
                error = (f"TimeoutError: execution exceeded the {timeout:g} s time limit; "
                         "the interpreter was stopped and its variables are lost")
                return ExecResult("", error + "\n", ok=False, timed_out=True, crashed=True,
                                  state_lost=state_lost, error=error, duration_s=duration)
            self.stats["crashes"] += 1
            reason = _exit_description(code_) if failure in (None, "control pipe closed") else failure
            error = f"InterpreterCrash: {reason}; its variables are lost"
            return ExecResult("", error + "\n", ok=False, crashed=True, state_lost=state_lost,
                              error=error, duration_s=duration)

    def _end_blocking(self, session_id: str) -> None:
        with self._lock:
            sess = self._sessions.pop(session_id, None)
        if sess is not None:
            with sess.lock:
                if sess.worker is not None:
                    self._discard(sess.worker)
                    sess.worker = None

    def _session(self, session_id: str) -> _Session:
        if not isinstance(session_id, str) or not session_id:
            raise SandboxError(f"session_id must be a non-empty str, got {session_id!r}")
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            sess = self._sessions.get(session_id)
            if sess is None:
                sess = self._sessions[session_id] = _Session()
        return sess

    def _make_room(self, needy: _Session) -> None:
        """Keep at most max_sessions live interpreters: evict the least recently used idle one."""
        with self._lock:
            live = [(s.last_used, sid, s) for sid, s in self._sessions.items() if s.worker is not None]
            if len(live) < self.max_sessions:
                return
            idle = [t for t in live if t[2] is not needy and not t[2].lock.locked()]
            if not idle:
                return
            _, sid, victim = min(idle, key=lambda t: t[0])
        self._evict(sid, victim)

    def _evict(self, sid: str, sess: _Session) -> None:
        if not sess.lock.acquire(blocking=False):
            return
        try:
            if sess.worker is not None:
                log.warning("sandbox: more than %d sessions; evicting %r (its variables are lost)",
                            self.max_sessions, sid)
                self._discard(sess.worker)
                sess.worker, sess.lost = None, True
                self.stats["evictions"] += 1
        finally:
            sess.lock.release()

    def _take_worker(self) -> _Worker:
        with self._lock:
            worker = self._idle.popleft() if self._idle else None
            self._idle_cv.notify_all()  # wake the filler to replace it
        while worker is not None and not worker.alive():
            self._discard(worker)
            with self._lock:
                worker = self._idle.popleft() if self._idle else None
        return worker if worker is not None else self._spawn()

    def _fill_loop(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while not self._closed and len(self._idle) >= self._warm:
                    self._idle_cv.wait(timeout=1.0)
                if self._closed:
                    return
            try:
                worker = self._spawn()
                failures = 0
            except Exception as exc:  # keep serving: calls spawn on demand and report errors
                failures += 1
                log.warning("sandbox: could not start a warm interpreter: %s", exc)
                time.sleep(min(5.0, 0.1 * 2 ** failures))
                continue
            with self._lock:
                if self._closed:
                    stale = worker
                else:
                    self._idle.append(worker)
                    stale = None
            if stale is not None:
                self._discard(stale)
                return

    def _spawn(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            slot = self._free_slots.pop() if self._free_slots else next(self._next_slot)
        if slot >= UIDS_PER_POOL:
            self._release_slot(slot)
            raise SandboxError(f"more than {UIDS_PER_POOL} interpreters alive at once; lower max_sessions")
        uid = self._uid_base + slot
        settings = dict(self._settings)
        workdir = None
        try:
            if self.isolation == "bwrap":
                if self.as_root:
                    settings["uid"] = settings["gid"] = uid
                argv = self._argv + [json.dumps(settings)]
                popen_kw: dict = {"env": {}}
            else:
                workdir = tempfile.mkdtemp(prefix="ihgrpo-sandbox-")
                settings.update(pdeathsig=True, ppid=os.getpid())
                argv = [self.python, "-I", str(WORKER_PATH), json.dumps(settings)]
                env = {**BASE_ENV, "HOME": workdir, "TMPDIR": workdir}
                popen_kw = {"env": env, "cwd": workdir}
                if self.as_root:  # never run hostile code as root: kill(-1) would reach everything
                    os.chown(workdir, uid, uid)
                    popen_kw.update(user=uid, group=uid, extra_groups=[])
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                    **popen_kw)
        except PermissionError as exc:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            self._release_slot(slot)
            raise SandboxUnavailable(
                f"cannot start {self.python} as an unprivileged uid ({exc.strerror}): without bubblewrap, "
                "model code never runs as root, so the interpreter must be readable by other users; "
                "install bubblewrap or pass python= an interpreter such as /usr/bin/python3") from None
        except Exception:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            self._release_slot(slot)
            raise
        worker = _Worker(proc, slot, workdir)
        with self._lock:
            self._all.add(worker)
        try:
            msg = worker.read(deadline=time.monotonic() + self.startup_timeout_s)
        except _WorkerDied:
            msg = None
        if not msg or not msg.get("ready"):
            worker.kill()
            try:
                err = proc.stderr.read(4000).decode(errors="replace").strip()
            except (OSError, ValueError):
                err = ""
            self._discard(worker)
            raise SandboxUnavailable(f"the sandbox interpreter failed to start ({self.isolation}): "
                                     f"{err.splitlines()[-1] if err else 'no output'}")
        proc.stderr.close()  # the worker has redirected its stderr: nothing more is written there
        self.stats["spawned"] += 1
        return worker

    def _release_slot(self, slot: int) -> None:
        with self._lock:
            self._free_slots.append(slot)

    def _discard(self, worker: _Worker) -> int | None:
        code = worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.discard(worker)
                self._free_slots.append(worker.slot)
        return code


UIDS_PER_POOL = 1000
UID_RANGE_START = 1_000_000
_pool_counter = itertools.count()


def process_uid_range(pid: int | None = None) -> tuple[int, int]:
    """[start, end) of the uids the pools of process `pid` hand out by default (as root)."""
    start = UID_RANGE_START + ((pid or os.getpid()) % 10_000) * 10 * UIDS_PER_POOL
    return start, start + 10 * UIDS_PER_POOL


def default_uid_base() -> int:
    return process_uid_range()[0] + (next(_pool_counter) % 10) * UIDS_PER_POOL


def _parse_result(msg: dict, rid: int) -> dict | None:
    """Type-check a worker's reply; None means the reply is not to be trusted."""
    if msg.get("id") != rid:
        return None
    fields = {"stdout": str, "stderr": str, "ok": bool, "timed_out": bool, "error": str}
    if not all(isinstance(msg.get(k), t) for k, t in fields.items()):
        return None
    return {k: msg[k] for k in fields}


def _kill_all(workers: set, lock: threading.Lock) -> None:
    with lock:
        victims = list(workers)
        workers.clear()
    for w in victims:
        w.kill()


class _Closed:
    """What close() returns, so that both `pool.close()` and `await pool.close()` work."""

    def __await__(self):
        return iter(())
