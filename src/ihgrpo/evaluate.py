"""Deprecated location: evaluation is the package :mod:`ihgrpo.eval` (this shim goes in a later release)."""

from ihgrpo.eval import *  # noqa: F401,F403
from ihgrpo.eval import __all__  # noqa: F401
