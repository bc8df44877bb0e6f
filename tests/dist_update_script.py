"""One GRPO update on fixed trajectories; run by tests/test_trainer.py with 1 and 2 processes.

    python tests/dist_update_script.py OUT.pt
    accelerate launch --cpu --num_processes 2 tests/dist_update_script.py OUT.pt
"""

import sys

import torch

from ihgrpo.config import load_config
from ihgrpo.data import Example
from ihgrpo.demo.model import build_model
from ihgrpo.demo.tokenizer import build_tokenizer
from ihgrpo.rollout import Trajectory
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


def main(out: str, aggregation: str) -> None:
    tok = build_tokenizer(n_corpus=40)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    cfg = load_config(None, ["model.path=unused", "data.train=unused", "optim.lr=0.01", "optim.micro_batch_size=3",
                             "algo.lam=0.5", "log.tensorboard=false", "log.progress=false", "rollout.group_size=2",
                             "rollout.sandbox_workers=1", "optim.grad_clip=0", f"algo.aggregation={aggregation}",
                             "prompts_per_step=2", "algo.reward=exact",
                             "optim.warmup_steps=4"])
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
        inner.register_step_pre_hook(lambda *_: grads.update({n: p.grad.detach().clone() for n, p in named}))
        stats = trainer._update(trajs[lo:hi], adv[lo:hi])
        if trainer.rank == 0:
            params = {k: v.detach().clone() for k, v in trainer._model().state_dict().items()}
            torch.save({"params": params, "grads": grads, "grad_norm": stats["grad_norm"], "lr": stats["lr"],
                        "world": trainer.world}, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "token-mean")
