"""SFT warm start for the demo: program-written traces of the delayed protocol, and a trainer.

A trace is exactly what the rollout engine would build if the policy wrote the trace's turns:

* prompt ids: ``ChatFormat(tokenizer).prompt_ids(build_prompt(question, instruction=DEMO_INSTRUCTION))``;
* each model turn: the ids of its text (encoded on its own: a turn starts after an observation),
  ending in the execute token ``<tool_call>`` or, for the last turn, in EOS (mask 1);
* each observation: ``ChatFormat.observation_ids`` of the result of running the turn's pending
  code (mask 0), the engine's own path.

The code runs in-process (it is our own generated code), in an interpreter that follows the
sandbox worker's rules (notebook namespace, last bare expression printed, the error line of
``traceback.format_exception_only``); a test checks that the observations equal the sandbox's.

Styles (how often the policy executes), so that RL has something to improve:

* ``stepwise``: one block per step, each followed by ``<tool_call>`` (k + 1 turns for k steps);
* ``deferred``: every block, then one ``<tool_call>`` (2 turns);
* ``grouped``: a few blocks (2 or 3) per execution;
* ``error_fix``: deferred, but one block refers to its own variable (a NameError); the model
  reads the error and rewrites that block and the ones after it (3 turns).

Under the demo's turn cap (4 or 5 generation turns) a stepwise policy runs out of turns on long
problems, while a deferring one always fits: RL can raise accuracy by learning to defer.
Only the last block prints (the answer's variable); the final turn is ``\\boxed{<answer>}``.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import math
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ihgrpo.protocol import EXECUTE_TOKEN, build_prompt, extract_boxed, format_observation
from ihgrpo.sandbox import ExecResult

from .task import Problem, TaskConfig, generate_problems

__all__ = ["DEMO_INSTRUCTION", "STYLES", "DEFAULT_STYLE_WEIGHTS", "LocalInterpreter", "plan_turns",
           "trace_texts", "Trace", "build_trace", "build_traces", "sample_style", "SFTConfig",
           "SFTResult", "collate", "train_sft", "teacher_forced_accuracy", "decision_positions", "score_answer",
           "evaluate_model", "demo_rollout_config"]

# Short on purpose: a long instruction would dominate a tiny model's context.
DEMO_INSTRUCTION = r"Python blocks wait until {execute_token} runs them. Answer in \boxed{}."

STYLES = ("stepwise", "deferred", "grouped", "error_fix")
# Mostly stepwise: the SFT policy then executes after every block (greedy decoding does), which
# runs out of turns on problems longer than max_turns - 1 steps. The other styles keep deferring
# in the policy's support, so RL can find it and learn it.
DEFAULT_STYLE_WEIGHTS = {"stepwise": 0.7, "deferred": 0.14, "grouped": 0.08, "error_fix": 0.08}

_CELL = "<cell>"


# ----------------------------------------------------------------------------- execution

class LocalInterpreter:
    """A persistent in-process interpreter with the sandbox worker's observable behaviour.

    Only for the trusted, program-generated code of SFT traces: model code goes to the sandbox.
    """

    def __init__(self) -> None:
        self.namespace: dict = {"__name__": "__main__", "__builtins__": builtins}

    def run(self, code: str) -> ExecResult:
        out, err = io.StringIO(), io.StringIO()
        ok, error = True, ""
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                tree = ast.parse(code, filename=_CELL, mode="exec")
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = ast.Expression(body=tree.body.pop().value)
                exec(compile(tree, _CELL, "exec"), self.namespace)
                if last is not None:
                    value = eval(compile(last, _CELL, "eval"), self.namespace)
                    if value is not None:
                        print(repr(value))
            except Exception as exc:  # noqa: BLE001 - report like the worker
                ok = False
                error = traceback.format_exception_only(type(exc), exc)[-1].strip()
                err.write(error + "\n")
        return ExecResult(stdout=out.getvalue(), stderr=err.getvalue(), ok=ok, error=error,
                          duration_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- trace text

def _block(code: str) -> str:
    return f"```python\n{code}\n```\n"


def _groups(k: int, rng: random.Random) -> list[int]:
    """Sizes of the executions of a grouped trace: 2 or 3 blocks each (the last may be 1), and
    at least two executions when there are at least two blocks."""
    sizes, left = [], k
    while left > 0:
        s = min(left, rng.choice((2, 3)))
        sizes.append(s)
        left -= s
    if len(sizes) == 1 and k > 1:
        sizes = [k - 1, 1]
    return sizes


def _final_answer(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def plan_turns(problem: Problem, style: str, rng: random.Random,
               execute_token: str = EXECUTE_TOKEN) -> list[str]:
    """The model's turn texts (EOS not included). Every turn but the last ends in the execute
    token; the last one gives the answer. The error_fix style's mistake is in these texts."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {STYLES}")
    steps = problem.steps
    k = len(steps)
    codes = [s.code for s in steps]
    codes[-1] += f"\nprint({steps[-1].name})"
    blocks = [_block(c) for c in codes]
    if style == "stepwise":
        sizes = [1] * k
    elif style == "grouped":
        sizes = _groups(k, rng)
    else:
        sizes = [k]
    turns, i = [], 0
    for s in sizes:
        turns.append("".join(blocks[i:i + s]) + execute_token)
        i += s
    if style == "error_fix":
        candidates = [j for j in range(1, k) if re.search(rf"\b{steps[j - 1].name}\b", steps[j].expr)]
        if candidates:
            j = rng.choice(candidates)
            prev, cur = steps[j - 1].name, steps[j].name
            wrong = re.sub(rf"\b{prev}\b", cur, steps[j].expr, count=1)
            bad = blocks[:j] + [_block(f"{cur} = {wrong}" + (codes[j][len(steps[j].code):]))] + blocks[j + 1:]
            turns = ["".join(bad) + execute_token, "".join(blocks[j:]) + execute_token]
    turns.append(_final_answer(problem.answer))
    return turns


