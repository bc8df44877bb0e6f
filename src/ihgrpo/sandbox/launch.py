"""The pool's side of the zygote (zygote.py): start it, ask it for sessions, restart it if it dies.

A session costs the zygote one datagram and a fork, instead of a new bwrap and a new Python.
The pool talks to each session's interpreter directly, over pipes it made itself; the zygote
only hears of a session when it starts and when the pool wants it killed.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time

from .isolation import SandboxUnavailable, boot_message

log = logging.getLogger(__name__)


def readable(files, timeout_s: float) -> list:
    """The files (objects with fileno()) that can be read within `timeout_s`. poll, not select:
    a pool of a few hundred sessions holds descriptors past 1023, where select() raises."""
    poller = select.poll()
    by_fd = {f.fileno(): f for f in files}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout_s) * 1000)]


class SessionProcess:
    """A session forked by the zygote, behind the part of `subprocess.Popen` the pool uses.

    kill() asks the zygote to kill it (by shutting the lifeline down). On the lifeline the zygote
    says the session's pid once it has forked it, and its exit status once it has reaped it; if
    the lifeline closes without one, the zygote is gone, and the session with it.
    """

    def __init__(self, stdin, stdout, life: socket.socket, *, pid_in_creds: bool, timeout_s: float):
        self.stdin = stdin
        self.stdout = stdout
        self.life = life
        self.returncode: int | None = None
        self._pid: int | None = None
        self._pid_in_creds = pid_in_creds
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The host pid (the interpreter's), once the zygote has said it; None if it never will."""
        deadline = time.monotonic() + self._timeout_s
        with self._lock:
            while self._pid is None and self.returncode is None and self._drain(deadline - time.monotonic()):
                pass
        return self._pid

    def poll(self) -> int | None:
        with self._lock:
            while self.returncode is None and self._drain(0):
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.returncode is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired("sandbox session", timeout)
                self._drain(left)
        return self.returncode

    def kill(self) -> None:
        try:
            self.life.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _drain(self, timeout: float | None) -> bool:
        """Read one message from the zygote if one comes within `timeout`; False if none did."""
        if timeout is not None and not readable([self.life], timeout):
            return False
        try:
            data, anc, _, _ = self.life.recvmsg(256, socket.CMSG_SPACE(12))
            msg = json.loads(data) if data else None
        except (OSError, ValueError):
            data, anc, msg = b"", [], None
        if not data:  # no zygote: the session died with it
            if self.returncode is None:
                self.returncode = -signal.SIGKILL
            return True
        if isinstance(msg, dict) and isinstance(msg.get("pid"), int):
            self._pid = msg["pid"]
            if self._pid_in_creds:  # the kernel's translation into our PID namespace
                creds = [raw for level, kind, raw in anc
                         if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(raw) >= 12]
                self._pid = struct.unpack("3i", creds[0][:12])[0] if creds else None
        elif isinstance(msg, dict) and isinstance(msg.get("exit"), int):
            self.returncode = msg["exit"]
        return True


class Zygote:
    """One fork server per pool, started on first use and again whenever it is found dead."""

    def __init__(self, argv: list[str], settings: dict, *, env: dict, cwd: str | None,
                 startup_timeout_s: float, stats):
        self.argv = argv
        self.settings = settings
        self.env = env
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.stats = stats
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    def pids(self) -> list[int]:
        proc = self.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def session(self, request: dict) -> SessionProcess:
        """A new session, restarting a dead zygote once; SandboxUnavailable if it cannot.

        Returns as soon as the zygote has the request: the session's first message, on its
        response pipe, is {"ready": true} or {"ready": false, "error": ...}.
        """
        for attempt in range(2):
            sock = self._running()
            try:
                return self._fork(sock, request)
            except _ZygoteGone:
                with self._lock:
                    if self.sock is sock:  # nobody restarted it meanwhile: it is dead or stuck
                        self._stop()
                if attempt:
                    raise SandboxUnavailable("the sandbox zygote died while starting a session") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def restart(self) -> None:
        """Kill a zygote that stopped answering; the next session starts a new one."""
        with self._lock:
            self._stop()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop()

    # ------------------------------------------------------------------ internals
    def _running(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise SandboxUnavailable("the sandbox pool is closed")
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("sandbox: the zygote died (exit %s); restarting it", self.proc.returncode)
                self._stop()
            if self.proc is None:
                self._start()
            return self.sock

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(self.argv, stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True, env=self.env, cwd=self.cwd)
        except OSError as exc:
            ours.close()
            raise SandboxUnavailable(f"cannot start the sandbox zygote: {exc}") from None
        finally:
            theirs.close()
        settings = dict(self.settings)
        if settings.get("pdeathsig"):
            settings["ppid"] = os.getpid()
        msg = None
        try:
            ours.sendall(boot_message("zygote", settings))
            if readable([ours], self.startup_timeout_s):
                msg = json.loads(ours.recv(4096) or b"null")
        except (OSError, ValueError):
            msg = None
        if not isinstance(msg, dict) or not msg.get("ready"):
            proc.kill()
            proc.wait()
            err = proc.stderr.read(4000).decode(errors="replace").strip()
            proc.stderr.close()
            ours.close()
            raise SandboxUnavailable(f"the sandbox zygote failed to start: {err.splitlines()[-1] if err else 'no output'}")
        proc.stderr.close()  # the zygote has redirected its stderr: nothing more is written there
        self.proc, self.sock = proc, ours
        if self.stats["zygote_starts"]:
            self.stats["zygote_restarts"] += 1
        self.stats["zygote_starts"] += 1

    def _stop(self) -> None:
        """Kill the zygote (its sessions die with it) and reap it."""
        if self.proc is not None:
            try:
                self.proc.kill()
            except OSError:
                pass
            self.proc.wait()
        if self.sock is not None:
            self.sock.close()
        self.proc = self.sock = None

    def _fork(self, sock: socket.socket, request: dict) -> SessionProcess:
        """Hand the zygote a new session's descriptors; the session says "ready" on its own pipe."""
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        life, life_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        namespaces = bool(self.settings.get("namespaces"))
        if namespaces:  # the zygote sends the pid as credentials: accept them
            life.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            sock.sendmsg([json.dumps(request).encode()],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [req_r, resp_w, life_theirs.fileno()]))])
        except OSError:
            for fd in (req_w, resp_r):
                os.close(fd)
            life.close()
            raise _ZygoteGone() from None
        finally:
            for fd in (req_r, resp_w):
                os.close(fd)
            life_theirs.close()
        return SessionProcess(os.fdopen(req_w, "wb"), os.fdopen(resp_r, "rb", buffering=0), life,
                              pid_in_creds=namespaces, timeout_s=self.startup_timeout_s)


class _ZygoteGone(Exception):
    pass
