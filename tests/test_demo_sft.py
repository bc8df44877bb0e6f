"""The demo's SFT traces, model and trainer: correct traces, engine equivalence, determinism."""

from __future__ import annotations

import random
import re

import pytest
import torch

from ihgrpo.demo.model import build_model, count_parameters
from ihgrpo.demo.sft import (DEMO_INSTRUCTION, STYLES, SFTConfig, LocalInterpreter, build_trace, build_traces,
                             collate, copy_batch, plan_turns, score_answer, train_sft)
from ihgrpo.demo.task import generate_problems
from ihgrpo.demo.tokenizer import build_tokenizer
from ihgrpo.protocol import EXECUTE_TOKEN, OBSERVATION_PREFIX, build_prompt, extract_boxed
from ihgrpo.rollout import (ChatFormat, RolloutConfig, RolloutEngine, SamplingParams, ScriptedGenerator,
                            batch_stats)
from ihgrpo.sandbox import SandboxPool


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(max_workers=2, timeout_s=3.0) as p:
        yield p


@pytest.fixture(scope="module")
def problems():
    return generate_problems(24, seed="sft-tests", split="train")


def _traces(problems, chat, seed=0):
    """Every style for every problem."""
    rng = random.Random(seed)
    return [build_trace(p, style, chat, rng) for p in problems for style in STYLES]


# ----------------------------------------------------------------------------- traces

def test_every_trace_computes_the_gold_answer(problems, chat):
    for tr in _traces(problems, chat):
        gold = tr.problem.answer
        # the code of the trace, run as the engine runs it, prints the gold answer last
        assert tr.observation_texts[-1] == f"{OBSERVATION_PREFIX}{gold}\n</tool_call>\n", tr.style
        assert extract_boxed(tr.model_text) == gold
        assert score_answer(extract_boxed(tr.model_text), gold) == 1.0
        k = tr.problem.n_steps
        expected_turns = {"stepwise": k + 1, "deferred": 2, "error_fix": 3}.get(tr.style)
        if expected_turns is not None:
            assert tr.n_turns == expected_turns, tr.style
        else:  # grouped: 2 or 3 blocks per execution, at least two executions
            assert 3 <= tr.n_turns <= k + 1
        # each turn but the last ends in E; the last in EOS
        for ids in tr.turn_ids[:-1]:
            assert ids[-1] == chat.execute_token_id
        assert tr.turn_ids[-1][-1] == chat.eos_token_ids[0]
        assert tr.turn_texts[-1] == "\\boxed{" + gold + "}"


def test_error_fix_reads_a_real_error(problems, chat):
    seen = 0
    for p in problems:
        tr = build_trace(p, "error_fix", chat, random.Random(1))
        first = tr.observation_texts[0]
        if "NameError" in first:
            seen += 1
            name = re.search(r"name '(\w)' is not defined", first).group(1)
            assert f"```python\n{name} = " in tr.turn_texts[1]  # the fix rewrites that block
            assert tr.observation_texts[1].endswith(f"{p.answer}\n</tool_call>\n")
    assert seen >= len(problems) // 2


def test_local_interpreter_matches_the_sandbox(pool):
    cells = ["a = 3 ** 40\nb = a % 1000", "print(b)", "b * 2", "c = d + 1", "print(a % 7)\nx = y",
             "sum(map(int, str(a)))", "None"]
    local = LocalInterpreter()
    for cell in cells:
        mine, theirs = local.run(cell), pool.execute_sync("cmp", cell)
        assert (mine.stdout, mine.ok, mine.error) == (theirs.stdout, theirs.ok, theirs.error), cell
    pool.end_session_sync("cmp")


def test_styles_differ_only_in_when_to_execute(problems):
    """Same blocks in the same order; only the E positions differ (error_fix aside)."""
    p = next(p for p in problems if p.n_steps >= 4)
    strip = {s: "".join(plan_turns(p, s, random.Random(0))[:-1]).replace(EXECUTE_TOKEN, "")
             for s in ("stepwise", "deferred", "grouped")}
    assert len(set(strip.values())) == 1
    n_e = {s: "".join(plan_turns(p, s, random.Random(0))).count(EXECUTE_TOKEN) for s in STYLES}
    assert n_e["stepwise"] == p.n_steps and n_e["deferred"] == 1 and 1 < n_e["grouped"] < p.n_steps
    assert n_e["error_fix"] in (1, 2)


