"""Persistent, isolated Python interpreters for model-written code.

    from ihgrpo.sandbox import SandboxPool, ExecResult
    pool = SandboxPool(max_workers=4, timeout_s=3.0, memory_mb=1024)
    res = await pool.execute("traj-0", "x = 2\\nprint(x)")   # or pool.execute_sync(...)
"""

from .isolation import SandboxUnavailable
from .pool import ExecResult, SandboxError, SandboxPool

__all__ = ["ExecResult", "SandboxError", "SandboxPool", "SandboxUnavailable"]
