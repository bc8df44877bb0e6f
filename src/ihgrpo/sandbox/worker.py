"""The interpreter that runs inside the sandbox: one process per session, state kept in memory.

Never imported by the trainer: the pool sends this file's source (and zygote.py's) to a fresh
`python -I -c BOOTSTRAP` as its first line of input, so the sandbox never needs to read the
package's files. Standard library only. A session talks to the pool with JSON lines on two
private descriptors, set up before any model code runs; fds 1 and 2 then point at per-cell
capture buffers. Nothing is pickled in either direction.

Request:  {"id": int, "code": str, "timeout": float, "max_output": int}
Response: {"id": int, "stdout": str, "stderr": str, "ok": bool, "timed_out": bool,
           "error": str, "duration": float}
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import fcntl
import functools
import io
import json
import linecache
import os
import resource
import signal
import sys
import time
import traceback

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CELL_FILENAME = "<cell>"


class CellTimeout(BaseException):
    """Raised in the cell when its time is up. BaseException, so `except Exception` can't eat it."""


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    try:
        _libc().prctl(option, arg, 0, 0, 0)
    except Exception:  # pragma: no cover - non-Linux
        pass


def drop_capabilities() -> None:
    """capset(2) with every set empty (version 3: two 32-bit words per set)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    if _libc().capset(header, (ctypes.c_uint32 * 6)()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _setup(settings: dict, ctl_in: int = 0, ctl_out: int = 1) -> tuple[int, int]:
    """Privilege drop, limits, private control descriptors. Runs before any model code."""
    if settings.get("new_session"):  # forked by the zygote: what bwrap --new-session did per process
        os.setsid()
    if "cap_last_cap" in settings:  # forked by a zygote that holds capabilities: give them all up
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        for cap in range(settings["cap_last_cap"] + 1):
            _prctl(PR_CAPBSET_DROP, cap)
    uid = settings.get("uid")
    if uid is not None:  # started as root: become an unprivileged, per-session uid
        gid = settings.get("gid", uid)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # clears the permitted and effective capabilities
    if "cap_last_cap" in settings:
        drop_capabilities()  # the inheritable ones too
    if settings.get("pdeathsig"):
        # Fallback mode (no bwrap --die-with-parent): die with our parent.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != settings.get("ppid", os.getppid()):
            os._exit(1)
    # Orphans of the cell (daemons, double forks) are re-parented to us, so we can kill them.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    # Limits are set here, inside the sandbox's user namespace, so that the process count is
    # charged to this sandbox alone and not to every process of the host user.
    limits = settings.get("rlimits", {})
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    workdir = settings.get("workdir")
    if workdir:  # fallback mode: a private directory made by the pool
        os.chdir(workdir)
        os.environ.update(HOME=workdir, TMPDIR=workdir)
    elif settings.get("home"):
        os.chdir(settings["home"])

    # Private control descriptors above 2, closed on exec; 0, 1 and 2 point at /dev/null.
    ctl = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (ctl_in, ctl_out))
    for fd in {ctl_in, ctl_out} - {0, 1, 2}:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    return ctl


def _std_streams() -> tuple[io.TextIOWrapper, io.TextIOWrapper]:
    out = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                           errors="backslashreplace", line_buffering=False, write_through=False)
    err = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                           errors="backslashreplace", line_buffering=False, write_through=True)
    return out, err


def _read_capped(fd: int, max_bytes: int) -> str:
    """Head and tail of a capture buffer, with a marker where the middle was dropped."""
    size = os.fstat(fd).st_size
    if size <= max_bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        data = _read_exact(fd, size)
    else:
        half = max_bytes // 2
        os.lseek(fd, 0, os.SEEK_SET)
        head = _read_exact(fd, half)
        os.lseek(fd, size - half, os.SEEK_SET)
        tail = _read_exact(fd, half)
        data = head + f"\n...[{size - 2 * half} bytes of output omitted]...\n".encode() + tail
    return data.decode("utf-8", errors="replace")


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _children() -> list[int]:
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_leftovers() -> int:
    """Kill every process the cell left behind (subprocesses, daemons, fork bombs).

    We are a child subreaper, so each round's orphans become our children for the next round.
    """
    killed = 0
    for _ in range(1000):
        kids = _children()
        if not kids:
            break
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    _reap()
    return killed


def split_last_expression(code: str) -> tuple[ast.Module, ast.Expression | None]:
    """Notebook rule: if the last statement is a bare expression, its value is printed."""
    tree = ast.parse(code, filename=CELL_FILENAME, mode="exec")
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        return tree, ast.Expression(body=last.value)
    return tree, None


class Interpreter:
    def __init__(self) -> None:
        self.namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
        self.out, self.err = _std_streams()
        self.cells = 0
        self.pid = os.getpid()

    def _timeout(self, signum, frame):  # noqa: ARG002
        raise CellTimeout()

    def run(self, code: str, timeout: float, max_output: int) -> dict:
        self.cells += 1
        # Register the source so tracebacks show the offending line of model code.
        linecache.cache[CELL_FILENAME] = (len(code), None, code.splitlines(True), CELL_FILENAME)
        out_fd = os.memfd_create("stdout")
        err_fd = os.memfd_create("stderr")
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdout, sys.stderr = self.out, self.err
        ok, timed_out, error = True, False, ""
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, self._timeout)
        signal.signal(signal.SIGXCPU, self._timeout)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                tree, last = split_last_expression(code)
                exec(compile(tree, CELL_FILENAME, "exec"), self.namespace)
                if last is not None:
                    value = eval(compile(last, CELL_FILENAME, "eval"), self.namespace)
                    if value is not None:
                        print(repr(value))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CellTimeout:
            ok, timed_out = False, True
            error = f"TimeoutError: execution exceeded the {timeout:g} s time limit"
            print(error, file=sys.stderr)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the cell ends, we don't
            ok = False
            error = self._report(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if os.getpid() != self.pid:
            os._exit(0)  # a child the cell forked must not go on to act as the interpreter
        duration = time.perf_counter() - start
        for stream in (sys.stdout, sys.stderr, self.out, self.err):
            try:
                stream.flush()
            except BaseException:
                pass
        kill_leftovers()
        stdout = _read_capped(out_fd, max_output)
        stderr = _read_capped(err_fd, max_output)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        for fd in (devnull, out_fd, err_fd):
            os.close(fd)
        return {"stdout": stdout, "stderr": stderr, "ok": ok, "timed_out": timed_out,
                "error": error, "duration": duration}

    def _report(self, exc: BaseException) -> str:
        """Print the traceback without the worker's own frames; return its last line."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
            tb = tb.tb_next
        if isinstance(exc, SyntaxError):
            tb = None
        lines = traceback.format_exception(type(exc), exc, tb)
        try:
            sys.stderr.write("".join(lines))
        except BaseException:
            pass
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return last


