"""The demo's task family and tokenizer: determinism, split disjointness, exact round trips."""

from __future__ import annotations

import random
import re

import pytest

from ihgrpo.demo.task import (OPS, Problem, TaskConfig, check_problem, generate_problems, make_problem,
                              split_of)
from ihgrpo.demo.tokenizer import (BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, OBSERVATION_END_TOKEN, PAD_TOKEN,
                                   build_tokenizer, render_chat)
from ihgrpo.protocol import EXECUTE_TOKEN, NO_OUTPUT_MESSAGE, NOTHING_PENDING_MESSAGE, OBSERVATION_PREFIX


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ----------------------------------------------------------------------------- task

def test_generation_is_deterministic():
    a = generate_problems(50, seed=3, split="train")
    b = generate_problems(50, seed=3, split="train")
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    c = generate_problems(50, seed=4, split="train")
    assert [p.question for p in a] != [p.question for p in c]
    r1, r2 = random.Random(7), random.Random(7)
    assert make_problem(r1).to_dict() == make_problem(r2).to_dict()


def test_splits_are_disjoint_and_hash_defined():
    train = generate_problems(600, seed=0, split="train")
    test = generate_problems(300, seed=0, split="test")
    # other seeds draw other problems, still from their own side of the partition
    test2 = generate_problems(300, seed=1, split="test")
    train_q = {p.question for p in train}
    assert len(train_q) == 600 and len({p.question for p in test}) == 300
    assert not train_q & {p.question for p in test + test2}
    assert all(split_of(p.question) == "train" for p in train)
    assert all(split_of(p.question) == "test" for p in test + test2)
    everything = generate_problems(1000, seed=5, split="all")
    frac = sum(split_of(p.question) == "test" for p in everything) / len(everything)
    assert 0.14 < frac < 0.26  # test_fraction 0.2


def test_problem_shape_and_answers():
    cfg = TaskConfig(min_steps=3, max_steps=7)
    problems = generate_problems(400, seed=1, split="all", cfg=cfg)
    lengths = {p.n_steps for p in problems}
    assert lengths == set(range(3, 8))
    for p in problems:
        assert check_problem(p)
        assert p.answer == str(p.steps[-1].value) and int(p.answer) >= 0
        assert p.question.endswith(f"What is {p.steps[-1].name}?")
        names = [s.name for s in p.steps]
        assert names == list("abcdefg"[:len(names)])
        for s in p.steps[1:]:  # every later step depends on an earlier variable
            assert any(re.search(rf"\b{v}\b", s.expr) for v in names[:names.index(s.name)])
        assert all(s.text in p.question for s in p.steps)
        assert len(p.question) < 400
        assert Problem.from_dict(p.to_dict()) == p
    ops = {s.op for p in problems for s in p.steps}
    assert ops == set(OPS)
    # large numbers: most first steps are beyond mental arithmetic
    assert sum(p.steps[0].value > 10 ** 5 for p in problems) > len(problems) // 2


def test_difficulty_knobs():
    cfg = TaskConfig(min_steps=5, max_steps=5, start_digits=(2, 2), ops=("mul", "mod", "add"))
    ps = generate_problems(50, seed=2, cfg=cfg)
    assert all(p.n_steps == 5 for p in ps)
    assert all(s.op in ("mul", "mod", "add") for p in ps for s in p.steps)
    assert all(check_problem(p) for p in ps)
    assert all(re.match(r"Let a be \d\d times \d\.", p.question) for p in ps)  # 2-digit start number
    code = generate_problems(20, seed=2, cfg=TaskConfig(phrasing="code"))
    assert all(p.question.splitlines()[:-1] == [s.code for s in p.steps] for p in code)
    with pytest.raises(ValueError):
        TaskConfig(ops=("mod", "div"))  # nothing makes numbers grow
    with pytest.raises(ValueError):
        TaskConfig(start_digits=(3, 2))
    with pytest.raises(ValueError):
        TaskConfig(min_steps=4, max_steps=3)
    with pytest.raises(ValueError):
        generate_problems(1, split="dev")


# ----------------------------------------------------------------------------- tokenizer

def test_special_tokens_are_single_ids(tok):
    ids = {t: tok.encode(t, add_special_tokens=False) for t in
           (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, EXECUTE_TOKEN, OBSERVATION_END_TOKEN)}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == 5
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id == ids[EOS_TOKEN][0] and tok.pad_token_id == ids[PAD_TOKEN][0]
    # inside text too
    s = "```python\nx = 1\n```\n<tool_call>\nCode execution result: 1\n</tool_call>\n"
    enc = tok.encode(s, add_special_tokens=False)
    assert ids[EXECUTE_TOKEN][0] in enc and ids[OBSERVATION_END_TOKEN][0] in enc
    assert tok.encode(s) == enc  # no BOS / EOS added


def test_digits_are_split(tok):
    for n in ("0", "7", "48213", "9876543210123"):
        assert tok.convert_ids_to_tokens(tok.encode(n, add_special_tokens=False)) == list(n)
    pieces = tok.convert_ids_to_tokens(tok.encode("a = 48213 * 7741", add_special_tokens=False))
    assert sum(p.isdigit() and len(p) == 1 for p in pieces) == 9


@pytest.mark.parametrize("text", [
    "Let a be 48213 times 7741. Let b be a divided by 97, rounded down. What is b?",
    "```python\na = pow(25061, 72, 157)\nb = sum(range(a, 900 + 1))\nprint(b)\n```\n" + EXECUTE_TOKEN,
    OBSERVATION_PREFIX + "NameError: name 'c' is not defined" + "\n</tool_call>\n",
    OBSERVATION_PREFIX + NO_OUTPUT_MESSAGE + "\n</tool_call>\n" + NOTHING_PENDING_MESSAGE,
    "So the answer is \\boxed{62111}.\n\n  two  spaces\ttab\r\nCRLF",
    "unicode: π ≈ 3.14159, émigré, 数学, emoji 🙂, $\\frac{1}{2}$",
    " leading space and trailing space ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
])
def test_exact_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_round_trip_of_generated_traces(tok):
    from ihgrpo.demo.sft import STYLES, trace_texts

    rng = random.Random(0)
    for i, p in enumerate(generate_problems(40, seed=9, split="test")):
        turns, obs, _ = trace_texts(p, STYLES[i % 4], rng)
        text = render_chat(p.question) + "".join(t + o for t, o in zip(turns, obs + [""])) + EOS_TOKEN
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nWhat is 2?<|im_end|>\n<|im_start|>assistant\n" == render_chat("What is 2?")
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nWhat is 2?<|im_end|>\n"
    assert tok.chat_template == CHAT_TEMPLATE


def test_tokenizer_is_deterministic_and_small(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert 300 <= len(tok) <= 1024
    # every word of the task is one token (short sequences, and one token to copy per word)
    for word in (" squared", " times", " divided", " rounded", " plus", " minus"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_save_and_load(tok, tmp_path):
    from transformers import AutoTokenizer

    from ihgrpo.rollout import ChatFormat

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    text = render_chat("Let a be 3 times 4. What is a?") + "```python\na = 3 * 4\nprint(a)\n```\n<tool_call>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    a, b = ChatFormat(tok), ChatFormat(loaded)
    assert a.prompt_ids("hi") == b.prompt_ids("hi")
    assert a.execute_token_id == b.execute_token_id and a.eos_token_ids == b.eos_token_ids
