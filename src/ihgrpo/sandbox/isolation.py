"""How a worker process is started: inside bubblewrap namespaces, or (loudly) without them.

bwrap as root: no user namespace (it would map the sandbox to host uid 0, for which the kernel
ignores RLIMIT_NPROC); the worker keeps only CAP_SETUID/CAP_SETGID and drops to a per-worker
unprivileged uid before any model code runs. bwrap as an ordinary user: a user namespace.
Either way the worker gets its own PID, network, IPC, UTS and mount namespaces, a read-only
view of the system and of the Python installation, private /tmp and working directory, and a
scrubbed environment.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_PATH = Path(__file__).with_name("worker.py")
SANDBOX_WORKER = "/opt/ihgrpo/worker.py"
SANDBOX_HOME = "/sandbox"
# One BLAS/OpenMP thread per interpreter: many interpreters share few cores, and an address
# space limit does not survive a thread pool's per-thread buffers.
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg",
            **THREAD_ENV}


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this machine."""


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    user: int | None = None  # for subprocess (fallback as root): drop before exec
    new_session: bool = True


def _python_roots(python: str) -> list[str]:
    """Directories the interpreter needs: its prefix(es) and site-packages, outside /usr."""
    out = subprocess.run(
        [python, "-I", "-c",
         "import sys, site, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix,"
         " sys.base_exec_prefix] + [p for p in sys.path if p]))"],
        capture_output=True, text=True, timeout=30, check=True, env={"PATH": os.environ.get("PATH", "")})
    import json

    paths = {os.path.realpath(p) for p in json.loads(out.stdout)}
    paths.add(os.path.dirname(os.path.realpath(python)))
    paths.add(os.path.dirname(os.path.abspath(python)))
    roots: list[str] = []
    for p in sorted(paths, key=len):
        if not os.path.exists(p) or p == "/" or p.startswith(("/usr/", "/proc", "/dev")):
            continue
        if p.endswith(".zip") and not os.path.isdir(p):
            p = os.path.dirname(p)
        if any(p == r or p.startswith(r + "/") for r in roots):
            continue
        roots.append(p)
    return roots


@functools.lru_cache(maxsize=8)
def _bwrap_features(bwrap: str) -> frozenset[str]:
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(f for f in ("--perms", "--size", "--disable-userns", "--unshare-cgroup-try")
                     if f in text)


def bwrap_argv(python: str, *, bwrap: str, as_root: bool, tmpfs_bytes: int) -> list[str]:
    feats = _bwrap_features(bwrap)
    a = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
         "--die-with-parent", "--new-session", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if "--unshare-cgroup-try" in feats:
        a.append("--unshare-cgroup-try")
    if as_root:
        a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        a += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
        if "--disable-userns" in feats:
            a.append("--disable-userns")
    a += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            a += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            a += ["--ro-bind", top, top]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/alternatives"):
        if os.path.exists(f):
            a += ["--ro-bind", f, f]
    # Private /tmp and home first: the interpreter's binds below may live under /tmp (a venv in
    # a checkout there) and must land on top of the new tmpfs, not under it.
    size = ["--size", str(tmpfs_bytes)] if "--size" in feats else []
    sticky = ["--perms", "01777"] if "--perms" in feats else []
    a += [*sticky, *size, "--tmpfs", "/tmp", *sticky, *size, "--tmpfs", SANDBOX_HOME]
    perms = ["--perms", "0755"] if "--perms" in feats else []
    made: set[str] = set()
    for root in _python_roots(python):
        parents = Path(root).parents
        for parent in reversed(parents):
            p = str(parent)
            if p == "/" or p in made or p.startswith("/usr"):
                continue
            made.add(p)
            a += [*perms, "--dir", p]
        a += ["--ro-bind", root, root]
    a += ["--ro-bind", str(WORKER_PATH), SANDBOX_WORKER, "--proc", "/proc", "--dev", "/dev",
          "--chdir", SANDBOX_HOME, "--clearenv"]
    for k, v in {**BASE_ENV, "HOME": SANDBOX_HOME, "TMPDIR": "/tmp"}.items():
        a += ["--setenv", k, v]
    return a + [python, "-I", SANDBOX_WORKER]


@functools.lru_cache(maxsize=8)
def probe_bwrap(python: str, bwrap: str | None) -> str | None:
    """Returns None if bwrap can start our interpreter here, else the reason it cannot."""
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    argv = bwrap_argv(python, bwrap=bwrap, as_root=os.geteuid() == 0, tmpfs_bytes=1 << 20)
    # Replace the worker with a trivial command: the probe checks the namespaces and binds.
    argv = argv[:-1] + ["-c", "import sys; sys.exit(0)"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap failed to start: {exc}"
    if proc.returncode != 0:
        return f"bwrap failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return None


def resolve_isolation(mode: str, python: str) -> str:
    """'auto' -> 'bwrap' when it works here, else 'none' with a loud warning."""
    if mode not in ("auto", "bwrap", "none"):
        raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', got {mode!r}")
    if mode == "none":
        _warn("isolation='none': model code runs without namespaces (rlimits and a process "
              "session only). Use this only for trusted code.")
        return "none"
    reason = probe_bwrap(python, shutil.which("bwrap"))
    if reason is None:
        return "bwrap"
    if mode == "bwrap":
        raise SandboxUnavailable(f"isolation='bwrap' requested but {reason}")
    _warn(f"SANDBOX NOT ISOLATED: {reason}. Model code runs with rlimits only: no network, "
          "filesystem or PID isolation. Install bubblewrap (apt-get install bubblewrap).")
    return "none"


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(f"[ihgrpo.sandbox] WARNING: {msg}", file=sys.stderr)
