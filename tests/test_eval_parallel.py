"""Data-parallel `ihgrpo eval` (torchrun, 2 CPU processes over gloo): the same samples and results as
one process, and a run killed mid-way resumes without redoing a finished sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_trainer import PY, _free_port  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 3 problems x k=2, one sample per batch: 6 grid batches, 3 per rank
ITEMS = ["max_response_tokens=24", "max_turns=2", "sandbox_workers=1", "viewer_samples=2", "k=2", "batch_size=1"]


def _torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(_free_port()), *args], timeout=300, env=ENV,
                         capture_output=True, text=True)
    assert not check or run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return run


def _eval_args(model, bench, out) -> list[str]:
    return ["eval", "--model", str(model), "--benchmark", bench, "--out", str(out), *ITEMS]


def _rows(out: Path) -> set[str]:
    lines = (out / "samples.jsonl").read_text().splitlines()
    rows = {json.dumps(json.loads(line), sort_keys=True) for line in lines}
    assert len(rows) == len(lines) == 6
    return rows


def _results(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    return {key: value for key, value in res.items() if key != "timing"}


def _finished(out: Path) -> dict[tuple, str]:
    """The complete lines in the ledger and its shards (a killed append may leave a partial one)."""
    done = {}
    for path in out.glob("samples*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            done[(rec["benchmark"], rec["problem"], rec["sample"])] = json.dumps(rec, sort_keys=True)
    return done


@pytest.fixture
def arith(tmp_path) -> str:
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "What is 2 + 3?", "answer": "5"},
                                                           {"question": "What is 7 times 6?", "answer": "42"},
                                                           {"question": "What is 10 - 4?", "answer": "6"}]))
    return f"arith={path}"


def test_two_processes_equal_one_and_resume_after_a_kill(tiny, arith, tmp_path):
    model = tiny[0]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    subprocess.run([PY, "-m", "ihgrpo.cli", *_eval_args(model, arith, one)], check=True, timeout=300, env=ENV,
                   capture_output=True)
    run = _torchrun("-m", "ihgrpo.cli", *_eval_args(model, arith, two))
    assert _rows(two) == _rows(one)  # same seeds, same batch compositions: the same samples
    assert "data-parallel: 2 processes, 6 samples to generate" in run.stdout
    assert "[rank 1]" in run.stdout  # rank 1 did its share
    assert _results(two) == _results(one)
    assert json.loads((two / "results.json").read_text())["timing"]["samples_generated"] == 6
    assert not list(two.glob("samples.rank*"))  # merged into samples.jsonl
    for name in ("results.md", "rollouts.html", "eval_settings.json"):
        assert (two / name).read_text() == (one / name).read_text()

    # rank 1 dies after its first batch; torchrun stops rank 0 wherever it is
    dead = _torchrun(str(HERE / "eval_kill_script.py"), str(model), arith, str(killed), *ITEMS, check=False)
    assert dead.returncode != 0
    assert list(killed.glob("samples.rank*.jsonl"))
    finished = _finished(killed)
    assert 1 <= len(finished) < 6
    reference = _finished(one)
    assert all(reference[key] == row for key, row in finished.items())
    # with a partial line: an append cut short
    with open(killed / "samples.rank1.jsonl", "a") as f:
        f.write('{"benchmark": "arith", "problem": 2, "sam')
    other_w = tmp_path / "killed-then-1-process"
    shutil.copytree(killed, other_w)

    again = _torchrun("-m", "ihgrpo.cli", *_eval_args(model, arith, killed))
    assert f"resuming: {len(finished)} samples" in again.stdout
    res = json.loads((killed / "results.json").read_text())
    assert res["timing"]["samples_generated"] == 6 - len(finished)  # nothing finished is redone
    assert _rows(killed) == _rows(one)
    assert _results(killed) == _results(one)
    assert not list(killed.glob("samples.rank*"))

    # another number of processes resumes too: one process takes in the shards first
    from ihgrpo.config import load_eval_config
    from ihgrpo.eval import run_eval

    cfg = load_eval_config(None, [f"model={model}", *ITEMS])
    res1 = run_eval(cfg, other_w, benchmarks=[arith], echo=lambda msg: None, progress=False)
    assert res1["timing"]["samples_generated"] == 6 - len(finished)
    assert not list(other_w.glob("samples.rank*"))
    rows = _finished(other_w)
    assert len(rows) == 6 and all(rows[key] == row for key, row in finished.items())


def test_each_process_gets_its_own_vllm_engine():
    """The vLLM path is not run here (no vLLM): its options are. Several evaluation processes start one
    independent engine each (vLLM's external launcher), never sleeping; one process starts a plain one."""
    from ihgrpo.config import load_eval_config
    from ihgrpo.rollout.backends import vllm_options

    rollout = load_eval_config().rollout
    one = vllm_options(rollout, dtype="bfloat16", seed=0)
    two = vllm_options(rollout, dtype="bfloat16", seed=0, rank=1, world=2)
    assert "distributed" not in one and two["distributed"] is True
    assert "sleep_level" not in two and "workdir" not in two
