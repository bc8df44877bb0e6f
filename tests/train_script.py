"""A small GRPO run for tests/test_trainer.py (run as a subprocess so it can be SIGKILLed).

    python tests/train_script.py OUT_DIR MAX_STEPS RESUME(0/1) [key=value ...]

The reward favours even-length answers: a random tiny model gets a signal to learn from.
"""

import sys

from ihgrpo.config import load_config
from ihgrpo.data import Example
from ihgrpo.demo.model import build_model
from ihgrpo.demo.tokenizer import build_tokenizer
from ihgrpo.trainer import GRPOTrainer


def reward(answers, golds):  # noqa: ARG001
    return [float(a is not None and len(a) % 2 == 0) for a in answers]


def main(out: str, max_steps: int, resume: bool, *overrides: str) -> None:
    tok = build_tokenizer(n_corpus=40)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    cfg = load_config(None, [
        "model.path=unused", "data.train=unused", f"output_dir={out}", f"max_steps={max_steps}", "save_every=1",
        f"resume={'true' if resume else 'false'}", "seed=7", "prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_response_tokens=24", "rollout.max_turns=2", "rollout.sandbox_workers=1",
        "optim.lr=0.003", "optim.micro_batch_size=4", "algo.reward=exact", "algo.dynamic_sampling=false",
        "log.progress=false", "log.tensorboard=false", *overrides])
    examples = [Example(f"What is {i} + {i}?", str(2 * i), str(i)) for i in range(6)]
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=examples, reward_fn=reward)
    # answers are rarely boxed by a random model: reward the raw text length's parity instead
    orig = trainer.engine.rollout

    def rollout(*a, **k):
        trajs = orig(*a, **k)
        for t in trajs:
            t.answer = "xx" if len(t.response_ids) % 2 == 0 else "x"
        return trajs

    trainer.engine.rollout = rollout
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", *sys.argv[4:])
