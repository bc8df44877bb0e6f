"""The rollout viewer: block labels, mask, flags, and escaping of hostile model text."""

from __future__ import annotations

import re

import pytest

from ihgrpo.viewer import label_blocks, render_viewer, write_viewer

HOSTILE = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"


def block(code: str) -> str:
    return f"```python\n{code}\n```\n"


def delayed_record(**extra) -> dict:
    """Two deferred blocks run by one E, then one block run alone, then a block never run."""
    turns = [
        {"text": "Plan.\n" + block("a = 2") + "More.\n" + block("b = a * 3") + block("print(b)") + "<tool_call>",
         "end": "execute", "code": "a = 2\nb = a * 3\nprint(b)", "blocks_run": 3, "output": "\nCode execution result: 6\n</tool_call>\n",
         "ok": True, "timed_out": False},
        {"text": block("print(b + 1)") + "<tool_call>", "end": "execute", "code": "print(b + 1)", "blocks_run": 1,
         "output": "\nCode execution result: 7\n</tool_call>\n", "ok": True, "timed_out": False},
        {"text": "Check\n" + block("c = 1") + r"So \boxed{7}.<|im_end|>", "end": "eos", "code": None, "blocks_run": 0,
         "output": None, "ok": None, "timed_out": False},
    ]
    rec = {"benchmark": "toy", "problem": 0, "sample": 1, "question": "What is 2*3+1?", "gold": "7",
           "answer": "7", "correct": True, "reward": 1.0, "turns": turns,
           "stats": {"truncated": False, "void": False}}
    rec.update(extra)
    return rec


def badges(page: str) -> list[str]:
    return re.findall(r'<span class="badge [a-z-]+">([^<]*)</span>', page)


def test_blocks_are_labelled_deferred_executed_or_not_run():
    page = render_viewer([delayed_record()], title="toy")
    assert badges(page) == ["deferred (execution 1)", "deferred (execution 1)", "executed (execution 1)",
                            "executed (execution 2)", "not run"]
    assert "blocks: 2 executed, 2 deferred, 1 not run" in page
    assert "observation (mask 0) · ok · 3 block(s) run" in page
    assert 'class="model m1"' in page  # model text is marked trainable
    assert "reward 1" in page and "3 turn(s)" in page and "2 execution(s)" in page
    assert '<span class="verdict correct">correct</span>' in page


def test_execute_token_right_after_the_fence_and_nothing_pending():
    turns = [{"text": "```python\nx = 1\n```<tool_call>", "end": "execute", "code": "x = 1", "blocks_run": 1,
              "output": "ok", "ok": True},
             {"text": "<tool_call>", "end": "execute", "code": None, "blocks_run": 0, "output": "Nothing was run"},
             {"text": block("y = 2"), "end": "budget", "code": None, "blocks_run": 0, "output": None}]
    assert [[b[2] for b in t] for t in label_blocks(turns)] == [["executed"], [], ["not run"]]
    coupled = [{"text": block("p = 1"), "end": "code_block", "code": "p = 1", "blocks_run": 1, "output": "o", "ok": False},
               {"text": "text\n" + block("q = 2"), "end": "code_block", "code": "q = 2", "blocks_run": 1, "output": "o",
                "ok": True}]
    assert [[b[2] for b in t] for t in label_blocks(coupled)] == [["executed"], ["executed"]]


def test_hostile_model_text_is_escaped(tmp_path):
    rec = delayed_record(question=HOSTILE, answer=HOSTILE, gold=HOSTILE, title=HOSTILE, correct=False, reward=0.0)
    rec["turns"][0]["text"] = HOSTILE + block("print('</pre></div><script>x()</script>')") + "<tool_call>"
    rec["turns"][0]["output"] = "\nCode execution result: " + HOSTILE + "\n</tool_call>\n"
    rec["turns"][2]["text"] = "```python\n" + HOSTILE + "\n```\n\x07 done"
    path = write_viewer(tmp_path / "v.html", [rec], title=HOSTILE)
    page = path.read_text()
    assert page.count("<script") == 1  # only the page's own script
    assert "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "\x07" not in page and "\\x07 done" in page
    # self-contained: no external resources
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page
    assert "<link" not in page


def test_flags_and_plain_records():
    page = render_viewer([{"text": "no turns here", "truncated": True},
                          {"question": "q", "turns": [], "void": True, "correct": False}])
    assert '<span class="flag">truncated</span>' in page and '<span class="flag">void</span>' in page
    assert "no turns here" in page and "unscored" in page and "wrong" in page
    with pytest.raises(ValueError, match="2 rewards for 1"):
        render_viewer([{"text": "x"}], rewards=[1.0, 0.0])


def test_trajectories_with_tokenizer_show_the_per_token_mask(tmp_path):
    from ihgrpo.demo.tokenizer import build_tokenizer
    from ihgrpo.rollout import RolloutConfig, RolloutEngine, SamplingParams, ScriptedGenerator
    from ihgrpo.sandbox import SandboxPool

    tok = build_tokenizer(n_corpus=60)
    turns = [block("a = 6 * 7") + block("print(a, '<script>')") + "<tool_call>",
             r"So \boxed{42}." + tok.eos_token]
    enc = [tok.encode(t, add_special_tokens=False) for t in turns]
    gen = ScriptedGenerator({"r-0": enc})

    class Engine(RolloutEngine):  # fixed uid for the scripted player
        def rollout_ids(self, prompts, group_size, params):
            from ihgrpo.rollout import Trajectory

            trajs = [Trajectory(uid="r-0", prompt_index=0, sample_index=0, prompt_ids=list(prompts[0]))]
            self.run(trajs, params)
            return trajs

    with SandboxPool(max_workers=1, timeout_s=5.0) as pool:
        engine = Engine(gen, tok, pool, RolloutConfig(max_turns=3, max_response_tokens=400))
        (traj,) = engine.rollout(["What is 6*7?"], 1, SamplingParams(max_new_tokens=200))
    assert traj.answer == "42" and traj.executions == 1
    page = render_viewer([traj], tokenizer=tok, rewards=[1.0], questions=["What is 6*7?"], title="scripted")
    assert badges(page) == ["deferred (execution 1)", "executed (execution 1)"]
    n1, n0 = page.count('class="tok t1"'), page.count('class="tok t0"')
    assert (n1, n0) == (sum(traj.mask), len(traj.mask) - sum(traj.mask)) and n0 > 0
    assert f"{len(traj.mask)} response tokens, {sum(traj.mask)} trainable (mask 1)" in page
    assert "42 &lt;script&gt;" in page and page.count("<script") == 1
    assert "What is 6*7?" in page and "reward 1" in page
    # without questions: the prompt is decoded with the tokenizer
    assert "What is 6*7?" in render_viewer([traj], tokenizer=tok)
