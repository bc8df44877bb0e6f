"""How sandbox processes are started: inside bubblewrap namespaces, or (loudly) without them.

bwrap as root: no user namespace (it would map the sandbox to host uid 0, for which the kernel
ignores RLIMIT_NPROC). One bwrap holds the zygote (zygote.py), which keeps the capabilities it
needs to give each session its own namespaces and uid; every session gives them all up and
drops to a per-session unprivileged uid before any model code runs. bwrap as an ordinary user:
one bwrap (and user namespace) per session, which keeps no capability. Either way a session has
its own PID, network, IPC, UTS and mount namespaces, a read-only view of the system and of the
Python installation, private /tmp and working directory, and a scrubbed environment.

Nothing in the sandbox reads the package's files: the pool reads worker.py and zygote.py and
sends their source as the first line of input to `python -I -c BOOTSTRAP`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SANDBOX_HOME = "/sandbox"
# What the zygote keeps from root to make each session's namespaces, mounts, loopback and uid.
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
_MODULES = (("sandbox_worker", "worker.py"), ("sandbox_zygote", "zygote.py"))
# Reads one line (the boot message), turns the sources in it into modules, runs a main() with
# what was read past that line (the first request may already be in the pipe).
BOOTSTRAP = (
    "import json, os, sys, types\n"
    "b = b''\n"
    "while b'\\n' not in b:\n"
    "    c = os.read(0, 1 << 20)\n"
    "    if not c:\n"
    "        sys.exit('ihgrpo sandbox: no boot message')\n"
    "    b += c\n"
    "line, _, rest = b.partition(b'\\n')\n"
    "boot = json.loads(line)\n"
    "for name, src in boot['modules']:\n"
    "    m = sys.modules[name] = types.ModuleType(name)\n"
    "    exec(compile(src, '<' + name + '>', 'exec'), m.__dict__)\n"
    "sys.modules[boot['main']].main(boot['settings'], rest)\n")
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


@functools.lru_cache(maxsize=8)
def _python_roots(python: str) -> tuple[str, ...]:
    """Directories the interpreter needs: its prefix(es) and site-packages, outside /usr."""
    out = subprocess.run(
        [python, "-I", "-c",
         "import sys, site, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix,"
         " sys.base_exec_prefix] + [p for p in sys.path if p]))"],
        capture_output=True, text=True, timeout=30, check=True, env={"PATH": os.environ.get("PATH", "")})
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
    return tuple(roots)


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[tuple[str, str], ...]:
    here = Path(__file__).parent
    return tuple((name, (here / file).read_text(encoding="utf-8")) for name, file in _MODULES)


def boot_message(main: str, settings: dict) -> bytes:
    """The first line a sandbox process reads: our modules' source, which main() to run, settings."""
    name = {"worker": _MODULES[0][0], "zygote": _MODULES[1][0]}[main]
    return json.dumps({"modules": _sources(), "main": name, "settings": settings}).encode() + b"\n"


def tmp_binds(python: str) -> list[str]:
    """The interpreter's directories under /tmp: a session's new /tmp must keep showing them."""
    return [r for r in _python_roots(python) if r.startswith("/tmp/")]


@functools.lru_cache(maxsize=8)
def _bwrap_features(bwrap: str) -> frozenset[str]:
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(f for f in ("--perms", "--size", "--disable-userns", "--unshare-cgroup-try")
                     if f in text)


def bwrap_argv(python: str, *, bwrap: str, as_root: bool, tmpfs_bytes: int, zygote: bool = False) -> list[str]:
    feats = _bwrap_features(bwrap)
    a = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
         "--die-with-parent", "--new-session", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if "--unshare-cgroup-try" in feats:
        a.append("--unshare-cgroup-try")
    if as_root:
        for cap in ZYGOTE_CAPS if zygote else ("CAP_SETUID", "CAP_SETGID"):
            a += ["--cap-add", cap]
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
    a += ["--proc", "/proc", "--dev", "/dev", "--chdir", SANDBOX_HOME, "--clearenv"]
    for k, v in {**BASE_ENV, "HOME": SANDBOX_HOME, "TMPDIR": "/tmp"}.items():
        a += ["--setenv", k, v]
    return a + [python, "-I", "-c", BOOTSTRAP]


@functools.lru_cache(maxsize=8)
def probe_bwrap(python: str, bwrap: str | None) -> str | None:
    """Returns None if bwrap can start our interpreter here, else the reason it cannot."""
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    argv = bwrap_argv(python, bwrap=bwrap, as_root=os.geteuid() == 0, tmpfs_bytes=1 << 20)
    # Replace the bootstrap with a trivial command: the probe checks the namespaces and binds.
    argv = argv[:-1] + ["import sys; sys.exit(0)"]
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
