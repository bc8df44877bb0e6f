"""Multi-turn rollouts, token in and token out (SPEC section 2).

A trajectory is built only by appending token ids: the prompt (from the chat template), the
ids the generator sampled (mask 1, with their log-probs), and observation ids (mask 0).
Model tokens are decoded to find code and answers, never re-encoded.

The engine batches every live trajectory into one generator call per round. After a round,
the code of the trajectories that stopped at E runs concurrently in the sandbox pool; a slow
execution holds back only its own trajectory: the others go on once `straggler_wait_s` passes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ihgrpo.protocol import (EXECUTE_TOKEN, Mode, TurnEnd, answer_before_execute, build_prompt,
                             coupled_block_end, extract_boxed, format_observation, is_void,
                             next_action, pending_blocks)
from ihgrpo.vocab import single_token_id

from .generator import GenerationOutput, Generator, SamplingParams, derive_seed

# Coupled protocol: a fence line ended; the protocol decides whether it closed a python block.
# Literal strings (any backend can stop on them) for the usual endings, a few trailing spaces or
# a tab or CRLF included; a longer run is caught after the fact (RolloutEngine._block_cut).
CODE_FENCE_STOPS = ("```\n", "``` \n", "```  \n", "```   \n", "```\t\n", "```\r\n", "``` \r\n")


@dataclass
class TurnRecord:
    """One generation turn and what happened after it."""

    text: str  # the model's text of this turn (E and EOS included as text)
    end: TurnEnd
    n_tokens: int
    code: str | None = None  # what was run after this turn (None: nothing ran)
    blocks_run: int = 0
    output: str | None = None  # the observation text appended after it
    ok: bool | None = None
    timed_out: bool = False
    state_lost: bool = False
    exec_time_s: float = 0.0


@dataclass
class Trajectory:
    uid: str
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: sampled by the policy; 0: observation
    logprobs: list[float] = field(default_factory=list)  # 0.0 where mask is 0
    turns: list[TurnRecord] = field(default_factory=list)
    finished: bool = False  # the model stopped (EOS, or E right after a final \boxed) or the turn cap was reached
    truncated: bool = False  # a token budget ran out
    void: bool = False  # stopped by EOS with no \boxed answer
    answer: str | None = None
    reward: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Its own random stream: the n-th generation call for it samples with derive_seed(seed, n),
    # whatever else is in the batch (used when every trajectory of a round has a seed).
    seed: int | None = None

    @property
    def model_text(self) -> str:
        return "".join(t.text for t in self.turns)

    @property
    def executions(self) -> int:
        return sum(t.code is not None for t in self.turns)

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)

    @property
    def done(self) -> bool:
        return self.finished or self.truncated


@dataclass
class RolloutConfig:
    mode: str = "delayed"  # "delayed" (D) or "coupled" (C)
    max_turns: int = 5  # generation turns per trajectory
    max_response_tokens: int = 8000  # model + observation tokens after the prompt
    max_tokens_per_turn: int | None = None  # None: up to the response budget
    max_observation_tokens: int = 256
    # prompt + response + observations (the release's 16,000-token context); None: no limit of its own
    max_context_tokens: int | None = None
    observation_max_chars: int = 2048
    exec_timeout_s: float | None = None  # None: the pool's timeout
    # None: a round waits for every execution, so batches (and seeded samples) do not depend on
    # timing. A number: after the first result, wait at most this long; slower executions join a
    # later round (faster under slow code, but no longer bit-for-bit reproducible).
    straggler_wait_s: float | None = None
    execute_token: str = EXECUTE_TOKEN
    instruction: str | None = None  # None: the protocol's default for the mode
    enable_thinking: bool = False  # Qwen3: non-thinking mode
    # At most this many trajectories per generate call (a round is split into calls): bounds the KV
    # cache of a lock-step batch. None: every live trajectory in one call.
    max_batch_rows: int | None = None

    def __post_init__(self) -> None:
        Mode(self.mode)  # raises on an unknown mode
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 (or None), got {self.max_batch_rows}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.max_context_tokens is not None and self.max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be >= 1 (or None), got {self.max_context_tokens}")


# A tokenizer without a chat template (a base model): the user content in this plain frame,
# after the tokenizer's BOS token when it has one.
PLAIN_PROMPT = "User: {content}\nAssistant:"


class ChatFormat:
    """Prompt ids through the tokenizer's chat template (else :data:`PLAIN_PROMPT`); observation
    ids at the token level.

    ``execute_token_id`` is None when the vocabulary has no single execute token, which only
    ``require_execute_token=False`` allows (the coupled protocol never uses E).
    """

    def __init__(self, tokenizer, *, execute_token: str = EXECUTE_TOKEN, enable_thinking: bool = False,
                 eos_token_ids: list[int] | None = None, require_execute_token: bool = True):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.execute_token = execute_token
        self.execute_token_id = single_token_id(tokenizer, execute_token)
        if self.execute_token_id is None and require_execute_token:
            raise ValueError(f"the execute token {execute_token!r} must be one token of the vocabulary; the "
                             f"tokenizer splits it into {tokenizer.encode(execute_token, add_special_tokens=False)} "
                             f"(training and `ihgrpo eval` add it: ihgrpo.vocab.add_protocol_tokens)")
        eos = list(eos_token_ids or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("no EOS token: pass eos_token_ids or use a tokenizer with an eos_token")
        self.eos_token_ids = eos
        # Text that would become a control token if an observation contained it verbatim.
        self._control = sorted({t for t in tokenizer.all_special_tokens if t} | {execute_token},
                               key=len, reverse=True)

    def prompt_ids(self, user_content: str) -> list[int]:
        messages = [{"role": "user", "content": user_content}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=self.enable_thinking)
        else:  # a base model: a plain frame, so that the answer starts after "Assistant:"
            bos = self.tokenizer.bos_token_id
            return ([bos] if bos is not None else []) + self.tokenizer.encode(
                PLAIN_PROMPT.replace("{content}", user_content), add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def model_text(self, ids: list[int]) -> str:
        """A turn's text for parsing: EOS tokens are not part of what the model wrote."""
        if ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        return self.decode(ids)

    def defang(self, text: str) -> str:
        """Keep program output from turning into control tokens (e.g. a printed E)."""
        for tok in self._control:
            if tok in text:
                text = text.replace(tok, tok[0] + "\u200b" + tok[1:])
        return text

    def observation_ids(self, result, *, nothing_pending: bool, max_tokens: int, max_chars: int) -> tuple[str, list[int]]:
        """The observation's text and ids, at most `max_tokens` ids (head and tail kept)."""
        if result is not None:
            result = _Defanged(result, self.defang)
        text = format_observation(result, max_chars=max_chars, nothing_pending=nothing_pending)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        while len(ids) > max_tokens and max_chars > 16:
            max_chars = max(16, int(max_chars * max_tokens / len(ids) * 0.9))
            text = format_observation(result, max_chars=max_chars, nothing_pending=nothing_pending)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text, ids


