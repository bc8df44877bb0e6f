"""The fork server: a process that has already started Python and imported the pool's preloads,
and forks one interpreter per session. Runs inside the sandbox; never imported by the trainer.

Standard library only. The pool starts it once (`python -I -c BOOTSTRAP`, inside bubblewrap as
root, or alone in the rlimits-only fallback) and then sends, per session, one datagram on its
control socket: {"uid": int | None, "workdir": str | None} and three descriptors (the session's
request pipe, its response pipe, and one end of a "lifeline" socket). Nothing else is read from
anyone. On the lifeline the zygote says the session's pid (SCM_CREDENTIALS, so the kernel
translates it into the pool's PID namespace) and, when the session has ended, its exit status;
the pool shuts the lifeline down to have the session killed.

With namespaces (bubblewrap as root), the zygote forks two processes per session into a new
PID namespace, so that the interpreter is one fork away from the zygote:
  init (pid 1): gives up every capability and only reaps. Killing it ends the namespace and
      everything in it; when it has been reaped, every process of the session is gone.
  interpreter (pid 2): enters new mount, IPC and UTS namespaces and a network namespace of its
      own; mounts a fresh /proc, private tmpfs /tmp and home, a new devpts; then drops every
      capability (bounding set included), becomes the session's own unprivileged uid, sets its
      rlimits, and only then reads model code. Its parent (the zygote) is outside its PID
      namespace: it cannot see or signal it.
A network namespace costs milliseconds to create, so each one is reused, but only after every
process of its previous session is dead (the zygote has reaped that session's init); a session
has no capability to change it. Without namespaces (fallback) the zygote forks the interpreter
alone, which enters its own process session, uid and limits, and dies with the zygote.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys

try:
    from . import worker
except ImportError:  # run by the bootstrap inside the sandbox, where it is a top-level module
    import sandbox_worker as worker  # type: ignore[no-redef]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SIOCSIFFLAGS, IFF_UP_LOOPBACK_RUNNING = 0x8914, 0x1 | 0x8 | 0x40
MAX_FREE_NETNS = 128
PROC_COVERS = ("sys", "sysrq-trigger", "irq", "bus")  # read-only in every session, as in bubblewrap

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, ctypes.c_int(nstype)), "setns")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda v: None if v is None else v.encode())
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _close_all_but(keep: set[int]) -> None:
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


class Zygote:
    def __init__(self, settings: dict, ctl: socket.socket):
        self.settings = settings
        self.ctl = ctl
        self.namespaces = bool(settings.get("namespaces"))
        self.sessions: dict[int, socket.socket] = {}  # interpreter pid -> lifeline
        self.killed: set[int] = set()
        self.init_of: dict[int, int] = {}  # interpreter pid -> its namespace's init
        self.netns_of: dict[int, int] = {}  # init pid -> the session's network namespace (an fd)
        self.free_netns: list[int] = []
        self.poller = select.poll()
        self.by_fd: dict[int, int] = {}  # lifeline fd -> pid
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        if self.namespaces:
            self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            self.own_net_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            with open("/proc/sys/kernel/cap_last_cap") as f:
                self.cap_last_cap = int(f.read())
        else:  # orphans of a killed session come to us, and we kill them
            worker._prctl(worker.PR_SET_CHILD_SUBREAPER, 1)

    # ------------------------------------------------------------------ the loop
    def serve(self) -> None:
        self.poller.register(self.ctl.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.ctl.fileno():
                    if not self._request():
                        self._shutdown()
                        return
                elif fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self._reap()
                else:
                    self._kill(self.by_fd[fd])

    def _request(self) -> bool:
        fds: list[int] = []
        try:
            data, anc, _, _ = self.ctl.recvmsg(1 << 16, socket.CMSG_SPACE(3 * 4))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            return True
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", raw[: len(raw) - len(raw) % 4])
        if not data:
            return False  # the pool is gone: so are its sessions
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return True
        req_r, resp_w, life_fd = fds
        life = socket.socket(fileno=life_fd)
        try:
            self._start(json.loads(data), req_r, resp_w, life)
        except Exception as exc:  # a failed session, not a failed zygote: say why on its pipe
            try:
                os.write(resp_w, json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
            except OSError:
                pass
            life.close()
        finally:
            os.close(req_r)
            os.close(resp_w)
        return True

    def _start(self, req: dict, req_r: int, resp_w: int, life: socket.socket) -> None:
        uid = req.get("uid")
        session = {**self.settings, "uid": uid, "gid": uid, "workdir": req.get("workdir"), "new_session": True}
        if not self.namespaces:
            session.update(pdeathsig=True, ppid=os.getpid())
            pid = self._fork(lambda: self._interpreter(session, req_r, resp_w), {req_r, resp_w}, resp_w)
        else:
            session["cap_last_cap"] = self.cap_last_cap
            netns = self.free_netns.pop() if self.free_netns else self._new_netns()
            init = None
            try:
                _unshare(CLONE_NEWPID)  # for the next children only: the first one is pid 1 there
                try:
                    init = self._fork(self._init, set(), None)
                    pid = self._fork(lambda: self._namespaced(session, req_r, resp_w, netns),
                                     {req_r, resp_w, netns}, resp_w)
                finally:
                    self._restore_pid_ns()
            except BaseException:
                if init is not None:
                    os.kill(init, signal.SIGKILL)  # reaped as a stranger; it never used the netns
                self._release_netns(netns)
                raise
            self.init_of[pid] = init
            self.netns_of[init] = netns
        self.sessions[pid] = life
        self.by_fd[life.fileno()] = pid
        self.poller.register(life.fileno(), select.POLLIN)
        # The pool's PID namespace is not ours: SCM_CREDENTIALS has the kernel translate the pid.
        creds = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("3i", pid, 0, 0))] if self.namespaces else []
        try:
            life.sendmsg([json.dumps({"pid": pid}).encode()], creds)
        except OSError:
            self._kill(pid)

    def _fork(self, body, keep: set[int], resp_w: int | None) -> int:
        pid = os.fork()
        if pid == 0:
            self._child(body, keep, resp_w)
        return pid

    def _restore_pid_ns(self) -> None:
        try:
            _setns(self.own_pid_ns, CLONE_NEWPID)
        except OSError:  # later children would land in a dead namespace: let the pool restart us
            os._exit(70)

    def _new_netns(self) -> int:
        """A network namespace with its loopback up, made by visiting it (no process to spare)."""
        _unshare(CLONE_NEWNET)
        try:
            fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP_LOOPBACK_RUNNING))
        finally:
            _setns(self.own_net_ns, CLONE_NEWNET)
        return fd

    def _release_netns(self, fd: int) -> None:
        if len(self.free_netns) < MAX_FREE_NETNS:
            self.free_netns.append(fd)
        else:
            os.close(fd)

    def _kill(self, pid: int) -> None:
        """The pool shut the lifeline (or is gone): kill the session; _reap reports it."""
        life = self.sessions.get(pid)
        if life is None or pid in self.killed:
            return
        self.killed.add(pid)
        self.poller.unregister(life.fileno())
        init = self.init_of.get(pid)
        # Killing the init ends the PID namespace; in the fallback, kill the process group.
        targets = [(os.kill, pid), (os.kill, init)] if init is not None else [(os.kill, pid), (os.killpg, pid)]
        for kill, target in targets:
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.netns_of:  # an init: every process of its session is gone
                self._release_netns(self.netns_of.pop(pid))
            life = self.sessions.pop(pid, None)
            if life is None:
                continue  # an init, or an orphan of a dead session (fallback)
            self.killed.discard(pid)
            init = self.init_of.pop(pid, None)
            if init is not None:  # the interpreter is gone: end its namespace
                try:
                    os.kill(init, signal.SIGKILL)
                except OSError:
                    pass
            fd = life.fileno()
            self.by_fd.pop(fd, None)
            try:
                self.poller.unregister(fd)
            except KeyError:
                pass
            try:
                life.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass
            life.close()
        if not self.namespaces:
            self._kill_orphans()

    def _kill_orphans(self) -> None:
        """Fallback: what a dead session left running was re-parented to us; kill it."""
        for pid in worker._children():
            if pid not in self.sessions:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _shutdown(self) -> None:
        for pid in list(self.sessions):
            self._kill(pid)
        os._exit(0)

    # ------------------------------------------------------------------ in the children
    def _child(self, body, keep: set[int], resp_w: int | None) -> None:
        """Runs in a forked child; never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _close_all_but(keep)
            code = body()
        except BaseException as exc:
            try:
                if resp_w is not None:
                    os.write(resp_w, json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
            except BaseException:
                pass
        finally:
            os._exit(code)

    @staticmethod
    def _init() -> int:
        """pid 1 of a session's PID namespace: no capability, no descriptor; reaps until killed."""
        worker._prctl(worker.PR_SET_PDEATHSIG, signal.SIGKILL)
        worker.drop_capabilities()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while True:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            signal.sigtimedwait({signal.SIGCHLD}, 60)

    def _namespaced(self, session: dict, req_r: int, resp_w: int, netns: int) -> int:
        """The interpreter (pid 2), still root and holding the zygote's capabilities: isolate it."""
        _unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
        _setns(netns, CLONE_NEWNET)
        os.close(netns)
        self._mounts()
        return self._interpreter(session, req_r, resp_w)

    def _mounts(self) -> None:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        # The interpreter's own directories may live under /tmp: keep them across the new tmpfs.
        keep = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in self.settings.get("tmp_binds", [])}
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for sub in PROC_COVERS:
            path = "/proc/" + sub
            if os.path.exists(path):
                _mount(path, path, None, MS_BIND | MS_REC)
                _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        tmpfs = f"size={self.settings['tmpfs_bytes']},mode=1777"
        for path in ("/tmp", self.settings["home"]):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
        for path, fd in keep.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
        if os.path.isdir("/dev/pts"):  # no terminal shared with another session
            _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")

    def _interpreter(self, session: dict, req_r: int, resp_w: int) -> int:
        ctl_in, ctl_out = worker._setup(session, req_r, resp_w)  # raises before moving the pipes
        stdlib = os.path.dirname(os.__file__)
        if session.get("uid") is not None and not os.access(stdlib, os.R_OK | os.X_OK):
            # Lazy imports in model code would fail one by one: refuse to start instead.
            os.write(ctl_out, json.dumps({"ready": False, "error": (
                f"PermissionError: uid {session['uid']} cannot read the Python installation ({stdlib}); model code "
                "never runs as root, so install bubblewrap or pass python= an interpreter other users can read, "
                "such as /usr/bin/python3")}).encode() + b"\n")
            return 1
        np = sys.modules.get("numpy.random")
        if np is not None:  # a preloaded generator must not repeat in every session
            np.seed()
        try:
            worker.serve(ctl_in, ctl_out)
        except BaseException:  # the pool went away mid-reply
            return 1
        return 0


def main(settings: dict, rest: bytes = b"") -> None:  # noqa: ARG001 - the pool sends nothing more before "ready"
    ctl = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if settings.get("pdeathsig"):  # fallback: nothing else ties us to the pool
        worker._prctl(worker.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != settings.get("ppid", os.getppid()):
            os._exit(1)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # two descriptors per live session
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for name in settings.get("preload", []):
        try:
            __import__(name)
        except Exception:
            pass
    zygote = Zygote(settings, ctl)
    ctl.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    os.dup2(devnull, 2)  # the pool stops reading our stderr now
    os.close(devnull)
    zygote.serve()
