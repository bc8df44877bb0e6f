"""Tests for ihgrpo.protocol: fences, pending code, observations, answers, turn logic, prompt."""

from __future__ import annotations

import ast
import sys
from types import SimpleNamespace

import pytest

from ihgrpo.protocol import (
    EXECUTE_TOKEN,
    NO_OUTPUT_MESSAGE,
    NOTHING_PENDING_MESSAGE,
    OBSERVATION_PREFIX,
    OBSERVATION_SUFFIX,
    STATE_LOST_MESSAGE,
    TIMEOUT_MESSAGE,
    CodeBlock,
    Mode,
    TurnEnd,
    answer_before_execute,
    build_prompt,
    coupled_block_end,
    extract_boxed,
    find_code_blocks,
    format_observation,
    is_void,
    next_action,
    pending_code,
    truncate_middle,
)

E = EXECUTE_TOKEN


def result(**kw):
    base = dict(stdout="", stderr="", ok=True, timed_out=False, state_lost=False, crashed=False, error="")
    base.update(kw)
    return SimpleNamespace(**base)


def body(obs: str) -> str:
    assert obs.startswith(OBSERVATION_PREFIX) and obs.endswith(OBSERVATION_SUFFIX)
    return obs[len(OBSERVATION_PREFIX): len(obs) - len(OBSERVATION_SUFFIX)]


# ----------------------------------------------------------------------------- fences

@pytest.mark.parametrize("tag", ["python", "py", "Python", "PY", "python3", "python  "])
def test_python_fence_tags(tag):
    text = f"Let me compute.\n```{tag}\nx = 1\nprint(x)\n```\nDone."
    [b] = find_code_blocks(text)
    assert b.code == "x = 1\nprint(x)"
    assert b.start == text.index("```")
    assert text[b.end:] == "Done."  # end is past the closing fence's newline


@pytest.mark.parametrize("tag", ["", "text", "bash", "pycon", "output"])
def test_non_python_fences_are_skipped_whole(tag):
    # The ```python line inside the other block is content (a closing fence has no info string),
    # so "print('inside')" is never code; the block after it is.
    text = f"Format:\n```{tag}\n```python\nprint('inside')\n```\nNow code:\n```python\ny = 2\n```\n"
    assert [b.code for b in find_code_blocks(text)] == ["y = 2"]
    assert pending_code(text + E) == "y = 2"


def test_unterminated_block_is_not_returned():
    text = "```python\nx = 1\n```\nmore\n```python\ny = undefined_thing(\n"
    assert [b.code for b in find_code_blocks(text)] == ["x = 1"]
    assert pending_code("```python\nprint('half')") is None


def test_fence_inside_string_literal_is_not_a_fence():
    text = '```python\ns = "```python"\nt = """\n  x ```\n"""\nprint(len(s))\n```\n'
    [b] = find_code_blocks(text)
    assert b.code == 's = "```python"\nt = """\n  x ```\n"""\nprint(len(s))'
    # Not at line start in prose either: no block opens.
    assert find_code_blocks('He wrote s = "```python" and then\nx = 1\n```\n') == []


def test_fence_indentation_rules():
    # Up to 3 spaces: a fence, and that indentation is removed from the content.
    [b] = find_code_blocks("   ```python\n   for i in range(2):\n       print(i)\n   ```\n")
    assert b.code == "for i in range(2):\n    print(i)"
    ast.parse(b.code)
    # 4 spaces: an indented code line, not a fence.
    assert find_code_blocks("    ```python\n    x = 1\n    ```\n") == []


def test_longer_backtick_runs_need_matching_close():
    text = "````python\nx = '''\n```\n'''\n````\n"
    [b] = find_code_blocks(text)
    assert b.code == "x = '''\n```\n'''"


def test_closing_fence_at_end_of_complete_text_and_crlf():
    assert [b.code for b in find_code_blocks("```python\nx = 1\n```")] == ["x = 1"]
    assert [b.code for b in find_code_blocks("```python\r\nx = 1\r\n```  \r\n")] == ["x = 1"]


def test_codeblock_is_frozen():
    b = CodeBlock("x", 0, 1)
    with pytest.raises(Exception):
        b.code = "y"  # type: ignore[misc]


# ----------------------------------------------------------------------------- pending code

def test_several_blocks_joined_in_order_and_run():
    window = (
        "First define.\n```python\na = 3\n```\nThen use it.\n```py\nb = a * 4\n```\n"
        "And show it.\n```python\nprint(a + b)\n```\n" + E
    )
    code = pending_code(window)
    assert code == "a = 3\nb = a * 4\nprint(a + b)"
    ns: dict = {}
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<pending>", "exec"), ns)
    assert buf.getvalue() == "15\n"


