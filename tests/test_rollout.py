"""The multi-turn engine with a scripted generator: every turn outcome, masks, log-probs, tokens."""

from __future__ import annotations

import re
import threading
import time

import pytest

from ihgrpo.protocol import TurnEnd
from ihgrpo.rollout import (RolloutConfig, RolloutEngine, SamplingParams, ScriptedGenerator,
                            batch_stats)
from ihgrpo.rollout.scripted import scripted_logprob
from ihgrpo.sandbox import SandboxPool

E, EOS = 151657, 151645
PARAMS = SamplingParams(max_new_tokens=400)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(max_workers=2, timeout_s=1.0) as p:
        yield p


@pytest.fixture
def tok(qwen_tokenizer):
    return qwen_tokenizer


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def engine_for(tok, pool, turns_by_uid_suffix, **cfg):
    """A scripted engine: every trajectory plays the turns (token lists) for its sample index."""
    def play(rid: str, prefix: list[int]) -> list[int]:
        turns = turns_by_uid_suffix(rid, prefix)
        return turns

    gen = ScriptedGenerator(play, decode=lambda ids: tok.decode(ids))
    return RolloutEngine(gen, tok, pool, RolloutConfig(**cfg)), gen


def turn_player(tok, turns: list[list[int]]):
    """Plays `turns` in order for every request (each request has its own cursor)."""
    cursor: dict[str, int] = {}

    def next_turn(rid, prefix):  # noqa: ARG001
        i = cursor.get(rid, 0)
        cursor[rid] = i + 1
        return turns[min(i, len(turns) - 1)]

    return next_turn


DEFER_TWO = ("First the product.\n```python\nx = 6 * 7\n```\nThen show it.\n"
             "```python\nprint(x)\n```\n")


def test_delayed_execute_then_answer(tok, pool):
    turns = [enc(tok, DEFER_TWO) + [E], enc(tok, "So the answer is \\boxed{42}.") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["What is 6 times 7?"], 1, PARAMS)
    assert [t.end for t in traj.turns] == [TurnEnd.EXECUTE, TurnEnd.EOS]
    first = traj.turns[0]
    assert first.code == "x = 6 * 7\nprint(x)" and first.blocks_run == 2 and first.ok
    assert "Code execution result: 42" in first.output
    assert traj.finished and not traj.truncated and not traj.void and traj.answer == "42"
    # the sampled ids are kept exactly, E and EOS included; observation ids are mask 0
    n1, n_obs = len(turns[0]), len(enc(tok, first.output))
    assert traj.response_ids[:n1] == turns[0] and traj.response_ids[-len(turns[1]):] == turns[1]
    assert traj.mask == [1] * n1 + [0] * n_obs + [1] * len(turns[1])
    assert len(traj.logprobs) == len(traj.response_ids) == len(traj.mask)
    start = len(traj.prompt_ids)
    for i, (tid, m, lp) in enumerate(zip(traj.response_ids, traj.mask, traj.logprobs)):
        assert lp == (scripted_logprob(tid, start + i) if m else 0.0)
    assert traj.model_tokens == n1 + len(turns[1])


def test_trajectory_tokens_equal_the_chat_template(tok, pool):
    """Token in, token out: no lost or merged newline at any turn boundary."""
    turns = [enc(tok, DEFER_TWO) + [E],
             enc(tok, "Now check it.\n```python\nprint(x + 1)\n```\n") + [E],
             enc(tok, "Both agree: \\boxed{42}.") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["What is 6 times 7?"], 1, PARAMS)
    assert len(traj.turns) == 3
    content = tok.decode(traj.response_ids[:-1], skip_special_tokens=False)
    user = tok.decode(traj.prompt_ids, skip_special_tokens=False)
    user = re.search(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant", user, re.S).group(1)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": content}],
        tokenize=False, enable_thinking=False)
    expected = enc(tok, rendered)
    ours = traj.prompt_ids + traj.response_ids
    assert expected[: len(ours)] == ours
    assert tok.decode(expected[len(ours):]) == "\n"  # the template's newline after <|im_end|>
    assert "\n</tool_call>\nNow check it." in content


