"""bench/gpu_check.py: its whole logic at tiny sizes on CPU (--cpu-smoke), one JSON object, a
failing part reported without losing the others, and a one-line refusal without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_dir(qwen_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3-tokenizer")
    qwen_tokenizer.save_pretrained(d)
    return str(d)


def _report(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one JSON object, nothing else on stdout
    return json.loads(out[0])


def test_cpu_smoke_runs_every_part(gpu_check, tokenizer_dir, capsys):
    pytest.importorskip("peft", reason="the LoRA part needs peft")
    assert gpu_check.main(["--cpu-smoke", "--tokenizer", tokenizer_dir]) == 0
    report = _report(capsys)
    assert report["ok"] and list(report["parts"]) == ["train", "chunked_head", "generate", "lora_8b"]
    train, head, gen, lora = (report["parts"][k] for k in report["parts"])
    assert len(train["steps"]) == 2 and train["finite"]
    assert all(st["grad_norm"] > 0 and st["no_signal"] == 0.0 for st in train["steps"])
    # a bf16 gradient is a percent or so off fp32, not exact and not wildly off
    assert 1e-4 < head["chunked_rel_err_weight"] < 0.05 and 1e-4 < head["autograd_bf16_rel_err_weight"] < 0.05
    assert gen["generate_tokens_per_s"] > 0 and gen["hfgenerator_tokens_per_s"] > 0
    assert lora["steps"][0]["grad_norm"] > 0 and 0 < lora["trainable_params"] < train["trainable_params"] / 100


def test_a_failing_part_keeps_the_others(gpu_check, capsys, monkeypatch):
    def broken(ctx):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(gpu_check.FUNCTIONS, "generate", broken)
    assert gpu_check.main(["--cpu-smoke", "--parts", "generate,chunked_head"]) == 1
    report = _report(capsys)
    assert not report["ok"]
    assert report["parts"]["generate"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert report["parts"]["chunked_head"]["ok"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so_in_one_line():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "no CUDA GPU" in res.stderr and "Traceback" not in res.stderr