def test_execute_token_right_after_fence():
    assert pending_code("```python\nx = 1\n```" + E) == "x = 1"
    assert pending_code("```python\nx = 1\n```\n" + E + "\n") == "x = 1"
    assert pending_code("```python\nx = 1\n```<E>", execute_token="<E>") == "x = 1"
    # E inside an unclosed block: half-written code is not run.
    assert pending_code("```python\nx = 1\n" + E) is None


def test_nothing_pending():
    assert pending_code("I think the answer is 4. " + E) is None
    assert pending_code("```python\n\n```\n" + E) is None  # blank blocks do not count
    obs = format_observation(None, nothing_pending=True)
    assert body(obs) == NOTHING_PENDING_MESSAGE
    assert "nothing was run" in obs.lower()
    with pytest.raises(ValueError):
        format_observation(None)


def test_observation_excluded_from_model_text():
    # The caller passes only the model's turns; a \boxed or a ```python that appears only in the
    # observation therefore never counts, while the model's own code (even if it prints \boxed) does.
    turn1 = "```python\nprint(r'\\boxed{3}')\nprint('```python')\n```\n" + E
    obs = format_observation(result(stdout="\\boxed{3}\n```python\n"))
    turn2 = "So the value is 3, but let me double check: it is \\boxed{4}."
    full_context = turn1 + obs + turn2
    model_text = turn1 + turn2
    assert extract_boxed(model_text) == "4"
    assert extract_boxed(turn1) == "3"  # inside model-written code: still found (documented)
    assert extract_boxed(obs) == "3"  # why observations must be excluded
    assert pending_code(turn1) == "print(r'\\boxed{3}')\nprint('```python')"
    # Next window holds only turn2: the observation's ```python does not open a block in it.
    assert pending_code(turn2) is None
    assert extract_boxed(full_context) == "4"


# ----------------------------------------------------------------------------- coupled

def test_coupled_block_end_on_growing_prefixes():
    text = "Compute:\n```python\nprint(2 + 2)\n```\nThe result follows."
    stop = text.index("```\nThe") + 4
    ends = [coupled_block_end(text[:i]) for i in range(len(text) + 1)]
    assert all(e is None for e in ends[:stop])  # incl. "...\n```" with no newline yet
    assert all(e == stop for e in ends[stop:])
    assert text[:stop].endswith("print(2 + 2)\n```\n")


def test_coupled_ignores_non_python_and_incomplete_closing():
    assert coupled_block_end("```text\nabc\n```\n") is None
    # "```" at the end could still grow into "````" or "```python": not yet a closing fence.
    assert coupled_block_end("```python\nx = 1\n```") is None
    t = "```python\nx = 1\n```\n```python\ny = 2\n```\n"
    assert coupled_block_end(t) == t.index("```\n```python") + 4


# ----------------------------------------------------------------------------- truncation

def test_truncate_middle_bounds_and_marker():
    assert truncate_middle("short", 10) == "short"
    text = "".join(f"line {i}\n" for i in range(1000))
    out = truncate_middle(text, 100)
    omitted = len(text) - 100
    marker = f"\n...[{omitted} characters omitted]...\n"
    assert marker in out
    assert len(out) == 100 + len(marker)
    assert out.startswith(text[:50]) and out.endswith(text[-50:])
    assert truncate_middle(text, 100) == out  # deterministic
    assert truncate_middle("abcdef", 0) == "\n...[6 characters omitted]...\n"
    with pytest.raises(ValueError):
        truncate_middle("abc", -1)


# ----------------------------------------------------------------------------- observations

def test_observation_ok():
    obs = format_observation(result(stdout="42\n"))
    assert obs == OBSERVATION_PREFIX + "42" + OBSERVATION_SUFFIX


def test_observation_error_keeps_stdout():
    r = result(stdout="step 1\n", ok=False, stderr="Traceback (most recent call last):\n  ...\nNameError: name 'x' is not defined\n",
               error="NameError: name 'x' is not defined")
    assert body(format_observation(r)) == "step 1\nNameError: name 'x' is not defined"
    # Without `error`, the last non-empty stderr line is used.
    r2 = result(ok=False, stderr="Traceback...\nZeroDivisionError: division by zero\n\n")
    assert body(format_observation(r2)) == "ZeroDivisionError: division by zero"
    assert body(format_observation(result(ok=False))) == "Execution failed."


def test_observation_warning_does_not_hide_stdout():
    r = result(stdout="0.5\n", stderr="DeprecationWarning: old api\n", ok=True)
    b = body(format_observation(r))
    assert b == "0.5"
    assert "Warning" not in b