def _pending(turn_text: str, execute_token: str) -> str | None:
    from ihgrpo.protocol import pending_code

    return pending_code(turn_text, execute_token=execute_token)


def _run_turns(turns: list[str], execute_token: str) -> list[ExecResult | None]:
    """The result of each turn but the last (None: nothing was pending), in one interpreter."""
    interp = LocalInterpreter()
    results = []
    for text in turns[:-1]:
        code = _pending(text, execute_token)
        results.append(interp.run(code) if code is not None else None)
    return results


def trace_texts(problem: Problem, style: str, rng: random.Random, *,
                execute_token: str = EXECUTE_TOKEN, max_chars: int = 2048):
    """(turn texts, observation texts, execution results) of one trace, code run in-process.

    Observation texts are ``format_observation`` of the results (before token-level capping,
    which never applies to these short outputs)."""
    turns = plan_turns(problem, style, rng, execute_token)
    results = _run_turns(turns, execute_token)
    observations = [format_observation(r, max_chars=max_chars, nothing_pending=r is None) for r in results]
    return turns, observations, results


# ----------------------------------------------------------------------------- token traces

@dataclass
class Trace:
    """One SFT example, token for token what the rollout engine would build."""

    problem: Problem
    style: str
    prompt_ids: list[int]
    turn_ids: list[list[int]]  # the model's turns; the last ends in EOS
    observation_ids: list[list[int]]  # after each turn but the last
    turn_texts: list[str] = field(default_factory=list)
    observation_texts: list[str] = field(default_factory=list)

    @property
    def response_ids(self) -> list[int]:
        out: list[int] = []
        for i, t in enumerate(self.turn_ids):
            out += t
            if i < len(self.observation_ids):
                out += self.observation_ids[i]
        return out

    @property
    def mask(self) -> list[int]:
        """Per response token: 1 for model tokens, 0 for observation tokens (as the engine)."""
        out: list[int] = []
        for i, t in enumerate(self.turn_ids):
            out += [1] * len(t)
            if i < len(self.observation_ids):
                out += [0] * len(self.observation_ids[i])
        return out

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def n_turns(self) -> int:
        return len(self.turn_ids)

    @property
    def model_text(self) -> str:
        return "".join(self.turn_texts)