def _lines(fd: int, rest: bytes = b""):
    """Lines read from `fd`, after those in `rest` (what the bootstrap read past its own line)."""
    buf = bytearray(rest)
    while True:
        end = buf.find(b"\n")
        while end >= 0:
            yield bytes(buf[:end])
            del buf[:end + 1]
            end = buf.find(b"\n")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buf += chunk


def serve(ctl_in: int, ctl_out: int, rest: bytes = b"") -> None:
    """Answer the pool's requests until it closes the control pipe."""
    interp = Interpreter()
    writer = os.fdopen(ctl_out, "wb", buffering=0)

    def send(msg: dict) -> None:
        writer.write(json.dumps(msg).encode() + b"\n")

    send({"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    for line in _lines(ctl_in, rest):
        try:
            req = json.loads(line)
        except ValueError:
            break
        result = interp.run(req["code"], float(req["timeout"]), int(req["max_output"]))
        result["id"] = req["id"]
        send(result)


def main(settings: dict, rest: bytes = b"") -> None:
    """One process per session (bubblewrap as an ordinary user): stdin and stdout are the pipes."""
    ctl_in, ctl_out = _setup(settings)
    for name in settings.get("preload", []):
        try:
            __import__(name)
        except Exception:
            pass
    serve(ctl_in, ctl_out, rest)