def test_observation_timeout_and_crash():
    b = body(format_observation(result(stdout="partial\n", ok=False, timed_out=True, error="timed out after 10 s")))
    assert b == "partial\n" + TIMEOUT_MESSAGE
    assert "timed out" in TIMEOUT_MESSAGE.lower()
    assert body(format_observation(result(ok=False, timed_out=True))) == TIMEOUT_MESSAGE
    b = body(format_observation(result(ok=False, crashed=True, error="killed: memory limit")))
    assert "crashed" in b and "memory limit" in b


def test_observation_state_lost_and_empty_output():
    b = body(format_observation(result(state_lost=True, stdout="1\n")))
    assert b == STATE_LOST_MESSAGE + "\n1"
    assert "lost" in STATE_LOST_MESSAGE
    assert body(format_observation(result())) == NO_OUTPUT_MESSAGE
    assert "print()" in NO_OUTPUT_MESSAGE
    assert body(format_observation(result(stdout="\n\n"))) == NO_OUTPUT_MESSAGE


def test_observation_truncated():
    long = "x" * 5000 + "END"
    b = body(format_observation(result(stdout=long), max_chars=200))
    assert "characters omitted" in b and b.endswith("END")
    assert len(b) < 300


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{ 2 }", "2"),
    (r"$\boxed 5$ done", "5"),
    (r"\boxed 7", "7"),
    (r"\fbox{x^{2}}", "x^{2}"),
    (r"\boxed {9}", "9"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\left\{ 1 \right.}", r"\left\{ 1 \right."),  # escaped brace is not a group
    (r"\boxed{3} and later \boxed{\frac{1}{2}", "3"),  # unterminated last: fall back
    (r"answer in \boxed{} ... \boxed{8}", "8"),
    (r"\boxed{8} ... template \boxed{}", "8"),  # empty: skipped
    ("no answer here", None),
    (r"\boxedx{3}", None),
    (r"\boxed{", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_is_void():
    assert is_void("I give up.", finished_by_eos=True)
    assert not is_void(r"It is \boxed{2}.", finished_by_eos=True)
    assert not is_void("I was cut off mid", finished_by_eos=False)


# ----------------------------------------------------------------------------- turn logic

@pytest.mark.parametrize("end, used, cap, expected", [
    (TurnEnd.EXECUTE, 1, 5, "execute"),
    (TurnEnd.EXECUTE, 4, 5, "execute"),
    (TurnEnd.EXECUTE, 5, 5, "stop"),
    (TurnEnd.CODE_BLOCK, 2, 5, "execute"),
    (TurnEnd.CODE_BLOCK, 5, 5, "stop"),
    (TurnEnd.EOS, 1, 5, "stop"),
    (TurnEnd.EOS, 5, 5, "stop"),
    (TurnEnd.BUDGET, 1, 5, "truncate"),
    (TurnEnd.BUDGET, 5, 5, "truncate"),
    ("execute", 1, 1, "stop"),
    ("eos", 0, 3, "stop"),
])
def test_next_action(end, used, cap, expected):
    assert next_action(end, used, cap) == expected


def test_next_action_rejects_bad_input():
    with pytest.raises(ValueError):
        next_action("explode", 1, 5)
    with pytest.raises(ValueError):
        next_action(TurnEnd.EXECUTE, 1, 0)


# ----------------------------------------------------------------------------- prompt

def test_build_prompt_delayed():
    q = "What is 2 + 2?"
    p = build_prompt(q)
    assert p.endswith("\n\n" + q)
    assert E in p and "{execute_token}" not in p
    assert "\\boxed{" in p and "```python" in p and "print()" in p
    assert "Code execution result:" in p and "</tool_call>" in p
    # The worked example has two deferred blocks, then one execution.
    example = p[p.index("Example:"):]
    assert example.count("```python") == 2 and example.count(E) == 1
    assert example.index(E) > example.rindex("```python")
    assert pending_code(example[: example.index(E) + len(E)]) == (
        "squares = [k * k for k in range(1, 13)]\ntotal = sum(squares)\nprint(total, total % 7)"
    )


def test_build_prompt_example_is_correct():
    # The worked example's shown output must be the real output (never invent outputs).
    squares = [k * k for k in range(1, 13)]
    assert (sum(squares), sum(squares) % 7) == (650, 6)


def test_build_prompt_modes_and_custom():
    q = "Find x."
    assert build_prompt(q, "coupled") == build_prompt(q, Mode.COUPLED)
    c = build_prompt(q, Mode.COUPLED)
    assert "as soon as" in c and c.endswith(q)
    assert build_prompt(q, execute_token="<run>").count("<run>") >= 2
    custom = build_prompt(q, instruction="Q: {question}\nRun with {execute_token}. A: \\boxed{}")
    assert custom == "Q: Find x.\nRun with <tool_call>. A: \\boxed{}"
    assert build_prompt(q, instruction="Just solve it.") == "Just solve it.\n\nFind x."
    with pytest.raises(ValueError):
        build_prompt(q, "parallel")


def test_module_imports_only_stdlib():
    import ihgrpo.protocol as proto
    src = open(proto.__file__).read()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    assert mods <= set(sys.stdlib_module_names) | {"__future__"}


# ----------------------------------------------------------------------------- leniency (issue 13)

def test_closing_fence_right_after_the_last_code_line():
    text = "Compute.\n```python\nx = 6 * 7\nprint(x)```\nDone."
    [b] = find_code_blocks(text)
    assert b.code == "x = 6 * 7\nprint(x)" and text[b.end:] == "Done."
    assert pending_code("```python\nprint(1)```" + E) == "print(1)"
    assert pending_code("```python\nprint(1)```  \n" + E) == "print(1)"
    # A shorter run than the opening fence is content, as for a fence line.
    assert find_code_blocks("````python\nx = 1```\ny = 2\n````\n")[0].code == "x = 1```\ny = 2"
    # Backticks that end a line inside a string literal are the string's, not a fence.
    text = '```python\ns = """abc```\ndef"""\nt = \'x```\'\nprint(s, t)\n```\n'
    [b] = find_code_blocks(text)
    assert b.code == 's = """abc```\ndef"""\nt = \'x```\'\nprint(s, t)'
    # Other languages close the same way, so their content never swallows a python block.
    assert [b.code for b in find_code_blocks("```text\n42```\n```python\ny = 2\n```\n")] == ["y = 2"]


def test_closing_fence_after_code_counts_once_its_line_ends():
    text = "```python\nprint(2 + 2)```\nThe result follows."
    stop = text.index("```\nThe") + 4
    ends = [coupled_block_end(text[:i]) for i in range(len(text) + 1)]
    assert all(e is None for e in ends[:stop]) and all(e == stop for e in ends[stop:])


@pytest.mark.parametrize("line, code", [
    ("```python print(6 * 7)```", "print(6 * 7)"),
    ("```py x = 1; print(x)```  ", "x = 1; print(x)"),
    ("``` python print(1)```", "print(1)"),
    ("```python s = '```'; print(s)```", "s = '```'; print(s)"),
])
def test_one_line_block(line, code):
    text = f"Check:\n{line}\nSo it is."
    [b] = find_code_blocks(text)
    assert b.code == code and text[b.end:] == "So it is."
    assert pending_code(line + E) == code
    assert coupled_block_end(line) is None and coupled_block_end(line + "\n") == len(line) + 1


@pytest.mark.parametrize("line", [
    "```python```",                      # no code
    "```text hello```",                  # not python
    "```python print(1)``` and more",    # text after the closing run: inline code, not a block
    "````python print(1)```",            # closing run shorter than the opening one
    "```python s = '```",                # the run is inside a string literal
    "x = 1 ```python print(1)```",       # not at the start of a line
])
def test_what_is_not_a_one_line_block(line):
    text = f"{line}\n```python\ny = 2\n```\n"
    assert [b.code for b in find_code_blocks(text)] == ["y = 2"]


def test_uniformly_indented_body_runs_dedented():
    [b] = find_code_blocks("```python\n    x = 3\n\n    if x:\n        print(x)\n```\n")
    assert b.code == "x = 3\n\nif x:\n    print(x)"
    ast.parse(b.code)
    assert find_code_blocks("```python\n\tx = 1\n\tprint(x)\n```\n")[0].code == "x = 1\nprint(x)"
    # Not uniformly indented: left alone (a continuation or a mistake is not ours to fix).
    assert find_code_blocks("```python\nx = (1 +\n     2)\n```\n")[0].code == "x = (1 +\n     2)"
    assert find_code_blocks("```python\n  x = 1\ny = 2\n```\n")[0].code == "  x = 1\ny = 2"


@pytest.mark.parametrize("text, expected", [
    (r"So the answer is \boxed{42}." + E, "42"),
    ("The answer is $\\boxed{\\frac{1}{2}}$.\n" + E + "\n", r"\frac{1}{2}"),
    (r"\[ \boxed{7} \]" + E, "7"),
    (r"**\boxed{3}**" + E, "3"),
    (r"\boxed{42}", "42"),                                   # E already stripped by the caller
    (r"Maybe \boxed{42}, let me check." + E, None),          # prose after it: not a final answer
    (r"\boxed{}" + E, None),
    ("I need to compute this." + E, None),
    ("```python\nprint(6 * 7)\n```\n" + r"\boxed{42}" + E, None),  # pending code runs first
])
def test_answer_before_execute(text, expected):
    assert answer_before_execute(text) == expected
