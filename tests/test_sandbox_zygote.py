"""New sessions are forked by one zygote: they share nothing, a crash in one never reaches it,
and a dead or stuck zygote is replaced (a contained failure, not a hang)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

from test_sandbox import FALLBACK_PY, HAVE_BWRAP, wait_no_leftovers

import ihgrpo.sandbox as sandbox_pkg
from ihgrpo.sandbox import SandboxPool

AS_ROOT = os.geteuid() == 0
NAMESPACED = HAVE_BWRAP and AS_ROOT  # the zygote inside bubblewrap; else one bwrap per session
MODES = [pytest.param("bwrap", marks=pytest.mark.skipif(not NAMESPACED, reason="needs bubblewrap as root")),
         pytest.param("none", marks=pytest.mark.skipif(not os.path.exists(FALLBACK_PY), reason="no /usr/bin/python3"))]


def make_pool(isolation: str, **kw) -> SandboxPool:
    kw = {"max_workers": 2, "warm": 0, "timeout_s": 2.0, "memory_mb": 256, "max_processes": 32, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return SandboxPool(isolation=isolation, python=FALLBACK_PY if isolation == "none" else None, **kw)


def zygote_process(pool: SandboxPool) -> int:
    """The zygote's own (Python) process: below the pool's child, past bubblewrap's processes."""
    pid = pool.zygote_pids()[0]
    while open(f"/proc/{pid}/comm").read().strip() == "bwrap":
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pid = int(f.read().split()[0])
    return pid


def assert_zygote_untouched(pool: SandboxPool, zygote: list[int]) -> None:
    assert pool.zygote_pids() == zygote and pool.stats["zygote_starts"] == 1
    r = pool.execute_sync(f"fresh-{time.monotonic_ns()}", "6 * 7")
    assert r.ok and r.stdout == "42\n" and not r.state_lost, r
    assert pool.zygote_pids() == zygote


@pytest.mark.skipif(not NAMESPACED, reason="needs bubblewrap as root")
def test_sessions_from_one_zygote_share_nothing():
    with make_pool("bwrap") as pool:
        a = pool.execute_sync("a", (
            "import ctypes, json, os, socket, sys\n"
            "json.mark = 'a'; sys.path.append('a-was-here'); os.environ['MARK'] = 'a'; secret = 1\n"
            "open('/tmp/a.txt', 'w').write('a'); open('a-home.txt', 'w').write('a')\n"
            "tcp = socket.socket(); tcp.bind(('127.0.0.1', 0)); tcp.listen(1); port = tcp.getsockname()[1]\n"
            "unix = socket.socket(socket.AF_UNIX); unix.bind('\\0ihgrpo-zygote-test'); unix.listen(1)\n"
            "shm = ctypes.CDLL(None).shmget(0x1e9, 4096, 0o1000 | 0o600)\n"
            "print(port, shm >= 0, os.getuid())"))
        assert a.ok, a
        port, shm_ok, uid_a = a.stdout.split()
        assert shm_ok == "True"
        b = pool.execute_sync("b", (
            "import ctypes, json, os, socket, sys\n"
            "print(getattr(json, 'mark', None), 'a-was-here' in sys.path, os.environ.get('MARK'), 'secret' in globals())\n"
            "print(sorted(os.listdir('/tmp')), sorted(os.listdir('.')))\n"
            "for addr, fam in (((\"127.0.0.1\", " + port + "), socket.AF_INET), ('\\0ihgrpo-zygote-test', socket.AF_UNIX)):\n"
            "    try:\n"
            "        socket.socket(fam).connect(addr)\n"
            "        print('CONNECTED')\n"
            "    except OSError:\n"
            "        print('no')\n"
            "print(ctypes.CDLL(None).shmget(0x1e9, 0, 0) < 0, os.getuid())"))
        assert b.ok, b
        lines = b.stdout.splitlines()
        assert lines[0] == "None False None False"  # memory and variables: a's changes are a's
        python_tmp = sorted({p.split("/")[2] for p in (sys.prefix, sys.base_prefix) if p.startswith("/tmp/")})
        assert lines[1] == f"{python_tmp} []"  # files: neither /tmp nor the home directory
        assert lines[2:4] == ["no", "no"]  # network: own loopback, own abstract unix sockets
        shm_absent, uid_b = lines[4].split()
        assert shm_absent == "True" and uid_b != uid_a  # own IPC namespace, own uid
        r = pool.execute_sync("a", "print(json.mark, secret, os.path.exists('/tmp/a.txt'))")
        assert r.stdout == "a 1 True\n"  # and a kept all of it
        assert pool.stats["zygote_starts"] == 1 and len(pool.zygote_pids()) == 1


