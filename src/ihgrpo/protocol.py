"""The IH-GRPO rollout protocol as text rules (SPEC sections 1 and 2).

Model- and sandbox-agnostic: standard library only. The rollout loop feeds in the model's own
text (never observations) and gets back what to run, what to show, and what to do next.

Delayed protocol ("D"): ```python blocks stay pending until the execute token E; then every
pending block of the window (text since the previous execution) runs, joined in order.
Coupled protocol ("C"): a turn ends at a python block's closing fence and that block runs at once.

Models do not always write fences by the book; what else counts is listed in find_code_blocks
(a closing run right after the code, one-line blocks, uniformly indented bodies). E right after
a final ``\boxed{...}`` with nothing pending ends the trajectory (answer_before_execute).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = [
    "EXECUTE_TOKEN", "OBSERVATION_PREFIX", "OBSERVATION_SUFFIX", "PYTHON_TAGS", "Mode", "TurnEnd",
    "CodeBlock", "find_code_blocks", "pending_code", "coupled_block_end", "truncate_middle",
    "format_observation", "extract_boxed", "answer_before_execute", "is_void", "next_action",
    "DEFAULT_DELAYED_INSTRUCTION", "DEFAULT_COUPLED_INSTRUCTION", "build_prompt",
    "NOTHING_PENDING_MESSAGE", "NO_OUTPUT_MESSAGE", "TIMEOUT_MESSAGE", "STATE_LOST_MESSAGE",
]

EXECUTE_TOKEN = "<tool_call>"
OBSERVATION_PREFIX = "\nCode execution result: "
OBSERVATION_SUFFIX = "\n</tool_call>\n"

# Info-string languages that make a fenced block runnable. "pycon"/"ipython" are excluded on purpose:
# console transcripts (">>> " prompts, shown output) and IPython magics are not runnable Python.
PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})


class Mode(str, enum.Enum):
    DELAYED = "delayed"
    COUPLED = "coupled"


class TurnEnd(str, enum.Enum):
    """Why one generation turn ended."""

    EXECUTE = "execute"        # the execute token E (delayed protocol)
    CODE_BLOCK = "code_block"  # a python block's closing fence (coupled protocol)
    EOS = "eos"
    BUDGET = "budget"          # per-turn or total token budget: the trajectory is truncated


# ----------------------------------------------------------------------------- code blocks

@dataclass(frozen=True)
class CodeBlock:
    """A closed python block.

    ``start`` is the offset of the opening fence line; ``end`` is the offset just after the
    closing fence line, *including* its newline when there is one (so ``text[:end]`` ends on a
    line boundary).
    """

    code: str
    start: int
    end: int


# Fences follow CommonMark for backticks: <= 3 spaces of indentation, a run of >= 3 backticks,
# an info string without backticks (its first word is the language); the closing fence is a run
# of at least as many backticks with nothing but spaces after it. Tilde fences are not recognised.
_OPEN_RE = re.compile(r" {0,3}(`{3,})([^`]*)")
_CLOSE_RE = re.compile(r" {0,3}(`{3,})[ \t]*")
# Leniency for what models write (documented in find_code_blocks): a closing run right after the
# last code line, and a whole block on one line.
_TRAILING_CLOSE_RE = re.compile(r"(`{3,})[ \t]*\Z")
_ONE_LINE_RE = re.compile(r" {0,3}(`{3,})[ \t]*([^`\s]+)[ \t]+(.*?[^`\s].*?)(`{3,})[ \t]*")


def _lines(text: str) -> Iterator[tuple[int, str, int, bool]]:
    """Yield (start, line without line ending, end after the newline, has_newline)."""
    pos, n = 0, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        if nl == -1:
            yield pos, text[pos:].removesuffix("\r"), n, False
            return
        yield pos, text[pos:nl].removesuffix("\r"), nl + 1, True
        pos = nl + 1


def _open_quote(code: str, quote: str | None = None) -> str | None:
    """The quote of the Python string literal still open at the end of ``code`` (None: none),
    starting inside ``quote``. Knows quotes, triple quotes, backslash escapes and comments: enough
    to tell a closing fence from backticks inside a string."""
    i, n = 0, len(code)
    while i < n:
        c = code[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if code.startswith(quote, i):
                i, quote = i + len(quote), None
                continue
        elif c == "#":
            return None
        elif c in "'\"":
            quote = c * 3 if code.startswith(c * 3, i) else c
            i += len(quote)
            continue
        i += 1
    return quote


def _after_line(line: str, quote: str | None) -> str | None:
    """The open string literal carried to the next line: a triple-quoted one, or a single-quoted
    one continued by a backslash."""
    q = _open_quote(line, quote)
    return q if q and (len(q) == 3 or line.endswith("\\")) else None


def _dedent(lines: list[str]) -> list[str]:
    """Remove the indentation every non-blank line shares (models often indent a whole body
    under a column-0 fence, which Python rejects as "unexpected indent"). A body that is not
    uniformly indented is returned as is."""
    body = [ln for ln in lines if ln.strip()]
    if not body or not body[0][:1].isspace():
        return lines
    margin = body[0][:len(body[0]) - len(body[0].lstrip())]
    for ln in body[1:]:
        while not ln.startswith(margin):
            margin = margin[:-1]
    if not margin:
        return lines
    return [ln[len(margin):] if ln.strip() else "" for ln in lines]


def _one_line_block(line: str) -> str | None:
    """The code of a whole python block written on one line (```` ```python print(1)``` ````)."""
    m = _ONE_LINE_RE.fullmatch(line)
    if (m is None or m.group(2).lower() not in PYTHON_TAGS or len(m.group(4)) < len(m.group(1))
            or _open_quote(m.group(3)) is not None):
        return None
    return m.group(3).strip()


def _iter_blocks(text: str, *, final: bool) -> Iterator[CodeBlock]:
    """Scan closed python blocks. With ``final=False`` the text is still growing, so a closing
    fence on the last line counts only once its newline exists (it could still become ````` or
    ```` ```python ````, which are not a plain closing fence)."""
    ticks = 0                 # backticks of the open fence; 0 = outside any block
    python = False
    indent = start = 0
    quote: str | None = None  # the string literal open in the python body so far
    body: list[str] = []
    for line_start, line, line_end, has_nl in _lines(text):
        complete = has_nl or final
        if not ticks:
            m = _OPEN_RE.fullmatch(line)
            if m:
                info = m.group(2).split()
                ticks, start, body, quote = len(m.group(1)), line_start, [], None
                python = bool(info) and info[0].lower() in PYTHON_TAGS
                indent = len(line) - len(line.lstrip(" "))
            elif complete and (code := _one_line_block(line)) is not None:
                yield CodeBlock(code, line_start, line_end)
            continue
        m = _CLOSE_RE.fullmatch(line)
        if m and len(m.group(1)) >= ticks and complete:
            if python:
                yield CodeBlock("\n".join(_dedent(body)).rstrip("\n"), start, line_end)
            ticks = 0
            continue
        # CommonMark removes the opening fence's indentation from content lines; without this
        # an indented fence (e.g. in a list) would give Python an IndentationError.
        stripped = len(line) - len(line.lstrip(" "))
        content = line[min(indent, stripped):]
        m = _TRAILING_CLOSE_RE.search(content)
        if (m and complete and len(m.group(1)) >= ticks and content[:m.start()].strip()
                and not (python and _open_quote(content[:m.start()], quote))):
            if python:
                body.append(content[:m.start()].rstrip())
                yield CodeBlock("\n".join(_dedent(body)).rstrip("\n"), start, line_end)
            ticks = 0
        elif python:
            body.append(content)
            quote = _after_line(content, quote)


def find_code_blocks(text: str) -> list[CodeBlock]:
    """Closed python blocks of a complete text, in order.

    Fences must start a line (the text's start counts as a line start), so a marker inside a
    string literal is never a fence. Blocks of other languages (and bare ```` ``` ```` openings)
    are skipped whole: a ```` ```python ```` line inside them is content. An unterminated block
    is not returned: half-written code never runs. A closing fence on the last line needs no
    newline, since the text is complete.

    Lenient forms, as models write them:

    * a closing run right after the last code line (```` print(x)``` ````) closes the block, in
      any language, when the run is at least as long as the opening one and ends its line (spaces
      aside); in a python block, not when the backticks are inside a string literal;
    * a whole block on one line closes too: ```` ```python print(1)``` ```` -- a python tag, a
      space, code, a closing run at least as long as the opening one that ends the line, and no
      string literal left open before it. Text after the run makes it inline code, not a block;
    * a body whose non-blank lines all share some indentation runs dedented (Python would reject
      it with "unexpected indent"; a body that is not uniformly indented is left as written).
    """
    return list(_iter_blocks(text, final=True))


def pending_blocks(window_text: str, *, execute_token: str = EXECUTE_TOKEN) -> list[str]:
    """The code of every block pending for one execution, in order.

    ``window_text`` is the model's own text since the previous execution (observations excluded).
    A trailing execute token is ignored, so ```` ```<tool_call> ```` still closes the block whether
    or not the caller included E in the text. Blank blocks are dropped.
    """
    return [b.code for b in find_code_blocks(_strip_execute(window_text, execute_token)) if b.code.strip()]


def _strip_execute(window_text: str, execute_token: str) -> str:
    text = window_text.rstrip()
    return text[: -len(execute_token)] if execute_token and text.endswith(execute_token) else text


def pending_code(window_text: str, *, execute_token: str = EXECUTE_TOKEN) -> str | None:
    """Code to run for one execution: the pending blocks joined with newlines; None if none."""
    codes = pending_blocks(window_text, execute_token=execute_token)
    return "\n".join(codes) if codes else None


def coupled_block_end(turn_text: str) -> int | None:
    """Coupled protocol: offset just after the first closed python block's closing fence line
    (its newline included), or None. The fence line counts only once its newline has been
    generated. A linear scan that stops at the first block: cheap enough per token."""
    return next((b.end for b in _iter_blocks(turn_text, final=False)), None)


# ----------------------------------------------------------------------------- observations

NOTHING_PENDING_MESSAGE = (
    "Nothing was run: no closed ```python block was written since the last execution."
)
NO_OUTPUT_MESSAGE = "(no output; use print() to see values)"
TIMEOUT_MESSAGE = "Execution timed out."
STATE_LOST_MESSAGE = "Note: the interpreter was restarted; variables from earlier executions are lost."


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the head and tail of ``text`` (``max_chars`` characters in all) around a marker
    naming how many characters were dropped. Output length <= max_chars + len(marker)."""
    if max_chars < 0:
        raise ValueError("max_chars must be >= 0")
    if len(text) <= max_chars:
        return text
    head = (max_chars + 1) // 2
    tail = max_chars - head
    marker = f"\n...[{len(text) - max_chars} characters omitted]...\n"
    return text[:head] + marker + text[len(text) - tail:]


def _error_line(result: Any) -> str:
    error = (getattr(result, "error", "") or "").strip()
    if error:
        return error
    stderr_lines = [ln.strip() for ln in (getattr(result, "stderr", "") or "").splitlines()]
    return next((ln for ln in reversed(stderr_lines) if ln), "")


def format_observation(result: Any, *, max_chars: int = 2048, nothing_pending: bool = False) -> str:
    """Full observation text (prefix + body + suffix) for one execution result.

    ``result`` is duck-typed like the sandbox's ExecResult (stdout, stderr, ok, timed_out,
    state_lost, crashed, error). stdout is always shown; stderr is shown only through the error
    line of a failed run, so a warning never hides or clutters stdout.
    """
    if nothing_pending:
        body = NOTHING_PENDING_MESSAGE
    elif result is None:
        raise ValueError("result is None; pass nothing_pending=True when no code was run")
    else:
        parts: list[str] = []
        if getattr(result, "state_lost", False):
            parts.append(STATE_LOST_MESSAGE)
        stdout = (getattr(result, "stdout", "") or "").rstrip("\n")
        if stdout.strip():
            parts.append(stdout)
        if getattr(result, "timed_out", False):
            parts.append(TIMEOUT_MESSAGE)
        elif getattr(result, "crashed", False):
            err = _error_line(result)
            parts.append(f"The interpreter crashed: {err}" if err else "The interpreter crashed.")
        elif not getattr(result, "ok", True):
            parts.append(_error_line(result) or "Execution failed.")
        elif not stdout.strip():
            parts.append(NO_OUTPUT_MESSAGE)
        body = "\n".join(parts)
    return OBSERVATION_PREFIX + truncate_middle(body, max_chars) + OBSERVATION_SUFFIX


# ----------------------------------------------------------------------------- answers

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``open_pos``, or None if it never closes.
    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not count."""
    depth, i = 0, open_pos
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return None


def _boxed(text: str) -> Iterator[tuple[str, int]]:
    """(stripped content, end offset) of each complete, non-empty ``\\boxed``, last one first."""
    for m in reversed(list(_BOXED_RE.finditer(text))):
        rest = text[m.end():]
        after = rest.lstrip(" \t")
        at = len(text) - len(after)
        if after.startswith("{"):
            content = _braced(text, at)
            end = at + len(content) + 2 if content is not None else at
        elif len(after) < len(rest):  # "\boxed 5": one token, up to whitespace or "$"
            content = re.match(r"[^\s$]*", after).group(0)
            end = at + len(content)
        else:
            content = None
        if content is not None and content.strip():
            yield content.strip(), end


def extract_boxed(text: str) -> str | None:
    """Stripped content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``).

    Occurrences are tried from the last one backwards; an unterminated or empty one is skipped.
    Every occurrence in the given text counts, inside code blocks too: callers pass the model's
    own text, so a ``\\boxed`` that only appears in an observation (printed output) never counts.
    """
    return next((content for content, _ in _boxed(text)), None)


# What may follow a final answer: whitespace, closing math delimiters, punctuation, bold.
_ANSWER_TAIL_RE = re.compile(r"(?:\s|[$.!*)\]]|\\[\])])*")


def answer_before_execute(window_text: str, *, execute_token: str = EXECUTE_TOKEN) -> str | None:
    """The final answer when E closes an answer rather than asks to run code, else None.

    Some models end with ``... \\boxed{42}.`` then E, using E as a stop. When nothing is pending
    and the window (the model's text since the previous execution; a trailing E is ignored) ends
    with a complete ``\\boxed{...}`` -- only whitespace, closing ``$``/``\\]``/``\\)``, ``.``, ``!``
    or ``**`` after it -- the trajectory is finished instead of getting a "nothing was run"
    observation and spending a turn. Text after the answer ("let me check") keeps today's rule.
    """
    text = _strip_execute(window_text, execute_token)
    if pending_blocks(text, execute_token=execute_token):
        return None
    last = next(_boxed(text), None)
    if last is None or not _ANSWER_TAIL_RE.fullmatch(text, last[1]):
        return None
    return last[0]


def is_void(model_text: str, finished_by_eos: bool) -> bool:
    """SimpleTIR's void trajectory: stopped by EOS with no boxed answer in the model's own text.
    Truncated (or turn-capped) trajectories are never void."""
    return finished_by_eos and extract_boxed(model_text) is None


def next_action(end: TurnEnd | str, turns_used: int, max_turns: int) -> str:
    """What the rollout loop does after a turn: "execute", "stop" or "truncate".

    ``turns_used`` counts generation turns so far, this one included. When the turn cap is
    reached after E or a closing fence, the answer is "stop" and the pending code is NOT run:
    no later turn would read its output.
    """
    end = TurnEnd(end)
    if max_turns < 1:
        raise ValueError("max_turns must be >= 1")
    if end is TurnEnd.BUDGET:
        return "truncate"
    if end is TurnEnd.EOS:
        return "stop"
    return "stop" if turns_used >= max_turns else "execute"


# ----------------------------------------------------------------------------- prompt

# Placeholders are replaced with str.replace, not str.format, because the text holds LaTeX braces.
DEFAULT_DELAYED_INSTRUCTION = r"""Solve the following math problem step by step. Put the final answer in \boxed{}.

You can use Python. Write code in ```python fenced blocks. A block is not run when you close it: it waits, so you can keep reasoning and write more blocks. When you need a result, write {execute_token} right after a block; every block written since the last execution then runs in order, and the output appears after "Code execution result:". Variables persist across executions. Prefer deferring intermediate steps and executing only when you need a result. Only what you print() is shown. Never invent outputs: wait for the real result.

Example:
First the squares of 1 to 12.
```python
squares = [k * k for k in range(1, 13)]
```
Then their sum and its remainder modulo 7.
```python
total = sum(squares)
print(total, total % 7)
```
{execute_token}
Code execution result: 650 6
</tool_call>
The sum of the first 12 squares is 650, and 650 = 7 * 92 + 6, so the remainder is \boxed{6}."""

DEFAULT_COUPLED_INSTRUCTION = r"""Solve the following math problem step by step. Put the final answer in \boxed{}.

You can use Python. Write code in ```python fenced blocks. Each block runs as soon as you close it, and its output appears right after it, after "Code execution result:". Variables persist across blocks. Only what you print() is shown. Never invent outputs: wait for the real result.

Example:
```python
squares = [k * k for k in range(1, 13)]
total = sum(squares)
print(total, total % 7)
```
Code execution result: 650 6
</tool_call>
The sum of the first 12 squares is 650, and 650 = 7 * 92 + 6, so the remainder is \boxed{6}."""


def build_prompt(question: str, mode: Mode | str = Mode.DELAYED, *, instruction: str | None = None,
                 execute_token: str = EXECUTE_TOKEN) -> str:
    """User-message content: the protocol instruction, then the question.

    ``{execute_token}`` in the instruction becomes ``execute_token``; ``{question}`` (custom
    instructions) becomes the question, otherwise the question follows after a blank line.
    """
    if instruction is None:
        instruction = (DEFAULT_DELAYED_INSTRUCTION if Mode(mode) is Mode.DELAYED
                       else DEFAULT_COUPLED_INSTRUCTION)
    text = instruction.replace("{execute_token}", execute_token)
    if "{question}" in text:
        return text.replace("{question}", question)
    return f"{text}\n\n{question}"