def build_trace(problem: Problem, style: str, chat, rng: random.Random, *,
                instruction: str = DEMO_INSTRUCTION, max_observation_tokens: int = 256,
                observation_max_chars: int = 2048) -> Trace:
    """A :class:`Trace`; ``chat`` is the engine's :class:`~ihgrpo.rollout.ChatFormat` (or a
    tokenizer, wrapped in one). Observation limits must match the RolloutConfig's."""
    chat = _chat(chat)
    tok = chat.tokenizer
    prompt = chat.prompt_ids(build_prompt(problem.question, instruction=instruction,
                                          execute_token=chat.execute_token))
    turns = plan_turns(problem, style, rng, chat.execute_token)
    turn_ids, obs_ids, obs_texts = [], [], []
    for i, text in enumerate(turns):
        ids = tok.encode(text, add_special_tokens=False)
        if i == len(turns) - 1:
            ids = ids + [chat.eos_token_ids[0]]
        elif not ids or ids[-1] != chat.execute_token_id:
            raise AssertionError("a turn must end in the execute token")
        turn_ids.append(ids)
    for result in _run_turns(turns, chat.execute_token):
        otext, oids = chat.observation_ids(result, nothing_pending=result is None,
                                           max_tokens=max_observation_tokens, max_chars=observation_max_chars)
        obs_ids.append(oids)
        obs_texts.append(otext)
    return Trace(problem, style, prompt, turn_ids, obs_ids, turns, obs_texts)


def _chat(chat_or_tokenizer):
    from ihgrpo.rollout import ChatFormat

    return chat_or_tokenizer if isinstance(chat_or_tokenizer, ChatFormat) else ChatFormat(chat_or_tokenizer)


def sample_style(rng: random.Random, weights: dict[str, float] | None = None) -> str:
    weights = weights or DEFAULT_STYLE_WEIGHTS
    names = [s for s in STYLES if weights.get(s, 0) > 0]
    return rng.choices(names, [weights[s] for s in names])[0]


def build_traces(problems: list[Problem], tokenizer, *, seed: int = 0,
                 style_weights: dict[str, float] | None = None, style: str | None = None,
                 instruction: str = DEMO_INSTRUCTION) -> list[Trace]:
    """One trace per problem; styles drawn from ``style_weights`` (or all ``style``)."""
    rng = random.Random(f"ihgrpo-sft-{seed}")
    chat = _chat(tokenizer)
    return [build_trace(p, style or sample_style(rng, style_weights), chat, rng, instruction=instruction)
            for p in problems]


# ----------------------------------------------------------------------------- training

@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3  # 3e-3 never formed the copying circuit in 300 steps
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 20
    # A short copying curriculum first (see copy_warmup): without it the model needs about twice
    # the trace steps before it copies numbers at all.
    copy_steps: int = 300
    copy_batch_size: int = 32
    copy_lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    style_weights: dict[str, float] | None = None  # None: DEFAULT_STYLE_WEIGHTS
    task: TaskConfig | None = None
    log_every: int = 10
    max_time_s: float | None = None  # stop early once training has run this long
    eval_every: int = 0  # >0: teacher-forced accuracy on eval_traces every this many steps


