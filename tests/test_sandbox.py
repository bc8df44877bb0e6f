"""The sandbox pool: notebook semantics, isolation, and hostile code contained while it keeps serving."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest

import ihgrpo.sandbox as sandbox_pkg
from ihgrpo.sandbox import ExecResult, SandboxError, SandboxPool, SandboxUnavailable
from ihgrpo.sandbox.isolation import probe_bwrap
from ihgrpo.sandbox.pool import process_uid_range
from ihgrpo.sandbox.worker import split_last_expression

HAVE_BWRAP = probe_bwrap(sys.executable, shutil.which("bwrap")) is None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not usable on this machine")
UID_BASE, UID_END = process_uid_range()  # the uids this test process's pools hand out
SECRET = "ihgrpo-test-secret-4f9c1"
MODULE_POOL: list[SandboxPool] = []


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, uid) of a host process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), uid


def _host_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def leftovers(pool: SandboxPool | None = None) -> list[str]:
    """Sandbox processes that are not a live interpreter of `pool`, and zombie children of ours."""
    me = os.getpid()
    live = set(pool.worker_pids()) if pool is not None else set()
    zygotes = set(pool.zygote_pids()) if pool is not None else set()  # the fork servers: our children
    if MODULE_POOL:  # the module's shared pool may be running beside a test's own pool
        live |= set(MODULE_POOL[0].worker_pids())
        zygotes |= set(MODULE_POOL[0].zygote_pids())
    stats = {pid: st for pid in _host_pids() if (st := _proc_stat(pid)) is not None}

    def owned(pid: int) -> bool:  # a live worker, or a process below one
        for _ in range(64):
            if pid in live:
                return True
            st = stats.get(pid)
            if st is None or st[1] in (0, me):
                return False
            pid = st[1]
        return False

    bad = []
    for pid, (state, ppid, uid) in stats.items():
        if ppid == me and state == "Z":
            bad.append(f"{pid} zombie child")
        elif UID_BASE <= uid < UID_END and not owned(pid):
            bad.append(f"{pid} uid={uid} state={state}")
        elif ppid == me and pid not in live | zygotes:
            try:
                cmd = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if "worker.py" in cmd or "bwrap" in cmd:
                bad.append(f"{pid} {cmd[:80]!r}")
    if pool is not None:  # exactly one interpreter per live worker: nothing else under sandbox uids
        n_sandboxed = sum(1 for st in stats.values() if UID_BASE <= st[2] < UID_END)
        if HAVE_BWRAP and os.geteuid() == 0 and n_sandboxed > len(live):
            bad.append(f"{n_sandboxed} sandboxed processes for {len(live)} interpreters")
    return bad


def wait_no_leftovers(pool: SandboxPool | None = None, timeout: float = 5.0) -> list[str]:
    end = time.monotonic() + timeout
    while True:
        bad = leftovers(pool)
        if not bad or time.monotonic() > end:
            return bad
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool():
    os.environ["IHGRPO_TEST_SECRET"] = SECRET  # the parent's environment must not leak
    p = SandboxPool(max_workers=2, timeout_s=1.5, memory_mb=512, max_processes=32,
                    max_file_mb=16, max_output_bytes=8192, grace_s=1.0)
    MODULE_POOL.append(p)
    yield p
    MODULE_POOL.clear()
    p.close()
    os.environ.pop("IHGRPO_TEST_SECRET", None)
    assert wait_no_leftovers() == []


def serving(pool: SandboxPool, session: str = "healthy") -> None:
    """The pool still runs cells, and an untouched session kept its state."""
    pool.execute_sync(session, "counter = globals().get('counter', 0) + 1")
    res = pool.execute_sync(session, "print(counter)")
    assert res.ok and int(res.stdout) >= 1, res


# ---------------------------------------------------------------- notebook semantics
def test_state_persists_and_last_expression_prints(pool):
    r = pool.execute_sync("nb", "x = 2\nprint(x)")
    assert (r.stdout, r.ok, r.timed_out) == ("2\n", True, False)
    assert isinstance(r, ExecResult)
    r = pool.execute_sync("nb", "y = x * 21\ny")
    assert r.stdout == "42\n"
    r = pool.execute_sync("nb", "x, y")  # a tuple
    assert r.stdout == "(2, 42)\n"


@pytest.mark.parametrize("code, expected", [
    ("a = 1\n# a comment\na + 1  # trailing comment\n", "2\n"),
    ("def f(n, *, k=1):\n    return n * k\n\nf(\n    3,\n    k=5,\n)", "15\n"),
    ("d = {'a': [1, 2]}\nd['a']", "[1, 2]\n"),
    ("import math\nmath.sqrt(16)", "4.0\n"),
    ("x = 5", ""),                      # assignment: nothing printed
    ("print('hi')", "hi\n"),            # print returns None: not echoed
    ("for i in range(2):\n    i", ""),  # last statement is a loop, not an expression
])
def test_last_expression_rule(pool, code, expected):
    r = pool.execute_sync("expr", code)
    assert r.ok, r
    assert r.stdout == expected


def test_split_last_expression_is_ast_based():
    tree, last = split_last_expression("s = '''\nx\n'''\nlen(s)")
    assert last is not None and len(tree.body) == 1
    _, last = split_last_expression("x = (1,\n 2)")
    assert last is None


def test_error_keeps_earlier_variables_and_reports_last_line(pool):
    r = pool.execute_sync("err", "a = 10\nprint('before')\nb = undefined_name\nc = 3")
    assert not r.ok and not r.timed_out and not r.crashed
    assert r.stdout == "before\n"
    assert r.error == "NameError: name 'undefined_name' is not defined"
    assert "Traceback" in r.stderr and 'File "<cell>", line 3' in r.stderr
    assert "worker.py" not in r.stderr  # the sandbox's own frames are hidden
    r = pool.execute_sync("err", "print(a)\n'c' in globals()")
    assert r.stdout == "10\nFalse\n"


def test_syntax_error_runs_nothing(pool):
    r = pool.execute_sync("syn", "z = 1\nprint(z\n")
    assert not r.ok and r.error.startswith("SyntaxError")
    assert pool.execute_sync("syn", "'z' in globals()").stdout == "False\n"


def test_warning_does_not_hide_stdout(pool):
    r = pool.execute_sync("warn", "import warnings\nprint('value', 7)\nwarnings.warn('careful')")
    assert r.ok and r.stdout == "value 7\n"
    assert "UserWarning: careful" in r.stderr


def test_sys_exit_is_an_error_not_a_death(pool):
    pool.execute_sync("exit", "keep = 1")
    r = pool.execute_sync("exit", "import sys\nsys.exit(3)")
    assert not r.ok and not r.crashed and r.error == "SystemExit: 3"
    assert pool.execute_sync("exit", "keep").stdout == "1\n"


def test_sessions_are_isolated(pool):
    pool.execute_sync("s1", "secret = 123\nopen('note.txt', 'w').write('s1')")
    r = pool.execute_sync("s2", "print('secret' in globals())\nimport os\nprint(os.path.exists('note.txt'))")
    assert r.stdout == "False\nFalse\n"
    # each session sees only its own processes (its own PID namespace)
    r = pool.execute_sync("s2", "import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())")
    assert r.stdout == "[1, 2]\n" if HAVE_BWRAP else r.ok


def test_end_session_forgets_state(pool):
    pool.execute_sync("end", "v = 1")
    pool.end_session_sync("end")
    r = pool.execute_sync("end", "'v' in globals()")
    assert r.stdout == "False\n" and not r.state_lost  # ended on purpose: a fresh session
    pool.end_session_sync("never-existed")  # no-op


def test_unicode_and_binary_output(pool):
    r = pool.execute_sync("uni", "print('π ≈ 3.14159 — ✓')\nimport sys\nsys.stdout.flush()\n"
                                 "import os\nos.write(1, b'\\xff\\xfe raw\\n')")
    assert "π ≈ 3.14159 — ✓" in r.stdout and "raw" in r.stdout


def test_subprocess_output_is_captured_in_order(pool):
    r = pool.execute_sync("sub", "import subprocess, sys\nprint('a', flush=True)\n"
                                 "subprocess.run([sys.executable, '-c', 'print(\"b\")'])\nprint('c')")
    assert r.stdout == "a\nb\nc\n"


# ---------------------------------------------------------------- hostile code
def test_infinite_loop_times_out_and_state_survives(pool):
    pool.execute_sync("loop", "before = 'kept'")
    r = pool.execute_sync("loop", "while True:\n    pass")
    assert r.timed_out and not r.ok and "time limit" in r.error
    assert 1.4 < r.duration_s < 2.5
    r = pool.execute_sync("loop", "before")
    assert r.stdout == "'kept'\n" and not r.state_lost
    serving(pool)


def test_sleep_times_out(pool):
    r = pool.execute_sync("sleep", "import time\ntime.sleep(60)")
    assert r.timed_out and r.duration_s < 3
    serving(pool)


def test_timeout_is_per_call(pool):
    r = pool.execute_sync("pc", "import time\ntime.sleep(0.2)\nprint('done')", timeout_s=5)
    assert r.ok and r.stdout == "done\n"
    r = pool.execute_sync("pc", "import time\ntime.sleep(2)", timeout_s=0.3)
    assert r.timed_out and r.duration_s < 1.5


@pytest.mark.parametrize("code", [
    # ignores SIGTERM and the alarm, swallows every exception: only the hard kill stops it
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(100)",
    "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass",
])
def test_uncooperative_code_is_killed(pool, code):
    pool.execute_sync("stubborn", "lost = 1")
    r = pool.execute_sync("stubborn", code)
    assert r.timed_out and r.crashed and not r.ok
    assert r.duration_s < 1.5 + 1.0 + 1.5
    r = pool.execute_sync("stubborn", "'lost' in globals()")
    assert r.state_lost and r.stdout == "False\n"
    serving(pool)
    assert wait_no_leftovers(pool) == []


def test_fork_bomb_is_contained(pool):
    r = pool.execute_sync("bomb", "import os\nwhile True:\n    os.fork()")
    assert not r.ok
    serving(pool)
    r = pool.execute_sync("bomb", "import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))")
    if HAVE_BWRAP:  # nothing but bwrap's init and the interpreter itself
        assert r.stdout == "2\n"
    assert wait_no_leftovers(pool) == []


def test_memory_bomb_is_contained(pool):
    pool.execute_sync("mem", "alive = True")
    r = pool.execute_sync("mem", "x = bytearray(4 * 1024**3)")
    assert not r.ok and "MemoryError" in r.error
    r = pool.execute_sync("mem", "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))")
    # a MemoryError when the limit is hit (or, on a loaded machine, the time limit first)
    assert not r.ok and ("MemoryError" in r.error or r.crashed or r.timed_out)
    r = pool.execute_sync("mem", "del chunks\nalive")
    assert r.stdout == "True\n" or r.state_lost
    serving(pool)


def test_huge_output_is_capped(pool):
    r = pool.execute_sync("big", "print('A' * 10_000_000)\nprint('end')")
    assert len(r.stdout) < 8192 + 200
    assert r.stdout.startswith("AAAA") and r.stdout.endswith("end\n")
    assert "bytes of output omitted" in r.stdout
    serving(pool)


def test_print_flood_is_contained(pool):
    r = pool.execute_sync("flood", "while True:\n    print('flood ' * 20)")
    assert not r.ok  # the file-size limit or the time limit stops it
    assert len(r.stdout) < 8192 + 200 and r.stdout.startswith("flood")
    serving(pool)


def test_deep_recursion(pool):
    r = pool.execute_sync("rec", "def f(n):\n    return f(n + 1)\nf(0)")
    assert not r.ok and "RecursionError" in r.error and not r.crashed
    r = pool.execute_sync("rec", "import sys\nsys.setrecursionlimit(10**7)\n"
                                 "def g(n):\n    return g(n + 1) + 1\ng(0)")
    assert not r.ok  # a RecursionError, or a C stack overflow that kills only this interpreter
    serving(pool)


def test_segfault_is_a_crash_and_next_call_says_state_lost(pool):
    pool.execute_sync("segv", "data = [1, 2, 3]")
    r = pool.execute_sync("segv", "import ctypes\nctypes.string_at(0)")
    assert r.crashed and not r.ok and "SIGSEGV" in r.error
    r = pool.execute_sync("segv", "'data' in globals()")
    assert r.ok and r.state_lost and r.stdout == "False\n"
    r = pool.execute_sync("segv", "1")
    assert not r.state_lost  # said once
    serving(pool)


def test_os_exit_is_a_crash(pool):
    r = pool.execute_sync("osexit", "import os\nos._exit(0)")
    assert r.crashed and "exited with code 0" in r.error
    assert pool.execute_sync("osexit", "2 + 2").stdout == "4\n"


@pytest.mark.parametrize("code", [
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')",
    "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
])
def test_killing_parent_or_group_reaches_only_the_sandbox(pool, code):
    serving(pool, "bystander")
    pool.execute_sync("killer", code)
    assert os.getpid() > 0  # this process (the "trainer") is alive
    serving(pool, "bystander")  # and another session kept its interpreter and state
    r = pool.execute_sync("bystander", "counter")
    assert int(r.stdout) >= 2 and not r.state_lost
    assert pool.execute_sync("killer", "print('ok')").stdout == "ok\n"


def test_daemon_and_leftover_subprocess_are_killed_after_the_cell(pool):
    code = (
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "if os.fork() == 0:\n"        # a classic double-fork daemon
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]) > 3)\n")
    r = pool.execute_sync("daemon", code)
    assert r.ok and r.stdout == "True\n", r
    r = pool.execute_sync("daemon", "import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())")
    if HAVE_BWRAP:
        assert r.stdout == "[1, 2]\n"
    # from the host: only the interpreters themselves run under sandbox uids
    workers = set(pool.worker_pids())
    for pid in _host_pids():
        st = _proc_stat(pid)
        if st and UID_BASE <= st[2] < UID_END:
            cmd = open(f"/proc/{pid}/cmdline").read()
            assert "sleep(300)" not in cmd, cmd
    assert workers


@needs_bwrap
def test_filesystem_is_private_and_read_only(pool, tmp_path):
    host_secret = tmp_path / "host_secret.txt"
    host_secret.write_text(SECRET)
    code = (
        "import os\n"
        f"print(os.path.exists({str(host_secret)!r}))\n"
        "print(os.path.exists('/etc/shadow'), os.path.exists('/etc/passwd'))\n"
        "print(os.path.exists('/root/.bashrc'), os.path.exists('/home'))\n"
        "print(os.getcwd(), sorted(os.listdir('/tmp')))\n"
        "open('mine.txt', 'w').write('ok')\n"
        "print(open('mine.txt').read())\n"
        "for target in ('/usr/evil.txt', '/etc/evil.txt', '/evil.txt'):\n"
        "    try:\n"
        "        open(target, 'w').write('x')\n"
        "        print('WROTE', target)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n")
    r = pool.execute_sync("fs", code)
    assert r.ok, r
    lines = r.stdout.splitlines()
    assert lines[0] == "False"
    assert lines[1] == "False False"
    assert lines[2] == "False False"
    # /tmp is private: empty, but for the directories leading to the interpreter when it lives there
    python_tmp = sorted({p.split("/")[2] for p in (sys.prefix, sys.base_prefix) if p.startswith("/tmp/")})
    assert lines[3] == f"/sandbox {python_tmp}"
    assert lines[4] == "ok"
    assert "WROTE" not in r.stdout and len(lines) == 8
    assert not os.path.exists("/usr/evil.txt") and not os.path.exists("/evil.txt")


@needs_bwrap
def test_no_network_not_even_loopback(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = ("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    print('CONNECTED')\nexcept OSError as e:\n    print('refused', type(e).__name__)\n"
                "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('DNS')\n"
                "except OSError:\n    print('no dns')\n")
        r = pool.execute_sync("net", code)
        assert "CONNECTED" not in r.stdout and "refused" in r.stdout and "no dns" in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_parent_environment_does_not_leak(pool):
    code = ("import os\nprint(os.environ.get('IHGRPO_TEST_SECRET'))\n"
            "leak = False\n"
            "for p in os.listdir('/proc'):\n"
            "    try:\n"
            f"        leak |= {SECRET!r} in open(f'/proc/{{p}}/environ', errors='ignore').read()\n"
            "    except OSError:\n"
            "        pass\n"
            "print(leak)")
    r = pool.execute_sync("env", code)
    assert r.stdout == "None\nFalse\n" and SECRET not in r.stdout + r.stderr


@needs_bwrap
def test_runs_unprivileged(pool):
    r = pool.execute_sync("priv", "import os\nprint(os.getuid() != 0, os.geteuid() != 0)\n"
                                  "try:\n    os.setuid(0)\n    print('ROOT')\nexcept OSError:\n    print('denied')")
    assert r.stdout == "True True\ndenied\n"


def test_forged_reply_only_hurts_its_own_session(pool):
    # model code can write to the control pipe (it shares the interpreter's process); a forged
    # reply must be rejected and cost only this session's state
    code = ("import os\nfor fd in range(3, 20):\n    try:\n"
            "        os.write(fd, b'{\"id\": -1, \"stdout\": \"forged\"}\\n')\n    except OSError:\n        pass")
    r = pool.execute_sync("forge", code)
    assert "forged" not in r.stdout
    serving(pool)
    assert pool.execute_sync("forge", "print('fine')").stdout == "fine\n"


# ---------------------------------------------------------------- pool behaviour
def test_async_api_runs_sessions_concurrently():
    async def main():
        async with SandboxPool(max_workers=4, timeout_s=5) as pool:
            await asyncio.gather(*(pool.execute(f"t{i}", "import time") for i in range(4)))
            start = time.monotonic()
            results = await asyncio.gather(
                *(pool.execute(f"t{i}", f"import time\ntime.sleep(0.5)\nprint({i})") for i in range(8)))
            elapsed = time.monotonic() - start
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
            assert elapsed < 2.0  # 8 half-second cells on 4 workers: about 1 s, not 4
            await pool.end_session("t0")
            assert "t0" not in pool.sessions
        await pool.close()  # close() may also be awaited, and is idempotent
    asyncio.run(main())
    assert wait_no_leftovers() == []


def test_execute_sync_from_many_threads():
    with SandboxPool(max_workers=3, timeout_s=5) as pool:
        out: dict[int, str] = {}

        def job(i):
            pool.execute_sync(f"th{i}", f"v = {i} * {i}")
            out[i] = pool.execute_sync(f"th{i}", "print(v)").stdout

        threads = [threading.Thread(target=job, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == {i: f"{i * i}\n" for i in range(6)}
    assert wait_no_leftovers() == []


def test_warm_interpreters_are_ready_before_the_first_call():
    with SandboxPool(max_workers=2, warm=2) as pool:
        deadline = time.monotonic() + 10
        while pool.stats["spawned"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.stats["spawned"] >= 2
        r = pool.execute_sync("w", "1")
        assert r.ok and pool.stats["spawned"] >= 2
        time.sleep(0.5)  # the taken one is replaced in the background
        assert pool.stats["spawned"] >= 3


def test_session_limit_evicts_least_recently_used():
    with SandboxPool(max_workers=1, warm=0, max_sessions=2) as pool:
        pool.execute_sync("a", "x = 'a'")
        pool.execute_sync("b", "x = 'b'")
        pool.execute_sync("c", "x = 'c'")  # evicts "a"
        assert pool.stats["evictions"] == 1
        r = pool.execute_sync("a", "'x' in globals()")
        assert r.state_lost and r.stdout == "False\n"
        assert len(pool.worker_pids()) <= 2


def test_closed_pool_and_bad_arguments():
    pool = SandboxPool(max_workers=1, warm=0)
    with pytest.raises(SandboxError):
        pool.execute_sync("", "1")
    with pytest.raises(TypeError):
        pool.execute_sync("x", b"1")
    pool.close()
    pool.close()
    with pytest.raises(SandboxError, match="closed"):
        pool.execute_sync("x", "1")
    with pytest.raises(ValueError, match="max_workers"):
        SandboxPool(max_workers=0)
    with pytest.raises(ValueError, match="isolation"):
        SandboxPool(isolation="docker")


def test_garbage_collected_pool_leaves_no_process():
    pool = SandboxPool(max_workers=1, warm=1)
    pool.execute_sync("gc", "1")
    pids = pool.worker_pids()
    assert pids
    pool._finalizer()  # what garbage collection or interpreter exit runs
    pool.close()
    assert wait_no_leftovers() == []


def test_missing_bwrap_falls_back_loudly_or_refuses(monkeypatch):
    import ihgrpo.sandbox.isolation as iso

    monkeypatch.setattr(iso.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="not installed"):
        iso.resolve_isolation("bwrap", sys.executable)
    with pytest.warns(RuntimeWarning, match="NOT ISOLATED"):
        assert iso.resolve_isolation("auto", sys.executable) == "none"


# The rlimit-only fallback, as root, drops to an unprivileged uid: it needs an interpreter that
# such a uid can read (this machine's venv lives under /root), so use the system Python.
FALLBACK_PY = "/usr/bin/python3"


@pytest.mark.skipif(not os.path.exists(FALLBACK_PY), reason="no /usr/bin/python3")
def test_fallback_without_namespaces_still_contains_processes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pool = SandboxPool(max_workers=1, warm=0, timeout_s=1.0, isolation="none", python=FALLBACK_PY)
    with pool:
        assert pool.isolation == "none"
        r = pool.execute_sync("f", "import os\nx = 3\nprint(os.environ.get('IHGRPO_TEST_SECRET'), os.getuid() != 0)")
        assert r.stdout == "None True\n", r
        r = pool.execute_sync("f", "import subprocess, sys\n"
                                   "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
                                   " start_new_session=True)\nx")
        assert r.stdout == "3\n"
        assert pool.execute_sync("f", "while True: pass").timed_out
        assert pool.execute_sync("f", "x").stdout == "3\n"
    assert wait_no_leftovers() == []


@pytest.mark.skipif(not os.path.exists(FALLBACK_PY) or os.geteuid() != 0,
                    reason="needs /usr/bin/python3 and root (only root drops to another uid)")
def test_fallback_works_from_a_private_checkout(tmp_path):
    # A checkout inside a 0700 directory: the unprivileged uid the fallback drops to cannot read
    # the package's files, so nothing it runs may need them.
    private = tmp_path / "private"
    shutil.copytree(os.path.dirname(os.path.dirname(sandbox_pkg.__file__)), private / "ihgrpo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(private, 0o700)
    script = ("import warnings\nfrom ihgrpo.sandbox import SandboxPool\n"
              "warnings.simplefilter('ignore')\n"
              f"with SandboxPool(max_workers=1, warm=0, isolation='none', python={FALLBACK_PY!r}) as p:\n"
              "    r = p.execute_sync('s', 'import os\\nprint(6 * 7, os.getuid() != 0)')\n"
              "    print(repr(r.stdout), repr(r.error))\n")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(private)},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "'42 True\\n' ''", out.stdout + out.stderr[-2000:]
