"""The package's structure: import arrows point down, the core knows no demo, modules stay small,
and named sources resolve through the registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ihgrpo
from ihgrpo import registry

SRC = Path(ihgrpo.__file__).resolve().parent

# Lower layers never import higher ones (imports inside a layer are free).
LAYERS = [
    ("ihgrpo.protocol", "ihgrpo.utils", "ihgrpo.registry", "ihgrpo.losses", "ihgrpo.precision", "ihgrpo.rng",
     "ihgrpo.sandbox", "ihgrpo.testing"),
    ("ihgrpo.data", "ihgrpo.models", "ihgrpo.vocab", "ihgrpo.rewards", "ihgrpo.viewer"),
    ("ihgrpo.rollout",),
    ("ihgrpo.config",),
    ("ihgrpo.memory",),
    ("ihgrpo.trainer", "ihgrpo.eval", "ihgrpo.dist", "ihgrpo.lora", "ihgrpo.diagnostics"),
    ("ihgrpo.demo", "ihgrpo.cli", "ihgrpo.evaluate"),
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    if module == "ihgrpo":
        return 0
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py: place it")


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        yield name, package, path


def _imports(package: str, path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [f"{mod}.{a.name}" for a in node.names] if mod == "ihgrpo" else [mod]
            out.update(n for n in names if n.startswith("ihgrpo"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ihgrpo"))
    return out


def test_core_modules_never_import_the_demo():
    """Anything outside ihgrpo/demo and the CLI (the wiring layer) is core."""
    offenders = []
    for name, package, path in _modules():
        if name.startswith("ihgrpo.demo") or name == "ihgrpo.cli":
            continue
        text = path.read_text()
        if "ihgrpo.demo" in text or any(m.startswith("ihgrpo.demo") for m in _imports(package, path)):
            offenders.append(name)
    assert offenders == []


def test_import_arrows_point_down():
    upward = [f"{name} -> {dep}" for name, package, path in _modules()
              for dep in sorted(_imports(package, path)) if _layer(dep) > _layer(name)]
    assert upward == []


def test_no_module_over_700_lines():
    big = {name: n for name, _, path in _modules() if (n := len(path.read_text().splitlines())) > 700}
    assert big == {}


def test_evaluation_without_a_model_imports_no_torch():
    code = ("import sys, ihgrpo.eval, ihgrpo.evaluate, ihgrpo.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------- the registry
def fake_model():
    return "the model", "the tokenizer"


def fake_examples(name, limit=None):
    from ihgrpo.data import Example

    return [Example(f"{name} question {i}", str(i), f"{name}-{i}") for i in range(limit or 3)]


def test_registered_names_resolve_in_the_core():
    from ihgrpo.data import load_examples
    from ihgrpo.models import load_model_and_tokenizer

    registry.register("model", "fake-model", f"{__name__}:fake_model")
    registry.register("dataset", "fake-data", f"{__name__}:fake_examples")
    assert load_model_and_tokenizer("fake-model") == ("the model", "the tokenizer")
    assert [e.question for e in load_examples("fake-data", limit=2)] == ["fake-data question 0",
                                                                         "fake-data question 1"]
    assert "fake-model" in registry.names("model") and registry.lookup("model", "nothing") is None
    with pytest.raises(ValueError, match="not 'module:function'"):
        registry.register("model", "bad", "no-colon")
    with pytest.raises(ValueError, match="unknown source kind"):
        registry.lookup("tokenizer", "x")


def tiny_model():
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=20)
    return build_model(tok, seed=0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, intermediate_size=32), tok


def test_model_dtype_applies_to_a_registered_model():
    import torch

    from ihgrpo.models import load_model_and_tokenizer

    registry.register("model", "fake-tiny", f"{__name__}:tiny_model")
    model, _ = load_model_and_tokenizer("fake-tiny", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model_and_tokenizer("fake-tiny")  # auto: as the source built it
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_demo_registers_its_sources():
    import ihgrpo.demo  # noqa: F401  (what the CLI imports)

    assert "demo" in registry.names("model") and "demo" in registry.names("benchmark")
    assert {"demo", "demo:train", "demo:heldout"} <= set(registry.names("dataset"))
    from ihgrpo.data import load_examples

    train, held = load_examples("demo", limit=5), load_examples("demo:heldout", limit=5)
    assert len(train) == len(held) == 5 and not {e.question for e in train} & {e.question for e in held}
