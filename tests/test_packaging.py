"""pyproject's dependency floors admit only versions that have the APIs the code calls.

Each floor below was checked by running the tests against that version and the one before it
(see the comments); the table is the record, so a floor cannot drop below it unnoticed.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

NEEDED = {
    # from_pretrained(dtype=...) is 4.56.0 (4.55: "__init__() got an unexpected keyword argument
    # 'dtype'", so no model loads); CausalLM.get_decoder() returns None in 4.56.0-4.56.1 (the
    # policy's forward fails), fixed in 4.56.2. Qwen3 itself needs 4.51.
    "transformers": "4.56.2",
    # Accelerator(cpu=, mixed_precision=), prepare, no_sync, backward, clip_grad_norm_,
    # reduce(reduction="sum"), unwrap_model, wait_for_everyone: all in 1.0.0 (tests pass on it).
    "accelerate": "1.0",
    # inference_mode, autocast("cpu"/"cuda"), torch.load(weights_only=True), isin, searchsorted:
    # older than 2.4; 2.4 is kept as the floor (not tested below the installed build).
    "torch": "2.4",
}


def _floors() -> dict[str, Version]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        req = Requirement(dep)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            floors[req.name] = max(lows)
    return floors


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_dependency_floor_has_the_apis_we_use(name):
    floor = _floors().get(name)
    assert floor is not None and floor >= Version(NEEDED[name]), \
        f"pyproject allows {name} {floor}, but the code needs {name}>={NEEDED[name]}"
    assert Version(importlib.metadata.version(name)) >= floor  # the environment under test obeys it