@pytest.mark.parametrize("isolation", MODES)
def test_sessions_share_no_variables_memory_or_workdir(isolation):
    with make_pool(isolation) as pool:
        assert pool.execute_sync("a", "import json, os\njson.mark = 'a'\nv = 1\nopen('f', 'w').write('a')").ok
        r = pool.execute_sync("b", "import json, os\nprint(getattr(json, 'mark', None), 'v' in globals(), "
                                   "os.path.exists('f'))")
        assert r.stdout == "None False False\n", r
        assert pool.stats["zygote_starts"] == 1


@pytest.mark.skipif(not NAMESPACED, reason="the zygote holds capabilities only inside bubblewrap as root")
def test_sessions_hold_no_capability():
    with make_pool("bwrap") as pool:
        r = pool.execute_sync("caps", "print(''.join(l for l in open('/proc/self/status') "
                                      "if l.startswith(('Cap', 'NoNewPrivs'))))")
        fields = dict(line.split(":\t") for line in r.stdout.split("\n") if ":\t" in line)
        assert fields == {"CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16,
                          "CapAmb": "0" * 16, "NoNewPrivs": "1"}, r.stdout


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("crash, expect", [
    ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
    ("import os\nos._exit(3)", "exited with code 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ("x = bytearray(8 * 1024**3)", "MemoryError"),
    ("chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024**2))", None),
    ("import os\nwhile True:\n    os.fork()", None),
    ("import os, signal\nos.kill(-1, signal.SIGKILL)", ""),  # may "succeed": EPERM is not reported
])
def test_a_crash_never_reaches_the_zygote(isolation, crash, expect):
    if isolation == "none" and not AS_ROOT and "kill(-1" in crash:
        pytest.skip("without namespaces or another uid, kill(-1) reaches every process of this user")
    with make_pool(isolation) as pool:
        pool.execute_sync("bystander", "kept = 'yes'")
        zygote = pool.zygote_pids()
        r = pool.execute_sync("victim", crash)
        assert expect == "" or not r.ok
        if expect:
            assert expect in r.error, r
        assert pool.execute_sync("bystander", "kept").stdout == "'yes'\n"
        assert_zygote_untouched(pool, zygote)
        r = pool.execute_sync("victim", "print('again')")
        assert r.stdout == "again\n"
    assert wait_no_leftovers() == []


@pytest.mark.parametrize("isolation", MODES)
def test_killing_a_session_from_outside_reaches_only_it(isolation):
    with make_pool(isolation) as pool:
        pool.execute_sync("bystander", "kept = 1")
        before = set(pool.worker_pids())
        pool.execute_sync("victim", "lost = 1")
        (victim,) = set(pool.worker_pids()) - before
        zygote = pool.zygote_pids()
        os.kill(victim, signal.SIGKILL)
        r = pool.execute_sync("victim", "'lost' in globals()")  # its death is seen before or during it
        assert (r.state_lost and r.stdout == "False\n") or (r.crashed and "SIGKILL" in r.error), r
        r = pool.execute_sync("victim", "'lost' in globals()")
        assert r.ok and r.stdout == "False\n", r
        assert pool.execute_sync("bystander", "kept").stdout == "1\n"
        assert_zygote_untouched(pool, zygote)


@pytest.mark.parametrize("isolation", MODES)
def test_a_dead_zygote_is_replaced(isolation):
    with make_pool(isolation) as pool:
        pool.execute_sync("old", "x = 1")
        zygote = pool.zygote_pids()
        os.kill(zygote_process(pool), signal.SIGKILL)  # as the OOM killer would
        deadline = time.monotonic() + 5
        while pool.zygote_pids() and time.monotonic() < deadline:  # it and its sandbox are gone
            time.sleep(0.01)
        start = time.monotonic()
        r = pool.execute_sync("old", "'x' in globals()")  # its interpreter died with the zygote
        assert (r.state_lost and r.stdout == "False\n") or r.crashed, r
        r = pool.execute_sync("old", "'x' in globals()")
        assert r.ok and r.stdout == "False\n", r
        assert pool.execute_sync("new", "6 * 7").stdout == "42\n"
        assert time.monotonic() - start < 10
        assert pool.zygote_pids() != zygote and pool.stats["zygote_restarts"] == 1
    assert wait_no_leftovers() == []


@pytest.mark.parametrize("isolation", MODES)
def test_a_stuck_zygote_is_replaced_not_waited_for(isolation):
    with make_pool(isolation, startup_timeout_s=2.0) as pool:
        pool.execute_sync("warm", "1")
        stuck = zygote_process(pool)
        os.kill(stuck, signal.SIGSTOP)
        try:
            start = time.monotonic()
            r = pool.execute_sync("new", "6 * 7")
            assert r.stdout == "42\n", r
            assert time.monotonic() - start < 2.0 + 8
            assert pool.stats["zygote_restarts"] == 1
        finally:
            try:
                os.kill(stuck, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert wait_no_leftovers() == []


@pytest.mark.skipif(not NAMESPACED, reason="needs bubblewrap as root")
def test_preloaded_random_generators_differ_between_sessions():
    pytest.importorskip("numpy")
    with make_pool("bwrap", preload=("random", "numpy")) as pool:
        code = "import random, numpy\nprint(random.random(), numpy.random.random())"
        a, b = (pool.execute_sync(s, code).stdout.split() for s in ("a", "b"))
        assert a[0] != b[0] and a[1] != b[1]


@pytest.mark.skipif(not (AS_ROOT and HAVE_BWRAP and os.path.exists(FALLBACK_PY)),
                    reason="needs root (to become an ordinary user), bubblewrap and /usr/bin/python3")
def test_an_ordinary_user_gets_one_bwrap_per_session():
    # Without root there is no zygote: each session is its own bwrap with a user namespace.
    copy = tempfile.mkdtemp(prefix="ihgrpo-user-test-")
    try:
        os.chmod(copy, 0o755)
        shutil.copytree(os.path.dirname(os.path.dirname(sandbox_pkg.__file__)), os.path.join(copy, "ihgrpo"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        script = (
            "import sys\nfrom ihgrpo.sandbox import SandboxPool, SandboxUnavailable\n"
            "try:\n    p = SandboxPool(max_workers=2, timeout_s=2, isolation='bwrap')\n"
            "except SandboxUnavailable:\n    print('SKIP')\n    sys.exit()\n"
            "with p:\n"
            "    print(p.zygote_pids(), repr(p.execute_sync('a', 'import os\\nx = 1\\n"
            "print(sorted(int(q) for q in os.listdir(\"/proc\") if q.isdigit()), os.getuid(), os.getcwd())').stdout))\n"
            "    print(repr(p.execute_sync('b', \"'x' in globals()\").stdout))\n"
            "    r = p.execute_sync('a', 'import ctypes\\nctypes.string_at(0)')\n"
            "    print(r.crashed, 'SIGSEGV' in r.error, p.execute_sync('a', 'x').state_lost)\n")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", FALLBACK_PY, "-c", script],
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": copy}, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    if out.stdout.strip() == "SKIP":
        pytest.skip("bubblewrap does not work for an ordinary user here")
    assert out.stdout.splitlines() == ["[] '[1, 2] 65534 /sandbox\\n'", "'False\\n'", "True True True"], \
        out.stdout + out.stderr[-2000:]
    assert "failed to start" not in out.stderr, out.stderr[-2000:]


def _others_can_read(path: str) -> bool:
    while path != "/":
        if not os.stat(path).st_mode & 0o005:
            return False
        path = os.path.dirname(path)
    return True


@pytest.mark.skipif(not AS_ROOT or _others_can_read(os.path.dirname(os.__file__)),
                    reason="needs root and an interpreter other users cannot read (a venv under /root)")
def test_fallback_refuses_an_interpreter_the_unprivileged_uid_cannot_read():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pool = SandboxPool(max_workers=1, warm=0, isolation="none")  # this very interpreter
    with pool, pytest.raises(sandbox_pkg.SandboxUnavailable, match="python="):
        pool.execute_sync("s", "1")


def test_session_lifeline_above_fd_1023_is_read(tmp_path):
    """A pool of a few hundred sessions holds descriptors numbered past 1023, where select() raises."""
    import resource
    import socket

    from ihgrpo.sandbox.launch import SessionProcess

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1100:
        pytest.skip("needs an open-file limit above 1100")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    high = socket.socket(fileno=os.dup2(ours.fileno(), 1050))
    ours.close()
    try:
        proc = SessionProcess(None, None, high, pid_in_creds=False, timeout_s=1.0)
        assert proc._drain(0.01) is False  # nothing said yet
        theirs.send(b'{"pid": 4242}')
        assert proc._drain(1.0) is True and proc._pid == 4242
    finally:
        high.close()
        theirs.close()
