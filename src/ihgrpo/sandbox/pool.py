"""A pool of persistent, isolated Python interpreters: one per session (trajectory).

Each session's variables live in its own worker process, like a notebook kernel; they are never
serialized. Only JSON text crosses from a worker, and it is type-checked before use.

A new session's interpreter is forked by a zygote (zygote.py, launch.py) that has already
started Python and imported `preload`, so the first cell of a session costs milliseconds; as an
ordinary user with bubblewrap (no capabilities to make namespaces after a fork), each session
is its own bwrap process instead.

Threads, not asyncio, manage the processes: every blocking call runs on the pool's own
long-lived threads (an executor bounded by `max_workers`, plus one thread that keeps warm
interpreters ready). Processes are started only from those threads, because bwrap's
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

from .isolation import (BASE_ENV, BOOTSTRAP, SANDBOX_HOME, SandboxUnavailable, boot_message,
                        bwrap_argv, resolve_isolation, tmp_binds)
from .launch import Zygote, readable

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

    def __init__(self, proc, slot: int, workdir: str | None):  # a Popen or a launch.SessionProcess
        self.proc = proc
        self.slot = slot
        self.workdir = workdir
        self.started = time.monotonic()
        self.ready = False  # said {"ready": true}: a new one gets its first cell before that
        self.start_error: str | None = None  # why it will never be ready
        self.lock = threading.Lock()  # held by whoever reads its "ready"
        self.dying = False  # ended: killed, its slot (uid) is freed once it is seen dead
        self._buf = bytearray()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it is gone: say how it died (its exit status), not "Broken pipe"
            raise _WorkerDied("control pipe closed") from None
        except (OSError, ValueError) as exc:
            raise _WorkerDied(str(exc)) from None

    def read(self, deadline: float) -> dict | None:
        """The next JSON message, or None if the deadline passes first."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if not poller.poll(max(0.0, left) * 1000):  # once at least, even past the deadline
                if left <= 0:
                    return None
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

    def kill(self, grace: float = 0.0) -> int | None:
        """SIGKILL (the PID namespace takes everything inside with it) and reap.

        `grace`: a crashing interpreter is already on its way out; wait that long for its own
        exit status (say, SIGSEGV) before the kill would replace it with SIGKILL.
        """
        code = self._wait(grace) if grace > 0 else None
        if code is None:
            try:
                self.proc.kill()
            except OSError:
                pass
            code = self._wait(10)  # None only for an unkillable process
        for f in (self.proc.stdin, self.proc.stdout, getattr(self.proc, "life", None)):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


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
        self.stats = collections.Counter()
        self._zygote: Zygote | None = None
        common = dict(startup_timeout_s=startup_timeout_s, stats=self.stats)
        if self.isolation == "bwrap":
            bwrap = shutil.which("bwrap")
            self._argv = bwrap_argv(self.python, bwrap=bwrap, as_root=self.as_root, tmpfs_bytes=self._tmpfs_bytes)
            if self.as_root:  # the zygote needs root's capabilities to give sessions namespaces
                self._zygote = Zygote(
                    bwrap_argv(self.python, bwrap=bwrap, as_root=True, tmpfs_bytes=self._tmpfs_bytes, zygote=True),
                    {**self._settings, "namespaces": True, "home": SANDBOX_HOME,
                     "tmpfs_bytes": self._tmpfs_bytes, "tmp_binds": tmp_binds(self.python)},
                    env={}, cwd=None, **common)
        else:
            self._zygote = Zygote([self.python, "-I", "-c", BOOTSTRAP], {**self._settings, "pdeathsig": True},
                                  env=dict(BASE_ENV), cwd="/", **common)

        self._lock = threading.Lock()
        self._idle_cv = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._idle: collections.deque[_Worker] = collections.deque()
        self._pending: collections.deque[_Worker] = collections.deque()  # warm, not yet ready
        self._all: set[_Worker] = set()
        self._free_slots: list[int] = []
        self._next_slot = itertools.count()
        self._ids = itertools.count(1)
        self._closed = False

        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="ihgrpo-sandbox")
        self._warm = max_workers if warm is None else warm
        # Kill every worker even if close() is never called (garbage collection, interpreter exit).
        self._finalizer = weakref.finalize(self, _kill_all, self._all, self._lock, self._zygote)
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
        """Host PIDs of the live interpreters (for monitoring and tests)."""
        with self._lock:
            workers = [w for w in self._all if not w.dying]
        return [pid for pid in (w.pid for w in workers) if pid is not None]

    def zygote_pids(self) -> list[int]:
        """Host PID of the zygote (the fork server, a child of this process), if one is running."""
        zygote = self._zygote
        return zygote.pids() if zygote is not None else []

    def close(self) -> "_Closed":
        """Kill every interpreter and stop the pool's threads. Idempotent; may also be awaited."""
        with self._lock:
            if self._closed:
                return _Closed()
            self._closed = True
            self._idle_cv.notify_all()
        self._filler.join(timeout=30)
        _kill_all(self._all, self._lock, self._zygote)
        self._executor.shutdown(wait=True, cancel_futures=True)
        _kill_all(self._all, self._lock, self._zygote)  # anything started by a call already running
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
            rid = next(self._ids)
            failure = None
            try:
                worker = self._send(sess, {"id": rid, "code": code, "timeout": timeout,
                                           "max_output": self.max_output_bytes})
                start = time.monotonic()
                msg = worker.read(deadline=start + timeout + self.grace_s)
            except _WorkerDied as exc:
                worker, start = sess.worker, time.monotonic()
                msg, failure = None, str(exc)
            duration = time.monotonic() - start
            result = None if msg is None else _parse_result(msg, rid)
            if result is not None:
                self.stats["cells"] += 1
                return ExecResult(**result, state_lost=state_lost, duration_s=duration)

            # The interpreter is gone or unusable: replace it; its variables are lost.
            code_ = self._discard(worker, grace=1.0 if failure == "control pipe closed" else 0.0)
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

    def _send(self, sess: _Session, request: dict) -> _Worker:
        """Send a cell. A new interpreter gets it at once (it is read after "ready"), then we
        wait for "ready"; if it failed to start, one more is started, and waited for, first."""
        worker = sess.worker
        if worker.ready:
            worker.send(request)
            return worker
        try:
            worker.send(request)
            sent = True
        except _WorkerDied:
            sent = False  # it failed to start: _confirm says why
        try:
            self._confirm(worker)
            if sent:
                return worker
            self._discard(worker)
        except SandboxUnavailable as exc:
            log.warning("sandbox: %s; starting another interpreter", exc)
        sess.worker = None
        sess.worker = worker = self._spawn(confirm=True)  # raises SandboxUnavailable if it cannot
        worker.send(request)
        return worker

    def _end_blocking(self, session_id: str) -> None:
        with self._lock:
            sess = self._sessions.pop(session_id, None)
        if sess is not None:
            with sess.lock:
                if sess.worker is not None:
                    self._discard(sess.worker, wait=False)  # nobody waits for its exit status
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
        """A warm interpreter (ready, or else the one closest to ready), or else a new one."""
        while True:
            with self._lock:
                queue = self._idle or self._pending
                worker = queue.popleft() if queue else None
                self._idle_cv.notify_all()  # wake the filler to replace it
            if worker is None:
                return self._spawn(confirm=False)
            if worker.alive():
                return worker
            self._discard(worker)

    def _fill_loop(self) -> None:
        """Keep `warm` interpreters: asked for at once, moved to the idle queue as each says ready.
        A call that finds none ready takes a pending one (and reads its "ready" itself)."""
        failures = 0
        while True:
            with self._lock:
                if not self._closed and not self._pending and len(self._idle) >= self._warm:
                    self._idle_cv.wait(timeout=1.0)
                if self._closed:
                    return  # close() kills the pending ones (they are in self._all)
                missing = self._warm - len(self._idle) - len(self._pending)
            self._collect_dying()
            error = None
            try:
                for _ in range(missing):
                    worker = self._spawn(confirm=False)
                    with self._lock:
                        self._pending.append(worker)
            except Exception as exc:
                error = exc
            with self._lock:
                pending = list(self._pending)
            if pending:
                readable([w.proc.stdout for w in pending], 0.01)
            for worker in pending:
                try:
                    state = self._confirm(worker, block=False)
                except Exception as exc:  # _confirm discarded it
                    state, error = None, exc
                with self._lock:
                    if state is not False and worker in self._pending:  # not taken meanwhile
                        self._pending.remove(worker)
                        if state:
                            self._idle.append(worker)
                            failures = 0
            if error is not None:  # keep serving: calls spawn on demand and report errors
                failures += 1
                log.warning("sandbox: could not start a warm interpreter: %s", error)
                time.sleep(min(5.0, 0.1 * 2 ** failures))

    def _spawn(self, confirm: bool) -> _Worker:
        self._collect_dying()
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            slot = self._free_slots.pop() if self._free_slots else next(self._next_slot)
        if slot >= UIDS_PER_POOL:
            self._release_slot(slot)
            raise SandboxError(f"more than {UIDS_PER_POOL} interpreters alive at once; lower max_sessions")
        uid = self._uid_base + slot if self.as_root else None
        workdir = None
        try:
            if self.isolation == "none":
                workdir = tempfile.mkdtemp(prefix="ihgrpo-sandbox-")
                if uid is not None:  # never run hostile code as root: kill(-1) would reach everything
                    os.chown(workdir, uid, uid)
            proc = self._zygote_session(uid, workdir) if self._zygote is not None else None
            if proc is None:
                settings = {**self._settings, "uid": uid, "gid": uid}
                proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True, close_fds=True, env={})
                try:
                    proc.stdin.write(boot_message("worker", settings))
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass  # it failed to start: its stderr says why, below
        except Exception:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            self._release_slot(slot)
            raise
        worker = _Worker(proc, slot, workdir)
        with self._lock:
            self._all.add(worker)
        if confirm:
            self._confirm(worker)
        return worker

    def _confirm(self, worker: _Worker, block: bool = True) -> bool:
        """Read a new interpreter's "ready": True. block=False: False if it has not come yet.
        If it cannot come (an error, an exit, startup_timeout_s), SandboxUnavailable says why."""
        with worker.lock:  # the filler and a caller that took a pending one may both ask
            if worker.ready:
                return True
            if worker.start_error is not None:
                raise SandboxUnavailable(worker.start_error)
            deadline = worker.started + self.startup_timeout_s
            timed_out = False
            try:
                msg = worker.read(deadline=deadline if block else min(deadline, time.monotonic()))
                if msg is None and not block and time.monotonic() < deadline:
                    return False
                timed_out = msg is None
            except _WorkerDied:
                msg = None
            proc = worker.proc
            if isinstance(msg, dict) and msg.get("ready"):
                worker.ready = True
                if getattr(proc, "stderr", None) is not None:
                    proc.stderr.close()  # the worker has redirected its stderr: nothing more comes
                self.stats["spawned"] += 1
                return True
            error = msg.get("error") if isinstance(msg, dict) and isinstance(msg.get("error"), str) else ""
            if timed_out and self._zygote is not None:  # not a word in startup_timeout_s: a stuck
                self._zygote.restart()  # zygote (first: killing its session would wait on it)
            worker.kill()
            if not error and getattr(proc, "stderr", None) is not None:
                try:
                    error = proc.stderr.read(4000).decode(errors="replace").strip()
                except (OSError, ValueError):
                    pass
            worker.start_error = (f"the sandbox interpreter failed to start ({self.isolation}): "
                                  f"{error.splitlines()[-1] if error else 'no output'}")
        self._discard(worker)
        raise SandboxUnavailable(worker.start_error)

    def _zygote_session(self, uid: int | None, workdir: str | None):
        """A session forked by the zygote; None if bwrap's zygote never started (then: one bwrap each)."""
        try:
            return self._zygote.session({"uid": uid, "workdir": workdir})
        except SandboxUnavailable as exc:
            if self.isolation != "bwrap" or self.stats["zygote_starts"] or self._closed:
                raise
            log.warning("sandbox: %s; starting one bubblewrap per session instead (slower)", exc)
            self._zygote = None
            return None

    def _release_slot(self, slot: int) -> None:
        with self._lock:
            self._free_slots.append(slot)

    def _collect_dying(self) -> None:
        """Free the slots (uids) of ended sessions whose processes are now gone."""
        with self._lock:
            dying = [w for w in self._all if w.dying]
        for worker in dying:
            if worker.proc.poll() is not None:
                self._discard(worker)

    def _discard(self, worker: _Worker, grace: float = 0.0, wait: bool = True) -> int | None:
        if not wait:  # kill it; _collect_dying frees its slot once it is gone
            worker.dying = True
            try:
                worker.proc.kill()
            except OSError:
                pass
            return None
        code = worker.kill(grace)
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


def _kill_all(workers: set, lock: threading.Lock, zygote: Zygote | None = None) -> None:
    if zygote is not None:
        zygote.close()  # first: its sessions then die with it, and each kill() below is quick
    with lock:
        victims = list(workers)
        workers.clear()
    for w in victims:
        w.kill()


class _Closed:
    """What close() returns, so that both `pool.close()` and `await pool.close()` work."""

    def __await__(self):
        return iter(())