class _Defanged:
    def __init__(self, result, fix):
        self._r, self._fix = result, fix

    def __getattr__(self, name):
        value = getattr(self._r, name)
        return self._fix(value) if name in ("stdout", "stderr", "error") and isinstance(value, str) else value


class RolloutEngine:
    """Runs G rollouts per question through the delayed or coupled protocol."""

    def __init__(self, generator: Generator, tokenizer, pool, config: RolloutConfig | None = None, *,
                 eos_token_ids: list[int] | None = None, require_execute_token: bool | None = None):
        """``require_execute_token``: None = only the delayed protocol needs E in the vocabulary."""
        self.generator = generator
        self.pool = pool
        self.config = config or RolloutConfig()
        if require_execute_token is None:
            require_execute_token = Mode(self.config.mode) is Mode.DELAYED
        self.chat = ChatFormat(tokenizer, execute_token=self.config.execute_token,
                               enable_thinking=self.config.enable_thinking, eos_token_ids=eos_token_ids,
                               require_execute_token=require_execute_token)
        self._batches = itertools.count()
        self._run_id = uuid.uuid4().hex[:8]
        self.last_timing: dict[str, float] = {}

    # ------------------------------------------------------------------ entry points
    def rollout(self, questions: list[str], group_size: int, params: SamplingParams) -> list[Trajectory]:
        """`group_size` trajectories per question, grouped in order (question-major)."""
        return self.rollout_ids([self.prompt_ids(q) for q in questions], group_size, params)

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt of a question: the protocol's instruction through the chat template."""
        return self.chat.prompt_ids(build_prompt(question, self.config.mode, instruction=self.config.instruction,
                                                 execute_token=self.config.execute_token))

    def rollout_ids(self, prompts: list[list[int]], group_size: int, params: SamplingParams) -> list[Trajectory]:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        batch = next(self._batches)
        trajs = [Trajectory(uid=f"{self._run_id}-b{batch}-p{i}-s{k}", prompt_index=i, sample_index=k,
                            prompt_ids=list(p))
                 for i, p in enumerate(prompts) for k in range(group_size)]
        self.run(trajs, params)
        return trajs

    def run(self, trajs: list[Trajectory], params: SamplingParams) -> None:
        """Drives the trajectories to their end, in place."""
        cfg = self.config
        coupled = Mode(cfg.mode) is Mode.COUPLED
        stop_ids = tuple(dict.fromkeys((*params.stop_token_ids, *self.chat.eos_token_ids,
                                        *(() if coupled else (self.chat.execute_token_id,)))))
        stop_strings = tuple(dict.fromkeys((*params.stop_strings, *(CODE_FENCE_STOPS if coupled else ()))))
        turn_params = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                     max_new_tokens=params.max_new_tokens, stop_token_ids=stop_ids,
                                     stop_strings=stop_strings, seed=params.seed)
        per_turn = cfg.max_tokens_per_turn or cfg.max_response_tokens
        window = {t.uid: "" for t in trajs}  # model text since the last execution
        for t in trajs:
            if not t.done and self._room(t) <= 0:  # the prompt alone fills the context
                t.truncated = True
        partial: dict[str, list] = {}  # coupled: a turn continued after a non-python fence closed
        ready = [t for t in trajs if not t.done]
        running: dict[cf.Future, tuple[Trajectory, TurnRecord]] = {}
        gen_time = exec_wait = 0.0
        n_calls = 0  # generate calls so far (one per round unless max_batch_rows splits rounds)
        calls: dict[str, int] = {}  # generation calls so far per trajectory (its seeds' index)
        if cfg.max_batch_rows is not None and params.seed is not None:
            # Chunked rounds: every trajectory samples from its own stream (from the call's seed and
            # its position), so the chunk size never changes what is sampled.
            for i, t in enumerate(trajs):
                if t.seed is None:
                    t.seed = derive_seed(params.seed, i)
        executor = cf.ThreadPoolExecutor(max(1, getattr(self.pool, "max_workers", 4)),
                                         thread_name_prefix="ihgrpo-exec")
        try:
            while ready or running:
                if ready:
                    t0 = time.perf_counter()
                    budgets = [min(per_turn, self._room(t)) for t in ready]
                    outs = []
                    step = cfg.max_batch_rows or len(ready)
                    for c in range(0, len(ready), step):  # at most max_batch_rows rows per call
                        part = ready[c:c + step]
                        if params.seed is not None:  # a fresh, reproducible stream for every call
                            turn_params = dataclasses.replace(turn_params, seed=params.seed * 1009 + n_calls)
                        n_calls += 1
                        # seeds= only when used: a generator (or a wrapper) written before it still works
                        seeded = {}
                        if all(t.seed is not None for t in part):
                            seeded["seeds"] = [derive_seed(t.seed, calls.get(t.uid, 0)) for t in part]
                            calls.update((t.uid, calls.get(t.uid, 0) + 1) for t in part)
                        outs += self.generator.generate([t.prompt_ids + t.response_ids for t in part], turn_params,
                                                        budgets[c:c + step], request_ids=[t.uid for t in part],
                                                        **seeded)
                    gen_time += time.perf_counter() - t0
                    next_ready = []
                    for traj, out, budget in zip(ready, outs, budgets):
                        job = self._after_turn(traj, out, budget, window, partial, coupled)
                        if job == "continue":
                            next_ready.append(traj)
                        elif job is not None:
                            code, record = job
                            fut = executor.submit(self.pool.execute_sync, traj.uid, code,
                                                  timeout_s=cfg.exec_timeout_s)
                            running[fut] = (traj, record)
                    ready = next_ready
                if running:
                    t0 = time.perf_counter()
                    if cfg.straggler_wait_s is None:  # deterministic: every execution joins the next round
                        done, _ = cf.wait(running)
                    elif ready:  # others can generate now: collect only what is already finishing
                        done, _ = cf.wait(running, timeout=min(0.02, cfg.straggler_wait_s))
                    else:  # the first result, then a short window for the rest; stragglers join later
                        cf.wait(running, return_when=cf.FIRST_COMPLETED)
                        done, _ = cf.wait(running, timeout=cfg.straggler_wait_s)
                    exec_wait += time.perf_counter() - t0
                    for fut in done:
                        traj, record = running.pop(fut)
                        self._observe(traj, record, fut.result())
                        if not traj.done:
                            ready.append(traj)
                    ready.sort(key=lambda t: (t.prompt_index, t.sample_index))
        finally:
            executor.shutdown(wait=True)
            for t in trajs:
                self._end_session(t.uid)
        for t in trajs:
            t.answer = extract_boxed(t.model_text)
            t.void = is_void(t.model_text, t.finished and bool(t.turns) and t.turns[-1].end is TurnEnd.EOS)
        self.last_timing = {"generate_time_s": gen_time, "exec_wait_time_s": exec_wait}

    # ------------------------------------------------------------------ one turn
    def _after_turn(self, traj: Trajectory, out: GenerationOutput, budget: int, window: dict,
                    partial: dict, coupled: bool):
        """Appends a turn's tokens; returns (code, record) to execute, "continue", or None."""
        cfg = self.config
        ids, logprobs = list(out.token_ids), [float(x) for x in out.logprobs]
        if len(ids) != len(logprobs):
            raise ValueError(f"generator returned {len(ids)} ids but {len(logprobs)} log-probs")
        # A coupled turn may be continued after a non-python fence: it is still one turn.
        prev_ids = partial.pop(traj.uid, [])
        cut = self._block_cut(window[traj.uid], prev_ids, ids) if coupled else None
        if cut is not None:  # what was generated after the block's fence line is dropped, unseen
            ids, logprobs = ids[:cut], logprobs[:cut]
        traj.response_ids += ids
        traj.mask += [1] * len(ids)
        traj.logprobs += logprobs
        turn_ids = prev_ids + ids
        text = self.chat.model_text(turn_ids)
        last = ids[-1] if ids else None
        if cut is not None:
            end = TurnEnd.CODE_BLOCK
        elif out.finish_reason == "stop_token" and last == self.chat.execute_token_id:
            end = TurnEnd.EXECUTE
        elif out.finish_reason == "stop_token" and last in self.chat.eos_token_ids:
            end = TurnEnd.EOS
        elif out.finish_reason == "stop_string" and coupled and self._room(traj) > 0 \
                and len(turn_ids) < (cfg.max_tokens_per_turn or cfg.max_response_tokens):
            partial[traj.uid] = turn_ids  # a non-python fence closed: keep generating this turn
            return "continue"
        elif out.finish_reason == "stop_token":  # a caller-given stop id: treat like EOS
            end = TurnEnd.EOS
        else:
            end = TurnEnd.BUDGET
        record = TurnRecord(text=self.chat.decode(turn_ids), end=end, n_tokens=len(turn_ids))
        traj.turns.append(record)
        window[traj.uid] += text
        action = next_action(end, len(traj.turns), cfg.max_turns)
        out_of_room = action == "execute" and self._room(traj) <= 0
        if end is TurnEnd.BUDGET or out_of_room:  # no room left for an observation and a reply
            traj.truncated = True
            return None
        if action == "stop":
            traj.finished = True
            return None
        window_text, window[traj.uid] = window[traj.uid], ""
        blocks = pending_blocks(window_text, execute_token=self.chat.execute_token)
        record.blocks_run = len(blocks)
        if not blocks and end is TurnEnd.EXECUTE and answer_before_execute(
                window_text, execute_token=self.chat.execute_token) is not None:
            # "... \boxed{42}" then E: E was used as a stop. The trajectory ends here like at EOS
            # (E keeps mask 1 and its log-prob; no observation; rewarded on that answer).
            traj.finished = True
            return None
        if not blocks:  # E with nothing pending: say so, run nothing
            self._observe(traj, record, None)
            return "continue" if not traj.done else None
        record.code = "\n".join(blocks)
        return record.code, record

    def _room(self, traj: Trajectory) -> int:
        """Tokens the trajectory may still add: the response budget, and the context budget
        (which counts the prompt too)."""
        cfg = self.config
        room = cfg.max_response_tokens - len(traj.response_ids)
        if cfg.max_context_tokens is not None:
            room = min(room, cfg.max_context_tokens - len(traj.prompt_ids) - len(traj.response_ids))
        return room

    def _block_cut(self, window_text: str, prev_ids: list[int], ids: list[int]) -> int | None:
        """Coupled protocol: how many of the new `ids` the turn keeps when a python block closed in
        it (up to the token that ends the closing fence's line), else None. Tokens past that point
        were sampled after the block should have run (stop strings cover only the usual fence
        endings), so they are dropped: what is kept is exactly what a stop there would have given."""
        turn = prev_ids + ids
        end = coupled_block_end(window_text + self.chat.model_text(turn))
        if end is None:
            return None
        end -= len(window_text)
        if len(self.chat.decode(turn[:-1])) < end:
            return len(ids)  # the usual case: the last token completed the fence line
        lo, hi = len(prev_ids) + 1, len(turn) - 1  # the fewest tokens whose text reaches that end
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.chat.decode(turn[:mid])) >= end:
                hi = mid
            else:
                lo = mid + 1
        return lo - len(prev_ids)

    def _observe(self, traj: Trajectory, record: TurnRecord, result) -> None:
        cfg = self.config
        text, ids = self.chat.observation_ids(result, nothing_pending=result is None,
                                              max_tokens=cfg.max_observation_tokens,
                                              max_chars=cfg.observation_max_chars)
        record.output = text
        if result is not None:
            record.ok, record.timed_out = bool(result.ok), bool(result.timed_out)
            record.state_lost = bool(getattr(result, "state_lost", False))
            record.exec_time_s = float(getattr(result, "duration_s", 0.0))
        if len(ids) >= self._room(traj):
            traj.truncated = True  # no room to continue after the observation
            return
        traj.response_ids += ids
        traj.mask += [0] * len(ids)
        traj.logprobs += [0.0] * len(ids)

    def _end_session(self, uid: str) -> None:
        try:
            self.pool.end_session_sync(uid)
        except Exception:  # the pool may be closing; nothing to free then
            pass