def test_prompt_is_the_engines(tok, chat, problems):
    p = problems[0]
    tr = build_trace(p, "deferred", chat, random.Random(0))
    assert tr.prompt_ids == chat.prompt_ids(build_prompt(p.question, instruction=DEMO_INSTRUCTION))
    text = tok.decode(tr.prompt_ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert p.question in text and EXECUTE_TOKEN in text
    assert len(tr.prompt_ids) < 120  # the short instruction keeps the context small


# ----------------------------------------------------------------------------- engine equivalence

def _play(traces, engine_cfg, tok, pool):
    """Plays the traces' model turns through the real engine; returns the trajectories."""
    starts = []
    for tr in traces:
        offsets, pos = {}, 0
        for i, ids in enumerate(tr.turn_ids):
            offsets[pos] = ids
            pos += len(ids) + (len(tr.observation_ids[i]) if i < len(tr.observation_ids) else 0)
        starts.append(offsets)

    def script(rid, prefix):
        i = int(re.search(r"-p(\d+)-s\d+$", rid).group(1))
        return starts[i][len(prefix) - len(traces[i].prompt_ids)]

    engine = RolloutEngine(ScriptedGenerator(script, decode=tok.decode), tok, pool, engine_cfg)
    return engine.rollout([tr.problem.question for tr in traces], 1, SamplingParams(max_new_tokens=512))


def test_traces_equal_what_the_engine_builds(tok, chat, pool, problems):
    traces = _traces(problems[:8], chat, seed=3)
    cfg = RolloutConfig(max_turns=20, max_response_tokens=4000, instruction=DEMO_INSTRUCTION)
    trajs = _play(traces, cfg, tok, pool)
    assert len(trajs) == len(traces)
    for tr, traj in zip(traces, trajs):
        assert traj.prompt_ids == tr.prompt_ids
        assert traj.response_ids == tr.response_ids, tr.style
        assert traj.mask == tr.mask
        assert [t.output for t in traj.turns if t.output is not None] == tr.observation_texts
        assert traj.finished and not traj.truncated and not traj.void
        assert traj.answer == tr.problem.answer
        assert tr.input_ids == traj.prompt_ids + traj.response_ids


def test_turn_cap_cuts_stepwise_but_not_deferred(tok, chat, pool):
    long = generate_problems(4, seed="cap", split="train", n_steps=6)
    traces = [build_trace(p, s, chat, random.Random(0)) for p in long for s in ("stepwise", "deferred")]
    trajs = _play(traces, RolloutConfig(max_turns=4, max_response_tokens=4000, instruction=DEMO_INSTRUCTION),
                  tok, pool)
    for tr, traj in zip(traces, trajs):
        if tr.style == "deferred":
            assert traj.answer == tr.problem.answer and len(traj.turns) == 2
        else:
            assert traj.answer is None and len(traj.turns) == 4 and traj.finished
    for t, tr in zip(trajs, traces):
        t.reward = score_answer(t.answer, tr.problem.answer)
    stats = batch_stats(trajs)
    assert stats["accuracy"] == 0.5
    assert 0 < stats["delay_call_rate"] < 1


# ----------------------------------------------------------------------------- training

def test_collate_masks_prompt_observations_and_padding(tok, chat, problems):
    traces = _traces(problems[:2], chat)
    ids, labels = collate(traces, tok.pad_token_id)
    for i, tr in enumerate(traces):
        n = len(tr.input_ids)
        assert ids[i, :n].tolist() == tr.input_ids
        assert (ids[i, n:] == tok.pad_token_id).all() and (labels[i, n:] == -100).all()
        full_mask = [0] * len(tr.prompt_ids) + tr.mask
        on = [j for j in range(n) if full_mask[j]]
        assert (labels[i, on] == ids[i, on]).all()
        assert (labels[i, [j for j in range(n) if not full_mask[j]]] == -100).all()
        assert sum(full_mask) == sum(len(t) for t in tr.turn_ids)


def test_model_is_a_small_deterministic_qwen3(tok):
    a, b = build_model(tok, seed=5), build_model(tok, seed=5)
    assert type(a).__name__ == "Qwen3ForCausalLM"
    assert 500_000 <= count_parameters(a) <= 5_000_000
    assert a.config.tie_word_embeddings and a.config.vocab_size == len(tok)
    assert a.config.eos_token_id == tok.eos_token_id
    for (n1, p1), (_, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p1, p2), n1
    c = build_model(tok, seed=6)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_sft_loss_decreases_and_is_reproducible(tok):
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                 head_dim=16, num_hidden_layers=1)
    cfg = SFTConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, seed=11, log_every=100,
                    copy_steps=3, copy_batch_size=4)
    runs = []
    for _ in range(2):
        model = build_model(tok, seed=0, **small)
        res = train_sft(model, tok, cfg, log=None)
        runs.append((res.losses, model.model.embed_tokens.weight.detach().clone()))
    (l1, w1), (l2, w2) = runs
    assert l1 == l2 and torch.equal(w1, w2)
    assert len(l1) == 12 and len(res.copy_losses) == 3
    assert sum(l1[-3:]) / 3 < sum(l1[:3]) / 3 - 0.5


def test_copy_batch_asks_for_the_first_half_again(tok):
    ids, labels = copy_batch(tok, random.Random(0), 8)
    sep = tok.encode(" =", add_special_tokens=False)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        on = [j for j, x in enumerate(lab) if x != -100]
        start, end = on[0], on[-1] + 1
        src = row[:start - len(sep)]
        assert row[start - len(sep):start] == sep
        assert row[start:end] == src and lab[start:end] == src  # the copy, and only it, has loss
        assert not set(src) & set(tok.all_special_ids)
    assert torch.equal(copy_batch(tok, random.Random(0), 8)[0], ids)


def test_build_traces_mixes_styles(tok):
    ps = generate_problems(200, seed="mix", split="train")
    traces = build_traces(ps, tok, seed=2)
    counts = {s: sum(t.style == s for t in traces) for s in STYLES}
    assert all(counts[s] > 0 for s in STYLES)
    assert counts["stepwise"] > counts["deferred"]
    again = build_traces(ps, tok, seed=2)
    assert [t.input_ids for t in traces] == [t.input_ids for t in again]
