"""A small GRPO run for tests/test_trainer.py (run as a subprocess so it can be SIGKILLed).

    python tests/train_script.py OUT_DIR MAX_STEPS RESUME(0/1) [dynamic] [key=value ...]

The reward favours even-length answers: a random tiny model gets a signal to learn from.
`dynamic`: DAPO dynamic sampling over 40 prompts of which every third never has signal, so the
processes of a multi-process run keep different numbers of groups per round; each process
records the prompts it rolls out (prompts-rank{R}.jsonl).
"""

import json
import os
import sys

from ihgrpo.config import load_config
from ihgrpo.data import Example
from ihgrpo.demo.model import build_model
from ihgrpo.demo.tokenizer import build_tokenizer
from ihgrpo.trainer import GRPOTrainer


def reward(answers, golds):  # noqa: ARG001
    return [float(a is not None and len(a) % 2 == 0) for a in answers]


def reward_some_prompts(answers, golds):
    # Prompt i (gold 2i) with i % 3 == 0 never has signal: every reward in its group is 0.
    return [0.0 if int(g) // 2 % 3 == 0 else float(a is not None and len(a) % 2 == 0) for a, g in zip(answers, golds)]


def main(out: str, max_steps: int, resume: bool, *extra: str) -> None:
    dynamic, overrides = "dynamic" in extra, [e for e in extra if e != "dynamic"]
    tok = build_tokenizer(n_corpus=40)
    model = build_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64)
    sampling = (["algo.dynamic_sampling=true", "algo.oversample=3", "prompts_per_step=4"] if dynamic
                else ["algo.dynamic_sampling=false", "prompts_per_step=2"])
    cfg = load_config(None, [
        "model.path=unused", "data.train=unused", f"output_dir={out}", f"max_steps={max_steps}", "save_every=1",
        f"resume={'true' if resume else 'false'}", "seed=7", "rollout.group_size=4",
        "rollout.max_response_tokens=24", "rollout.max_turns=2", "rollout.sandbox_workers=1",
        "optim.lr=0.003", "optim.micro_batch_size=4", "algo.reward=exact", *sampling,
        "log.progress=false", "log.tensorboard=false", *overrides])
    n = 40 if dynamic else 6
    examples = [Example(f"What is {i} + {i}?", str(2 * i), str(i)) for i in range(n)]
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=examples,
                          reward_fn=reward_some_prompts if dynamic else reward)
    # answers are rarely boxed by a random model: reward the raw text length's parity instead
    orig = trainer.engine.rollout

    def rollout(questions, *a, **k):
        if dynamic:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"prompts-rank{trainer.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": trainer.step, "questions": questions}) + "\n")
        trajs = orig(questions, *a, **k)
        for t in trajs:  # dynamic: most responses are cut at the budget, so their length says little
            parity = sum(t.response_ids) if dynamic else len(t.response_ids)
            t.answer = "xx" if parity % 2 == 0 else "x"
        return trajs

    trainer.engine.rollout = rollout
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", *sys.argv[4:])
