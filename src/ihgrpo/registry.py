"""Named sources: the models, datasets and benchmarks that a name (not a path) stands for.

The core never imports an application such as the demo. Instead, a package registers
``"module:function"`` strings under a name, and the core resolves the name on use::

    registry.register("model", "tiny", "mypackage.models:build_tiny")
    registry.lookup("model", "tiny")  # -> the function (its module imported now), or None

Signatures by kind: ``model``: ``f() -> (model, tokenizer)``; ``dataset``: ``f(name, limit=None)
-> list[Example]``; ``benchmark``: ``f(name, cfg: EvalConfig) -> Benchmark``. The demo package
registers its sources when imported; the command line (``ihgrpo.cli``) imports it.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

__all__ = ["KINDS", "register", "lookup", "names"]

KINDS = ("model", "dataset", "benchmark")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_entries: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}


def _kind(kind: str) -> dict[str, str]:
    if kind not in _entries:
        raise ValueError(f"unknown source kind {kind!r} (use one of {', '.join(KINDS)})")
    return _entries[kind]


def register(kind: str, name: str, target: str) -> None:
    """Names ``target`` (``"package.module:function"``) as the ``kind`` source ``name``.
    Registering a name again replaces it."""
    if not _TARGET.fullmatch(target):
        raise ValueError(f"register({kind!r}, {name!r}): target {target!r} is not 'module:function'")
    _kind(kind)[name] = target


def names(kind: str) -> list[str]:
    return sorted(_kind(kind))


def lookup(kind: str, name: str) -> Callable | None:
    """The function registered as ``name`` (importing its module now), or None when none is.
    An ImportError of the module propagates: the caller says what was unavailable."""
    target = _kind(kind).get(name)
    if target is None:
        return None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)