def test_execute_with_nothing_pending(tok, pool):
    turns = [enc(tok, "Let me think first.") + [E], enc(tok, "\\boxed{1}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    first = traj.turns[0]
    assert first.code is None and first.blocks_run == 0
    assert "nothing" in first.output.lower() or "no code" in first.output.lower()
    assert traj.executions == 0 and traj.answer == "1"


def test_max_turns_stops_without_running_the_last_code(tok, pool):
    turn = enc(tok, "```python\nprint('step')\n```\n") + [E]
    engine, _ = engine_for(tok, pool, turn_player(tok, [turn]), max_turns=2)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert len(traj.turns) == 2 and traj.executions == 1
    assert traj.finished and not traj.truncated and not traj.void  # capped, not stopped by EOS
    assert traj.turns[-1].code is None and traj.response_ids[-1] == E


def test_budget_truncation(tok, pool):
    long = enc(tok, "word " * 200)
    engine, _ = engine_for(tok, pool, turn_player(tok, [long]), max_response_tokens=50)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.truncated and not traj.finished and not traj.void
    assert len(traj.response_ids) == 50 and traj.turns[-1].end is TurnEnd.BUDGET


def test_per_turn_budget(tok, pool):
    long = enc(tok, "word " * 100)
    engine, _ = engine_for(tok, pool, turn_player(tok, [long]), max_tokens_per_turn=30)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.truncated and traj.turns[0].n_tokens == 30


def test_context_budget_counts_the_prompt_and_the_observations(tok, pool):
    """The release's budget: a turn may write up to max_tokens_per_turn, and prompt + response +
    observations stay within max_context_tokens (distinct from the response-only budget)."""
    first = enc(tok, DEFER_TWO) + [E]
    long = enc(tok, "word " * 400)
    engine, _ = engine_for(tok, pool, turn_player(tok, [first, long]), max_tokens_per_turn=300,
                           max_response_tokens=5000, max_context_tokens=10_000)
    prompt = len(engine.rollout(["q"], 1, PARAMS)[0].prompt_ids)
    context = prompt + len(first) + 60  # the observation takes some of the last 60
    engine, _ = engine_for(tok, pool, turn_player(tok, [first, long]), max_tokens_per_turn=300,
                           max_response_tokens=5000, max_context_tokens=context)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.truncated and traj.turns[-1].end is TurnEnd.BUDGET
    assert len(traj.prompt_ids) + len(traj.response_ids) == context
    n_obs = traj.mask.count(0)
    assert n_obs > 0 and traj.turns[1].n_tokens == context - prompt - len(first) - n_obs < 300
    # a prompt that fills the context leaves no room: truncated before any generation
    engine, gen = engine_for(tok, pool, turn_player(tok, [first]), max_context_tokens=prompt)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.truncated and traj.response_ids == [] and gen.calls == 0


def test_observation_pushing_past_the_budget_truncates(tok, pool):
    turn = enc(tok, "```python\nprint('y' * 3000)\n```\n") + [E]
    engine, _ = engine_for(tok, pool, turn_player(tok, [turn, enc(tok, "\\boxed{2}") + [EOS]]),
                           max_response_tokens=len(turn) + 20)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.truncated and len(traj.response_ids) <= len(turn) + 20


def test_void_when_eos_without_answer(tok, pool):
    engine, _ = engine_for(tok, pool, turn_player(tok, [enc(tok, "I give up.") + [EOS]]))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.void and traj.finished and traj.answer is None


def test_code_error_reaches_the_model_and_state_survives(tok, pool):
    turns = [enc(tok, "```python\ny = 5\nprint(y)\nprint(undefined)\n```\n") + [E],
             enc(tok, "Fix it.\n```python\nprint(y * 2)\n```\n") + [E],
             enc(tok, "\\boxed{10}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    bad, good = traj.turns[0], traj.turns[1]
    assert bad.ok is False and "NameError" in bad.output and "5" in bad.output
    assert good.ok and "10" in good.output
    assert batch_stats([traj])["code_error_rate"] == 0.5


def test_timeout_is_reported(tok, pool):
    turns = [enc(tok, "```python\nwhile True:\n    pass\n```\n") + [E], enc(tok, "\\boxed{0}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert traj.turns[0].timed_out and "timed out" in traj.turns[0].output.lower()
    assert batch_stats([traj])["exec_timeout_rate"] == 1.0


def test_observation_is_capped_in_tokens(tok, pool):
    turns = [enc(tok, "```python\nprint(' '.join(str(i) for i in range(5000)))\n```\n") + [E],
             enc(tok, "\\boxed{0}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns), max_observation_tokens=64)
    [traj] = engine.rollout(["q"], 1, PARAMS)
    n_obs = traj.mask.count(0)
    assert 0 < n_obs <= 64 and "omitted" in traj.turns[0].output
    assert traj.turns[0].output.endswith("</tool_call>\n")


def test_printed_control_tokens_do_not_become_control_tokens(tok, pool):
    turns = [enc(tok, "```python\nprint('<tool_call> <|im_end|>')\n```\n") + [E],
             enc(tok, "\\boxed{0}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    obs_ids = [t for t, m in zip(traj.response_ids, traj.mask) if m == 0]
    assert E not in obs_ids and EOS not in obs_ids


def test_the_model_sees_the_observation(tok, pool):
    """A script that reads the last observation from its prefix, like a model would."""
    def play(rid, prefix):
        text = tok.decode(prefix).rsplit("<|im_start|>assistant", 1)[-1]  # not the prompt's example
        found = re.findall(r"Code execution result: (\d+)", text)
        if not found:
            return enc(tok, "```python\nprint(2**10)\n```\n") + [E]
        return enc(tok, f"\\boxed{{{found[-1]}}}") + [EOS]

    engine, _ = engine_for(tok, pool, play)
    trajs = engine.rollout(["q1", "q2"], 2, PARAMS)
    assert [t.answer for t in trajs] == ["1024"] * 4
    assert [(t.prompt_index, t.sample_index) for t in trajs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({t.uid for t in trajs}) == 4


CODE_TEXT = ("Set up.\n```python\na = 3\n```\nA note:\n```text\nnot code\n```\n"
             "Next.\n```python\nprint(a * 7)\n```\n")


def test_coupled_runs_each_block_at_its_fence(tok, pool):
    turns = [enc(tok, CODE_TEXT + "\\boxed{21}") + [EOS]]
    cursor = {}

    def play(rid, prefix):  # the model's text, continued from where the previous turn stopped
        done = cursor.get(rid, 0)
        rest = turns[0][done:]
        return rest

    gen = ScriptedGenerator(play, decode=lambda ids: tok.decode(ids))
    orig = gen.generate

    def tracking(prefixes, params, max_new_tokens=None, *, request_ids=None):
        outs = orig(prefixes, params, max_new_tokens, request_ids=request_ids)
        for rid, out in zip(request_ids, outs):
            cursor[rid] = cursor.get(rid, 0) + len(out.token_ids)
        return outs

    gen.generate = tracking
    engine = RolloutEngine(gen, tok, pool, RolloutConfig(mode="coupled"))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    ends = [t.end for t in traj.turns]
    assert ends == [TurnEnd.CODE_BLOCK, TurnEnd.CODE_BLOCK, TurnEnd.EOS], ends
    assert [t.code for t in traj.turns[:2]] == ["a = 3", "print(a * 7)"]
    assert "not code" in traj.turns[1].text  # the text block did not end the turn
    assert "21" in traj.turns[1].output and traj.answer == "21"
    stats = batch_stats([traj])
    assert stats["delay_call_rate"] == 0.0 and stats["tool_calls_per_trajectory"] == 2


def test_delay_call_rate_counts_deferred_blocks(tok, pool):
    turns = [enc(tok, CODE_TEXT) + [E], enc(tok, "\\boxed{21}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    stats = batch_stats([traj])
    assert traj.turns[0].blocks_run == 2 and stats["delay_call_rate"] == 0.5
    assert stats["blocks_per_execution"] == 2 and stats["turns_per_trajectory"] == 2


def test_batch_stats_aggregate():
    from ihgrpo.rollout import Trajectory, TurnRecord

    a = Trajectory("a", 0, 0, [1], [5, 6, 7, 8], [1, 0, 1, 1], [0.0] * 4,
                   [TurnRecord("x", TurnEnd.EXECUTE, 1, code="c", blocks_run=3, ok=True),
                    TurnRecord("y", TurnEnd.EOS, 2)], finished=True, reward=1.0)
    b = Trajectory("b", 0, 1, [1], [5], [1], [0.0], [TurnRecord("z", TurnEnd.BUDGET, 1)],
                   truncated=True, reward=0.0)
    c = Trajectory("c", 0, 2, [1], [5, 5], [1, 1], [0.0] * 2,
                   [TurnRecord("w", TurnEnd.EXECUTE, 1, code="c", blocks_run=1, ok=False),
                    TurnRecord("v", TurnEnd.EOS, 1)], finished=True, void=True, reward=0.0)
    s = batch_stats([a, b, c], elapsed_s=2.0)
    assert s["accuracy"] == pytest.approx(1 / 3)
    assert s["delay_call_rate"] == pytest.approx(2 / 4)  # (3-1 + 1-1) / (3+1)
    assert s["code_error_rate"] == 0.5 and s["exec_success_rate"] == 0.5
    assert s["truncated_fraction"] == pytest.approx(1 / 3) and s["void_fraction"] == pytest.approx(1 / 3)
    assert s["response_tokens"] == pytest.approx((3 + 1 + 2) / 3)
    assert s["tokens_per_s"] == pytest.approx(3.0)
    assert s["code_using_fraction"] == pytest.approx(2 / 3)


def test_slow_execution_does_not_hold_back_others_when_allowed(tok, pool):
    slow = enc(tok, "```python\nimport time\ntime.sleep(0.8)\nprint('slow')\n```\n") + [E]
    fast = enc(tok, "```python\nprint('fast')\n```\n") + [E]
    answered: dict[str, float] = {}
    cursor: dict[str, int] = {}

    def play(rid, prefix):  # noqa: ARG001
        i = cursor.get(rid, 0)
        cursor[rid] = i + 1
        if i == 0:
            return slow if rid.endswith("s0") else fast
        answered[rid] = time.monotonic()
        return enc(tok, "\\boxed{1}") + [EOS]

    engine, _ = engine_for(tok, pool, play, straggler_wait_s=0.05)
    t0 = time.monotonic()
    trajs = engine.rollout(["q"], 2, PARAMS)
    slow_id, fast_id = trajs[0].uid, trajs[1].uid
    assert answered[fast_id] - t0 < 0.6 < answered[slow_id] - t0
    assert all(t.answer == "1" for t in trajs)


def test_bad_config_and_tokenizer(tok, pool):
    with pytest.raises(ValueError):
        RolloutConfig(mode="eager")
    with pytest.raises(ValueError, match="one token"):
        RolloutEngine(ScriptedGenerator({}), tok, pool, RolloutConfig(execute_token="<run>"))


def test_engine_with_a_tiny_random_qwen3(tok, pool):
    """A real model (random weights, Qwen3 architecture and vocabulary) through the engine: the
    log-probs the engine keeps are the model's, position by position, across observations."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ihgrpo.rollout import HFGenerator

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    model = Qwen3ForCausalLM(cfg).eval()
    boost = torch.zeros(151936)
    boost[E] = 12.0  # make the execute token likely, so turns end at E and observations get inserted
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    engine = RolloutEngine(HFGenerator(model, tok, seed=0), tok, pool,
                           RolloutConfig(max_turns=3, max_response_tokens=120, max_tokens_per_turn=20))
    trajs = engine.rollout(["What is 2 + 2?"], 2, SamplingParams(temperature=1.0, seed=11))
    assert len(trajs) == 2
    for t in trajs:
        assert len(t.response_ids) == len(t.mask) == len(t.logprobs) <= 120
        assert any(r.end is TurnEnd.EXECUTE for r in t.turns), [r.end for r in t.turns]
        assert 0 in t.mask and t.mask[0] == 1  # observations were inserted after E
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        start = len(t.prompt_ids)
        for i, (tid, m, lp) in enumerate(zip(t.response_ids, t.mask, t.logprobs)):
            if m:
                assert abs(lp - logp[start + i - 1, tid].item()) < 1e-3, i
            else:
                assert lp == 0.0
        # observation tokens are exactly the tokenizer's encoding of the observation text
        obs = [r.output for r in t.turns if r.output]
        obs_ids = [x for x, m in zip(t.response_ids, t.mask) if m == 0]
        assert obs_ids == [x for o in obs for x in enc(tok, o)]


def test_answer_then_execute_finishes_without_spending_a_turn(tok, pool):
    turns = [enc(tok, "So the answer is \\boxed{42}.") + [E], enc(tok, "unused") + [EOS]]
    engine, gen = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["What is 6 times 7?"], 1, PARAMS)
    assert gen.calls == 1 and len(traj.turns) == 1
    [turn] = traj.turns
    assert turn.end is TurnEnd.EXECUTE and turn.code is None and turn.output is None
    assert traj.finished and not traj.truncated and not traj.void and traj.answer == "42"
    # E is kept as the policy sampled it (mask 1, its log-prob); no observation follows it.
    assert traj.response_ids == turns[0] and traj.mask == [1] * len(turns[0])
    assert traj.logprobs[-1] == scripted_logprob(E, len(traj.prompt_ids) + len(turns[0]) - 1)
    # Prose after the answer: E still asks for an execution, which finds nothing to run.
    turns = [enc(tok, "Maybe \\boxed{42}, let me check.") + [E], enc(tok, "\\boxed{42}") + [EOS]]
    engine, _ = engine_for(tok, pool, turn_player(tok, turns))
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert [t.end for t in traj.turns] == [TurnEnd.EXECUTE, TurnEnd.EOS]
    assert "nothing" in traj.turns[0].output.lower()


@pytest.mark.parametrize("trailing", ["", "  ", "\t", " \r", " " * 6])
def test_coupled_fence_followed_by_spaces_ends_the_turn(tok, pool, trailing):
    """Each block runs at its own fence, whatever follows the fence on its line (a few spaces are
    stop strings; a longer run is cut by the engine after the generator overshoots)."""
    plan = (f"Set up.\n```python\na = 3\n```{trailing}\nNext.\n```python\nprint(a * 7)\n```{trailing}\n"
            "So \\boxed{21}")

    def play(rid, prefix):  # noqa: ARG001 -- the plan, continued from what the model has written
        text = tok.decode(prefix).rsplit("<|im_start|>assistant\n", 1)[-1]
        text = text.removeprefix("<think>\n\n</think>\n\n")  # the template's non-thinking mode
        written = re.sub(r"\nCode execution result: .*?\n</tool_call>\n", "", text, flags=re.S)
        assert plan.startswith(written)
        return enc(tok, plan[len(written):]) + [EOS]

    engine, _ = engine_for(tok, pool, play, mode="coupled")
    [traj] = engine.rollout(["q"], 1, PARAMS)
    assert [t.end for t in traj.turns] == [TurnEnd.CODE_BLOCK, TurnEnd.CODE_BLOCK, TurnEnd.EOS]
    assert [(t.code, t.blocks_run) for t in traj.turns[:2]] == [("a = 3", 1), ("print(a * 7)", 1)]
    assert "21" in traj.turns[1].output and traj.answer == "21"
    assert traj.model_text == plan + "<|im_end|>"
    assert batch_stats([traj])["delay_call_rate"] == 0.0
    start = len(traj.prompt_ids)
    for i, (tid, m, lp) in enumerate(zip(traj.response_ids, traj.mask, traj.logprobs)):
        assert lp == (scripted_logprob(tid, start + i) if m else 0.0)


def test_seeded_trajectories_get_their_own_seed_per_generation_call(tok, pool):
    """Per-request seeds: the n-th call for a trajectory samples with derive_seed(its seed, n),
    whatever else shares the round; a round with an unseeded trajectory passes no seeds."""
    from ihgrpo.rollout import Trajectory, derive_seed

    turns = [enc(tok, DEFER_TWO) + [E], enc(tok, "So the answer is \\boxed{42}.") + [EOS]]
    engine, gen = engine_for(tok, pool, turn_player(tok, turns))
    prompt = engine.chat.prompt_ids("What is 6 times 7?")
    trajs = [Trajectory(uid=f"t{i}", prompt_index=0, sample_index=i, prompt_ids=list(prompt), seed=seed)
             for i, seed in enumerate((11, 22))]
    engine.run(trajs, PARAMS)
    assert all(t.answer == "42" for t in trajs)
    assert gen.seeds == [[derive_seed(11, 0), derive_seed(22, 0)], [derive_seed(11, 1), derive_seed(22, 1)]]
    assert len({derive_seed(11, 0), derive_seed(11, 1), derive_seed(22, 0), derive_seed(12, 0)}) == 4
    engine2, gen2 = engine_for(tok, pool, turn_player(tok, turns))
    engine2.run([Trajectory(uid="a", prompt_index=0, sample_index=0, prompt_ids=list(prompt), seed=11),
                 Trajectory(uid="b", prompt_index=0, sample_index=1, prompt_ids=list(prompt))], PARAMS)
    assert gen2.seeds == [None, None]
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prefixes"):
        gen2.generate([[1], [2]], PARAMS, request_ids=["a", "b"], seeds=[5])


def test_max_batch_rows_chunks_generation_without_changing_seeded_samples(tok, pool):
    """rollout.max_batch_rows bounds the rows of one generate call (the KV cache of a lock-step
    batch); every trajectory is still rolled out, and with a seed each row samples from its own
    stream, so the chunked run equals the one-call-per-round run token for token."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ihgrpo.rollout import HFGenerator

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    model = Qwen3ForCausalLM(cfg).eval()
    boost = torch.zeros(151936)
    boost[E] = 11.0  # turns end at E at different lengths: rounds with fewer and fewer live rows
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)

    class Recording(HFGenerator):
        def generate(self, prefixes, *a, **k):
            self.calls.append(len(prefixes))
            return super().generate(prefixes, *a, **k)

    def run(max_rows):
        gen = Recording(model, tok, seed=0)
        gen.calls = []
        engine = RolloutEngine(gen, tok, pool, RolloutConfig(max_turns=3, max_response_tokens=60,
                                                             max_tokens_per_turn=16, max_batch_rows=max_rows))
        trajs = engine.rollout(["What is 2 + 2?", "What is 3 * 5?", "Name a prime."], 3,
                               SamplingParams(temperature=1.0, seed=5))
        return trajs, gen.calls

    one_call, calls_one = run(9)  # all 9 trajectories fit one call: one call per round
    chunked, calls_chunked = run(2)
    assert max(calls_one) == 9 and max(calls_chunked) == 2
    assert sum(calls_chunked) == sum(calls_one)  # the same rows, in more calls
    assert len(calls_chunked) > len(calls_one)
    assert [t.response_ids for t in chunked] == [t.response_ids for t in one_call]
    assert [t.mask for t in chunked] == [t.mask for t in one_call]
    for a, b in zip(chunked, one_call):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert len({tuple(t.response_ids) for t in chunked}) == 9  # rows do not share a stream
    with pytest.raises(ValueError, match="max_batch_rows"):
        RolloutConfig(max_batch_rows=0)
