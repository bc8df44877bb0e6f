"""The GRPO loop: advantages, batches, a real run, SIGKILL + resume, two processes = one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ihgrpo.config import load_config
from ihgrpo.data import Example
from ihgrpo.rollout import Trajectory
from ihgrpo.trainer import GRPOTrainer, collate, group_advantages

HERE = Path(__file__).resolve().parent
PY = sys.executable


def test_group_advantages():
    adv = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], 4)
    assert adv[:4] == pytest.approx([1, -1, -1, 1], abs=1e-5)
    assert adv[4:] == [0.0] * 4  # no signal in an all-equal group
    dr = group_advantages([1, 0, 0, 0], 4, std_normalize=False)
    assert dr == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_collate_aligns_labels_and_masks():
    t = Trajectory("a", 0, 0, [10, 11], [20, 21, 22, 23], [1, 0, 0, 1], [0.0] * 4)
    u = Trajectory("b", 0, 1, [10], [30, 31], [1, 1], [0.0] * 2)
    b = collate([t, u], [0.5, -0.5], pad_id=0, keep=[True, False], execute_token_id=21)
    assert b.input_ids.tolist() == [[10, 11, 20, 21, 22, 23], [10, 30, 31, 0, 0, 0]]
    assert b.labels.tolist()[0] == [11, 20, 21, 22, 23]
    # position t predicts labels[t]: only the sampled response tokens train; u is dropped (keep=False)
    assert b.mask.tolist() == [[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert b.advantages.tolist() == [0.5, -0.5]


def _tiny(tok_corpus=40):
    from ihgrpo.demo.model import build_model
    from ihgrpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(n_corpus=tok_corpus)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return tok, model


def _cfg(tmp_path, *extra):
    return load_config(None, ["model.path=unused", "data.train=unused", f"output_dir={tmp_path}", "max_steps=2",
                              "prompts_per_step=2", "rollout.group_size=4", "rollout.max_response_tokens=24",
                              "rollout.max_turns=2", "rollout.sandbox_workers=1", "optim.lr=0.003",
                              "algo.reward=exact", "log.progress=false", "log.tensorboard=false", *extra])


EXAMPLES = [Example(f"What is {i} + {i}?", str(2 * i), str(i)) for i in range(6)]


def test_training_steps_update_the_policy_and_log(tmp_path):
    tok, model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    flip = iter(range(10**6))

    def reward(answers, golds):  # noqa: ARG001 - alternate rewards: every group has signal
        return [float(next(flip) % 2) for _ in answers]

    trainer = GRPOTrainer(_cfg(tmp_path), model=model, tokenizer=tok, examples=EXAMPLES, reward_fn=reward)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    assert [m["step"] for m in history] == [1, 2]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("loss/policy_loss", "loss/surrogate", "loss/clip_frac", "grad_norm", "reward",
                "rollout/delay_call_rate", "rollout/turns_per_trajectory", "rollout/tool_calls_per_trajectory",
                "rollout/response_tokens", "time_rollout_s", "time_update_s", "lr", "groups_kept"):
        assert key in lines[0], key
    assert lines[0]["groups_kept"] == 2 and lines[0]["reward"] == 0.5
    ck = tmp_path / "checkpoints" / "step-00000002"
    assert (ck / "state.json").exists() and (ck / "optimizer.pt").exists()
    assert any((ck / "model").glob("*.safetensors")) and (ck / "model" / "tokenizer.json").exists()


def test_batch_without_signal_says_so_and_moves_on(tmp_path, caplog):
    tok, model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPOTrainer(_cfg(tmp_path, "algo.oversample=2"), model=model, tokenizer=tok, examples=EXAMPLES,
                          reward_fn=lambda a, g: [0.0] * len(a))
    try:
        with caplog.at_level("WARNING"):
            history = trainer.train()
    finally:
        trainer.close()
    assert [m["no_signal"] for m in history] == [1.0, 1.0]
    assert [m["groups_rolled"] for m in history] == [4, 4]  # oversampled 2x, then gave up
    assert "no group had differing rewards" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _strip_time(lines):
    return [{k: v for k, v in json.loads(x).items() if "time" not in k} for x in lines]


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    script = str(HERE / "train_script.py")
    subprocess.run([PY, script, str(full), "4", "0"], check=True, timeout=300)
    proc = subprocess.Popen([PY, script, str(killed), "4", "0"], start_new_session=True)
    target = killed / "checkpoints" / "step-00000002"
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended before its second checkpoint"
    assert not (killed / "checkpoints" / "step-00000004").exists()
    subprocess.run([PY, script, str(killed), "4", "1"], check=True, timeout=300)
    a = (full / "metrics.jsonl").read_text().splitlines()
    b = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(a) == 4
    assert _strip_time(a) == _strip_time(b)  # bit for bit, time fields aside


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_gradients_like_one(tmp_path):
    """gloo on CPU: the processes hold uneven shares of the trajectories (5 and 3); the averaged
    gradient and the update equal the 1-process ones, and nothing hangs."""
    script = str(HERE / "dist_update_script.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([PY, script, str(one)], check=True, timeout=300)
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), script, str(two)]
    subprocess.run(torchrun, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    # Warm-up over 4 steps: one step done -> 2/4 of the base rate, on 1 process as on 2 (a scheduler
    # prepared by accelerate steps once per process per call: warm-up N times too fast).
    assert a["lr"] == b["lr"] == pytest.approx(0.01 * 2 / 4)
    assert a["grads"] and a["grads"].keys() == b["grads"].keys()
    for k in a["grads"]:  # the averaged gradient itself (Adam's first step only shows its sign)
        torch.testing.assert_close(b["grads"][k], a["grads"][k], rtol=1e-4, atol=1e-7)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-5)
    _, model = _tiny()
    assert any(not torch.equal(a["params"][k], v) for k, v in model.state_dict().items())  # it did train


def test_missing_model_path_is_a_clear_error(tmp_path, capsys):
    from ihgrpo.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n')
    assert main(["train", "qwen3-1.7b", f"model.path={tmp_path}/no-model", f"data.train={data}"]) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "does not exist" in err and err.count("\n") == 1


def _launch_two(script: str, *args: str) -> list[subprocess.Popen]:
    """Two processes of a gloo job in one new process group (one SIGKILL of the group kills the job);
    the environment torchrun would set, without torchrun's per-worker sessions."""
    port = str(_free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        group = {"process_group": 0 if rank == 0 else procs[0].pid}
        procs.append(subprocess.Popen([PY, script, *args], env=env, **group))
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Both exit 0; a job that hangs (ranks out of step in a collective) is killed and fails."""
    try:
        for p in procs:
            assert p.wait(timeout=timeout) == 0
    finally:
        _kill(procs)


def _kill(procs: list[subprocess.Popen]) -> None:
    if any(p.poll() is None for p in procs):
        os.killpg(procs[0].pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def test_two_processes_dynamic_sampling_share_prompts_and_resume_after_sigkill(tmp_path):
    """Dynamic sampling on 2 processes: ranks keep different numbers of groups per round (every third
    prompt has no signal), yet (a) no prompt is rolled out on both ranks in a step, and (b) a job
    SIGKILLed after its 2nd checkpoint resumes into exactly the uninterrupted run's metrics."""
    script = str(HERE / "train_script.py")
    full, killed = tmp_path / "full", tmp_path / "killed"
    _wait_all(_launch_two(script, str(full), "3", "0", "dynamic"))

    by_rank = []
    for rank in range(2):
        steps: dict[int, list[str]] = {}
        for line in (full / f"prompts-rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec["questions"])
        by_rank.append(steps)
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == [0, 1, 2]
    for step in range(3):
        a, b = by_rank[0][step], by_rank[1][step]
        assert len(a) == len(set(a)) and len(b) == len(set(b))
        assert not set(a) & set(b), f"step {step}: prompts rolled out on both ranks: {set(a) & set(b)}"
    assert any(len(by_rank[0][s]) + len(by_rank[1][s]) > 4 for s in range(3))  # oversampling rounds happened
    assert all(len(by_rank[0][s]) == len(by_rank[1][s]) for s in range(3))  # one block size for all ranks

    procs = _launch_two(script, str(killed), "3", "0", "dynamic")
    target = killed / "checkpoints" / "step-00000002"
    deadline = time.monotonic() + 240
    while not target.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill(procs)
    assert target.exists(), "the run ended before its second checkpoint"
    assert not (killed / "checkpoints" / "step-00000003").exists()
    _wait_all(_launch_two(script, str(killed), "3", "1", "dynamic"))
    a = (full / "metrics.jsonl").read_text().splitlines()
    b = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(a) == 3
    assert _strip_time(a) == _strip_time(b)


def test_gradients_left_on_a_model_handed_in_do_not_leak_into_the_update(tmp_path):
    """The demo trained its SFT start in memory: its last gradients stayed on the parameters and
    the first RL update added them in, so a fresh start and the same weights reloaded differed."""
    def reward(answers, golds):  # noqa: ARG001
        return [float(i % 2) for i in range(len(answers))]

    weights = {}
    for name in ("clean", "stale"):
        tok, model = _tiny()
        if name == "stale":
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.5)
        trainer = GRPOTrainer(_cfg(tmp_path / name, "max_steps=1"), model=model, tokenizer=tok,
                              examples=EXAMPLES, reward_fn=reward)
        try:
            trainer.train()
        finally:
            trainer.close()
        weights[name] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights["clean"], weights["stale"]))


def test_groups_with_too_few_complete_rollouts_are_dropped(tmp_path):
    """algo.min_valid (the release's min_n): a group needs that many non-truncated rollouts."""
    tok, model = _tiny()
    cfg = _cfg(tmp_path, "max_steps=1", "algo.min_valid=2", "algo.dynamic_sampling=false",
               "rollout.max_response_tokens=6", "rollout.max_turns=1", "prompts_per_step=3")
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=EXAMPLES,
                          reward_fn=lambda a, g: [float(i % 2) for i in range(len(a))])
    seen = []
    real = trainer.engine.rollout

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(out)
        return out

    trainer.engine.rollout = spy
    try:
        [m] = trainer.train()
    finally:
        trainer.close()
    groups = [seen[g:g + 4] for g in range(0, len(seen), 4)]
    complete = [sum(not t.truncated for t in grp) for grp in groups]
    assert len(groups) == 3 and any(c < 2 for c in complete)  # a random model rarely stops in 6 tokens
    assert m["groups_kept"] == sum(c >= 2 for c in complete)
    assert m["groups_dropped_truncated"] == sum(c < 2 for c in complete)