@dataclass
class SFTResult:
    losses: list[float]
    final_loss: float  # mean of the last 10 steps' losses
    steps: int
    time_s: float
    tokens: int  # tokens processed (padding excluded)
    model_tokens: int  # tokens with loss
    n_traces: int
    style_counts: dict[str, int]
    copy_losses: list[float] = field(default_factory=list)  # the copy warm-up's


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(traces: list[Trace], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [B, T] and ``labels`` [B, T] (-100 where no loss: prompt,
    observations, padding; otherwise the token itself, predicted from the positions before)."""
    T = max(len(t.input_ids) for t in traces)
    ids = torch.full((len(traces), T), pad_id, dtype=torch.long)
    labels = torch.full((len(traces), T), -100, dtype=torch.long)
    for i, t in enumerate(traces):
        seq = t.input_ids
        m = [0] * len(t.prompt_ids) + t.mask
        ids[i, :len(seq)] = torch.tensor(seq)
        lab = torch.tensor([x if k else -100 for x, k in zip(seq, m)])
        labels[i, :len(seq)] = lab
    return ids, labels


@torch.no_grad()
def teacher_forced_accuracy(model, traces: list[Trace], tokenizer, batch_size: int = 32, *,
                            skip_decisions: bool = True) -> dict[str, float]:
    """Greedy agreement on model tokens given the trace's context.

    ``exact``: the share of traces whose every scored model token is the argmax; ``token``: the
    share of scored tokens that are. With ``skip_decisions`` the execute-or-continue choices (the
    token right after each closing fence) are not scored: the style mix makes them deliberately
    uncertain, and this measures how well the model writes code and copies answers.
    """
    pad = _pad_id(tokenizer)
    was = model.training
    model.eval()
    exact = tok_ok = tok_n = 0
    try:
        for i in range(0, len(traces), batch_size):
            batch = traces[i:i + batch_size]
            ids, labels = collate(batch, pad)
            if skip_decisions:
                for b, tr in enumerate(batch):
                    for j in decision_positions(tr, tokenizer):
                        labels[b, j] = -100
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            on = target != -100
            ok = (pred == target) & on
            exact += int((ok.sum(1) == on.sum(1)).sum())
            tok_ok += int(ok.sum())
            tok_n += int(on.sum())
    finally:
        model.train(was)
    return {"exact": exact / max(1, len(traces)), "token": tok_ok / max(1, tok_n)}


def decision_positions(tr: Trace, tokenizer) -> list[int]:
    """Positions (in ``input_ids``) of the model tokens that directly follow a closed block's
    fence line: where the policy chooses between E and going on."""
    out = []
    pos = len(tr.prompt_ids)
    for i, ids in enumerate(tr.turn_ids):
        text = ""
        for j, t in enumerate(ids):
            if j and _ends_block(text):
                out.append(pos + j)
            text += tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pos += len(ids) + (len(tr.observation_ids[i]) if i < len(tr.observation_ids) else 0)
    return out


def _ends_block(text: str) -> bool:
    from ihgrpo.protocol import find_code_blocks

    if not text.endswith("```\n"):
        return False
    blocks = find_code_blocks(text)
    return bool(blocks) and blocks[-1].end == len(text)


def copy_batch(tokenizer, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random segments (half of them digits) and then the same segments again; loss on the copy.

    Copying a span seen earlier is what the task needs most (numbers from the question into code,
    the printed value into \\boxed{}), and it is learnt in a sudden phase change that dense copy
    data brings on within a few hundred cheap steps.
    """
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    space = tokenizer.encode(" ", add_special_tokens=False)
    sep = tokenizer.encode(" =", add_special_tokens=False)
    seqs = []
    for _ in range(batch_size):
        src: list[int] = []
        for _ in range(3):
            alphabet = digits if rng.random() < 0.5 else vocab
            src += [rng.choice(alphabet) for _ in range(rng.randint(3, 8))] + space
        seqs.append((src + sep + src, len(src) + len(sep)))
    T = max(len(q) for q, _ in seqs)
    ids = torch.full((batch_size, T), _pad_id(tokenizer), dtype=torch.long)
    labels = torch.full((batch_size, T), -100, dtype=torch.long)
    for i, (q, start) in enumerate(seqs):
        ids[i, :len(q)] = torch.tensor(q)
        labels[i, start:len(q)] = ids[i, start:len(q)]
    return ids, labels


def copy_warmup(model, tokenizer, steps: int, *, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                log: Callable[[str], None] | None = print) -> list[float]:
    """Trains ``model`` in place on :func:`copy_batch` data; returns the losses. Deterministic."""
    rng = random.Random(f"ihgrpo-copy-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        losses.append(_step(model, opt, *copy_batch(tokenizer, rng, batch_size), grad_clip=1.0))
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"copy warm-up step {step + 1}/{steps} loss {losses[-1]:.4f} {time.perf_counter() - t0:.1f}s")
    return losses


def _loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Right padding and a causal mask: real tokens never see padding, so no attention mask.
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


def _step(model, opt, ids: torch.Tensor, labels: torch.Tensor, *, grad_clip: float) -> float:
    """One optimiser step on the token-mean loss; returns the loss."""
    loss = _loss(model, ids, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def train_sft(model, tokenizer, config: SFTConfig | None = None, *, problems: list[Problem] | None = None,
              log: Callable[[str], None] | None = print, eval_traces: list[Trace] | None = None) -> SFTResult:
    """Trains ``model`` in place on fresh traces (one per training problem, no repeats).

    Token-mean cross-entropy on model tokens only; AdamW with warmup and cosine decay. Deterministic
    on CPU for a given seed (and thread count): data order from ``random.Random(seed)``, dropout
    off, ``torch.use_deterministic_algorithms`` while it runs.
    """
    cfg = config or SFTConfig()
    n = cfg.steps * cfg.batch_size
    if problems is None:
        problems = generate_problems(n, seed=f"sft-{cfg.seed}", split="train", cfg=cfg.task)
    if len(problems) < n:
        raise ValueError(f"need {n} problems for {cfg.steps} steps of {cfg.batch_size}, got {len(problems)}")
    t0 = time.perf_counter()
    traces = build_traces(problems[:n], tokenizer, seed=cfg.seed, style_weights=cfg.style_weights)
    # Batches of similar lengths (less padding), in a seeded random order.
    rng = random.Random(f"ihgrpo-sft-order-{cfg.seed}")
    chunks = [traces[i:i + cfg.batch_size * 8] for i in range(0, n, cfg.batch_size * 8)]
    batches = []
    for chunk in chunks:
        chunk = sorted(chunk, key=lambda t: len(t.input_ids))
        batches += [chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
    rng.shuffle(batches)
    pad = _pad_id(tokenizer)

    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    copy_losses: list[float] = []
    losses: list[float] = []
    tokens = model_tokens = 0
    try:
        if cfg.copy_steps:
            copy_losses = copy_warmup(model, tokenizer, cfg.copy_steps, batch_size=cfg.copy_batch_size,
                                      lr=cfg.copy_lr, seed=cfg.seed, log=log)
        decay = [p for n_, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n_, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        model.train()
        t_train = time.perf_counter()
        c0 = time.process_time()
        for step, batch in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ids, labels = collate(batch, pad)
            losses.append(_step(model, opt, ids, labels, grad_clip=cfg.grad_clip))
            tokens += sum(len(t.input_ids) for t in batch)
            model_tokens += int((labels != -100).sum())
            if log and (step % cfg.log_every == 0 or step == len(batches) - 1):
                log(f"sft step {step + 1}/{len(batches)} loss {losses[-1]:.4f} lr {lr_at(step):.2e} "
                    f"{time.perf_counter() - t0:.1f}s cpu {time.process_time() - c0:.1f}s")
            if eval_traces and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and log:
                acc = teacher_forced_accuracy(model, eval_traces, tokenizer)
                log(f"sft step {step + 1} teacher-forced exact {acc['exact']:.3f} token {acc['token']:.4f} "
                    f"cpu {time.process_time() - c0:.1f}s")
            if cfg.max_time_s is not None and time.perf_counter() - t_train > cfg.max_time_s:
                break
    finally:
        torch.use_deterministic_algorithms(prev_det)
        model.zero_grad(set_to_none=True)  # the last step's gradients belong to no later training
        model.eval()
    counts = {s: sum(t.style == s for t in traces) for s in STYLES}
    tail = losses[-10:]
    return SFTResult(losses=losses, final_loss=sum(tail) / len(tail), steps=len(losses),
                     time_s=time.perf_counter() - t0, tokens=tokens, model_tokens=model_tokens,
                     n_traces=len(traces), style_counts=counts,
                     copy_losses=copy_losses)


# ----------------------------------------------------------------------------- evaluation

def score_answer(answer: str | None, gold: str) -> float:
    """1.0 if the boxed answer is the gold integer (commas and spaces ignored), else 0.0."""
    if answer is None:
        return 0.0
    a = answer.replace(",", "").replace(" ", "").strip().strip("$")
    try:
        return float(int(a) == int(gold))
    except ValueError:
        return 0.0


def demo_rollout_config(max_turns: int = 4, **overrides) -> "Any":
    """The RolloutConfig the demo uses (instruction and budgets sized for the task)."""
    from ihgrpo.rollout import RolloutConfig

    kw = dict(mode="delayed", max_turns=max_turns, max_response_tokens=512, max_tokens_per_turn=256,
              instruction=DEMO_INSTRUCTION)
    kw.update(overrides)
    return RolloutConfig(**kw)


def evaluate_model(model, tokenizer, problems: list[Problem], *, max_turns: int = 4,
                   temperature: float = 1.0, top_p: float = 1.0, samples: int = 1, seed: int = 0,
                   pool=None, batch_size: int = 64, rollout_config=None,
                   return_trajectories: bool = False) -> dict:
    """Accuracy and rollout statistics of ``model`` on ``problems`` through the real engine.

    Uses :class:`RolloutEngine` + ``HFGenerator`` + a :class:`SandboxPool` (a temporary one when
    ``pool`` is None). Returns ``batch_stats`` (accuracy, delay_call_rate, tool calls, turns,
    response tokens, ...) plus ``time_s``, ``temperature``, ``max_turns`` and, with
    ``return_trajectories``, the trajectories under ``"trajectories"``.
    """
    from ihgrpo.rollout import RolloutEngine, SamplingParams, batch_stats
    from ihgrpo.rollout.hf import HFGenerator
    from ihgrpo.sandbox import SandboxPool

    cfg = rollout_config or demo_rollout_config(max_turns)
    own_pool = pool is None
    if own_pool:
        pool = SandboxPool(max_workers=2, timeout_s=3.0)
    t0 = time.perf_counter()
    try:
        gen = HFGenerator(model, tokenizer, seed=seed)
        engine = RolloutEngine(gen, tokenizer, pool, cfg)
        params = SamplingParams(temperature=temperature, top_p=top_p,
                                max_new_tokens=cfg.max_tokens_per_turn or cfg.max_response_tokens)
        trajs = []
        per = max(1, batch_size // samples)
        for i in range(0, len(problems), per):
            chunk = problems[i:i + per]
            out = engine.rollout([p.question for p in chunk], samples, params)
            for t in out:
                t.reward = score_answer(t.answer, chunk[t.prompt_index].answer)
                t.meta["gold"] = chunk[t.prompt_index].answer
                t.meta["n_steps"] = chunk[t.prompt_index].n_steps
            trajs += out
    finally:
        if own_pool:
            pool.close()
    elapsed = time.perf_counter() - t0
    stats = batch_stats(trajs, elapsed_s=elapsed)
    stats.update(time_s=elapsed, temperature=temperature, max_turns=max_turns, problems=len(problems))
    # where the errors are: accuracy by number of steps
    by_k: dict[int, list[float]] = {}
    for t in trajs:
        by_k.setdefault(t.meta["n_steps"], []).append(t.reward)
    stats["accuracy_by_steps"] = {k: sum(v) / len(v) for k, v in sorted(by_k.items())}
    if return_trajectories:
        stats["trajectories"] = trajs
    return stats
