"""FSDP2 on CPU/gloo with two processes: the update equals one process's, a training run equals
DDP's, resume after a kill reproduces the uninterrupted run, and a rollout gathers the weights
once (not once per decode step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_trainer import PY, _free_port, _strip_time  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(script: str, *args: str, timeout: int = 300) -> None:
    subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port()), str(HERE / script), *args],
                   check=True, timeout=timeout, env=ENV)


def test_fsdp_lora_update_equals_one_process(tmp_path):
    """LoRA under FSDP, uneven shares (5 and 3 trajectories: 2 and 1 micro-batches): the rank with
    fewer runs a zero-weight pass so that FSDP's collectives pair up; the gathered gradient and the
    update equal the 1-process ones. (Each rank initialises its adapters from its own seed: without
    rank 0's weights broadcast before sharding, the shards would mix two different inits.)"""
    pytest.importorskip("peft", reason="needs the peft package (pip install 'ihgrpo[lora]')")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([PY, str(HERE / "dist_update_script.py"), str(one), "lora.r=4"], check=True, timeout=300,
                   env=ENV)
    _torchrun("dist_update_script.py", str(two), "lora.r=4", "distributed.strategy=fsdp")
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"], b["lockstep"]) == (1, 2, True)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and all("lora_" in k for k in a["grads"])
    for k in a["grads"]:
        torch.testing.assert_close(b["grads"][k], a["grads"][k], rtol=1e-4, atol=1e-7)
    assert set(a["params"]) <= set(b["params"])
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-5)
    # Generation with sharded weights: one all-gather per FSDP unit (the root and the one block)
    # on entering the context, none in 2 x 12 decode steps; the gathered model is the updated one.
    assert b["gathers_on_entry"] == 2 and b["gathers_during_generation"] == 0 and b["generated"] == 24
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-5)


def test_fsdp_run_and_resume_match_ddp(tmp_path):
    """Two steps with two processes under DDP; under FSDP one step, then a resumed second: the
    metrics agree (the same rollouts, the update up to float rounding), and the FSDP checkpoint
    is a whole model that loads like any other."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun("train_script.py", str(ddp), "2", "0")
    _torchrun("train_script.py", str(fsdp), "1", "0", "distributed.strategy=fsdp")
    _torchrun("train_script.py", str(fsdp), "2", "1", "distributed.strategy=fsdp")
    a = _strip_time((ddp / "metrics.jsonl").read_text().splitlines())
    b = _strip_time((fsdp / "metrics.jsonl").read_text().splitlines())
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), k
    assert b[1]["grad_norm"] > 0  # the resumed step trained
    from ihgrpo.models import load_model_and_tokenizer

    m_ddp, _ = load_model_and_tokenizer(str(ddp / "checkpoints" / "step-00000002"))
    m_fsdp, _ = load_model_and_tokenizer(str(fsdp / "checkpoints" / "step-00000002"))
    for (k, v), (k2, v2) in zip(m_ddp.state_dict().items(), m_fsdp.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-4, atol=1e-5)


def test_fsdp_cpu_offload_in_one_process_equals_the_plain_update(tmp_path):
    """cpu_offload in a plain one-process run (no launcher, so no process group: FSDP starts a
    1-process one) shards, offloads and gives the plain update."""
    plain, offload = tmp_path / "plain.pt", tmp_path / "offload.pt"
    for out, extra in ((plain, []), (offload, ["distributed.strategy=fsdp", "distributed.cpu_offload=true"])):
        subprocess.run([PY, str(HERE / "dist_update_script.py"), str(out), *extra], check=True, timeout=300, env=ENV)
    a, b = torch.load(plain), torch.load(offload)
    assert (a["world"], b["world"], a["lockstep"], b["lockstep"]) == (1, 1, False, True)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-5)


def test_an_accelerate_fsdp_config_is_refused_with_the_fix():
    """accelerate's own FSDP mode would wrap the model itself; the one-line error says what to launch."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ihgrpo.config import ConfigError, DistributedSection
    from ihgrpo.dist import FSDPStrategy, make_strategy

    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=8)
    with pytest.raises(ConfigError, match="MULTI_GPU.*distributed.strategy=fsdp"):
        make_strategy(DistributedSection(strategy="fsdp"), fake)
    fake.distributed_type = DistributedType.MULTI_GPU
    assert isinstance(make_strategy(DistributedSection(strategy="fsdp"), fake), FSDPStrategy)
    from ihgrpo.config import load_config

    with pytest.raises(ConfigError, match="rollout.backend=hf"):  # not a silent mix of shards and vLLM
        load_config(None, ["distributed.strategy=fsdp", "rollout.backend=vllm"])


@pytest.mark.parametrize("name", ["1node-8gpu", "multinode-8gpu"])
def test_shipped_accelerate_configs_load(name):
    """What `accelerate launch --config_file` reads: MULTI_GPU (ihgrpo shards), 8 processes a node."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(HERE.parent / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type == "MULTI_GPU" and cfg.mixed_precision == "bf16"
    assert cfg.num_processes == 8 * cfg.num_machines