def batch_stats(trajs: list[Trajectory], *, elapsed_s: float | None = None) -> dict[str, float]:
    """SPEC section 5 rollout statistics for a batch."""
    n = max(1, len(trajs))
    execs = [r for t in trajs for r in t.turns if r.code is not None]
    blocks = sum(r.blocks_run for r in execs)
    model_tokens = sum(t.model_tokens for t in trajs)
    stats = {
        "trajectories": float(len(trajs)),
        "turns_per_trajectory": sum(len(t.turns) for t in trajs) / n,
        "tool_calls_per_trajectory": len(execs) / n,
        "code_using_fraction": sum(t.executions > 0 for t in trajs) / n,
        "blocks_per_execution": blocks / len(execs) if execs else 0.0,
        # the share of blocks that waited for a later block's execution instead of running at once
        "delay_call_rate": sum(r.blocks_run - 1 for r in execs) / blocks if blocks else 0.0,
        "exec_success_rate": sum(bool(r.ok) for r in execs) / len(execs) if execs else 0.0,
        "code_error_rate": sum(not r.ok for r in execs) / len(execs) if execs else 0.0,
        "exec_timeout_rate": sum(r.timed_out for r in execs) / len(execs) if execs else 0.0,
        "truncated_fraction": sum(t.truncated for t in trajs) / n,
        "void_fraction": sum(t.void for t in trajs) / n,
        "response_tokens": model_tokens / n,
        "response_tokens_with_observations": sum(len(t.response_ids) for t in trajs) / n,
    }
    rewards = [t.reward for t in trajs if t.reward is not None]
    if rewards:
        stats["accuracy"] = sum(rewards) / len(rewards)
    if elapsed_s:
        stats["tokens_per_s"] = model_tokens / elapsed_s
    return stats
