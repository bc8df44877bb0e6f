"""One GRPO update on fixed trajectories; run by tests/test_trainer.py with 1 and 2 processes.

    python tests/dist_update_script.py OUT.pt [key=value ...]
    accelerate launch --cpu --num_processes 2 tests/dist_update_script.py OUT.pt distributed.strategy=fsdp

Gradients and weights are saved whole (gathered from the shards under FSDP). Then the updated
model's logits and a short generation run inside the strategy's full-parameter context, counting
FSDP's all-gathers on entering it and during the decode steps.
"""

import sys

import torch

from ihgrpo.config import load_config
from ihgrpo.data import Example
from ihgrpo.demo.model import build_model
from ihgrpo.demo.tokenizer import build_tokenizer
from ihgrpo.rollout import SamplingParams, Trajectory
from ihgrpo.trainer import GRPOTrainer


def fixed_trajectories(tok, n: int = 8):
    g = torch.Generator().manual_seed(1234)
    vocab = len(tok)
    e = tok.convert_tokens_to_ids("<tool_call>")
    trajs, adv = [], []
    for i in range(n):
        p = int(torch.randint(3, 8, (1,), generator=g))
        r = int(torch.randint(4, 20, (1,), generator=g))
        resp = torch.randint(5, vocab, (r,), generator=g).tolist()
        if i % 3 == 0:
            resp[r // 2] = e  # some execute tokens, so the surrogate has work to do
        mask = [1] * r
        for j in range(r // 3, r // 3 + 2):
            mask[j] = 0  # an "observation"
        trajs.append(Trajectory(f"t{i}", i // 2, i % 2, torch.randint(5, vocab, (p,), generator=g).tolist(),
                                resp, mask, [0.0] * r))
        adv.append(float(torch.randn(1, generator=g)))
    return trajs, adv


def main(out: str, *overrides: str) -> None:
    tok = build_tokenizer(n_corpus=40)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    cfg = load_config(None, ["model.path=unused", "data.train=unused", "optim.lr=0.01", "optim.micro_batch_size=3",
                             "algo.lam=0.5", "log.tensorboard=false", "log.progress=false", "rollout.group_size=2",
                             "rollout.sandbox_workers=1", "optim.grad_clip=0", "prompts_per_step=2",
                             "algo.reward=exact", "optim.warmup_steps=4", *overrides])
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=[Example("q", "1", "0")])
    try:
        trajs, adv = fixed_trajectories(tok)
        # Uneven shares on purpose (5 and 3 trajectories: 2 and 1 micro-batches), as dynamic
        # sampling can leave them: the update must neither hang nor change.
        cuts = [0, len(trajs)] if trainer.world == 1 else [0, 5, len(trajs)]
        lo, hi = cuts[trainer.rank], cuts[trainer.rank + 1]
        grads = {}
        named = list(trainer._model().named_parameters())
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        inner.register_step_pre_hook(lambda *_: grads.update({n: _whole(p.grad) for n, p in named if p.grad is not None}))
        stats = trainer._update(trajs[lo:hi], adv[lo:hi])
        params = {k: v.detach().clone() for k, v in trainer.dist.model_state_dict(trainer.policy).items()}
        gathers = _count_all_gathers()
        with torch.no_grad(), trainer.dist.full_params(trainer.policy):
            entered = gathers["n"]
            logits = trainer._model()(input_ids=torch.tensor([[5, 9, 12, 7, 30, 31, 8]])).logits
            gen = trainer.generator.generate([[5, 9, 12], [7, 8]], SamplingParams(temperature=1.0, max_new_tokens=12,
                                                                                    seed=3))
            during = gathers["n"] - entered
        if trainer.rank == 0:
            torch.save({"params": params, "grads": grads, "grad_norm": stats["grad_norm"], "lr": stats["lr"],
                        "world": trainer.world, "lockstep": trainer.dist.lockstep, "logits": logits,
                        "gathers_on_entry": entered, "gathers_during_generation": during,
                        "generated": sum(len(o.token_ids) for o in gen)}, out)
    finally:
        trainer.close()


def _count_all_gathers() -> dict:
    import torch.distributed as dist

    count = {"n": 0}
    if not dist.is_initialized():
        return count
    orig = dist.all_gather_single  # what FSDP2's all-gather calls

    def counting(*a, **k):
        count["n"] += 1
        return orig(*a, **k)

    dist.all_gather_single = counting
    return count


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
