"""A self-contained HTML viewer of rollouts (inline CSS and JS, no external resources).

    write_viewer("rollouts.html", trajectories, tokenizer=tok, rewards=rewards, questions=qs)
    write_viewer("rollouts.html", records)          # dicts, e.g. lines of samples.jsonl

For each trajectory it shows the question, the model's text turn by turn with every python
block marked *deferred* (written before a later E: not run where it was written, it ran with
the block whose E came later), *executed* (the block whose E triggered the run), or *not run*
(no E followed it, or the turn cap stopped the trajectory first), the observations, the
trainable mask (model tokens, mask 1, vs observation tokens, mask 0; per token when a tokenizer
and the token ids are given), the reward / correctness, the number of turns and the flags
(truncated, void). In the coupled protocol every block runs when closed: *executed*.

Everything that comes from the model, the data or the sandbox is HTML-escaped: model text is
untrusted. The page's small script only filters cards by fixed data attributes.

Accepted items: :class:`ihgrpo.rollout.Trajectory` objects (with ``rewards`` and ``questions``
lists aligned with them, or ``t.reward`` / ``t.meta["question"]``), or dicts with some of
``question``, ``turns`` (``text``, ``end``, ``code``, ``blocks_run``, ``output``, ``ok``,
``timed_out``), ``text``, ``answer``, ``gold``, ``correct`` / ``reward``, ``truncated``,
``void``, ``stats``, ``title``, ``response_ids`` + ``mask`` (token view with a tokenizer).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ihgrpo.protocol import EXECUTE_TOKEN, find_code_blocks

__all__ = ["write_viewer", "render_viewer", "normalize_item"]

_SPECIAL_RE = re.compile(r"<\|[^<>|]{1,40}\|>|<tool_call>|</tool_call>")


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _esc(x: Any) -> str:
    """HTML-escaped text; control characters (invalid in HTML) shown as \\xNN."""
    text = html.escape("" if x is None else str(x), quote=True)
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _turns(item: Any) -> list[dict]:
    out = []
    for t in _get(item, "turns", None) or []:
        end = _get(t, "end")
        out.append({"text": _get(t, "text", "") or "", "end": getattr(end, "value", end),
                    "code": _get(t, "code"), "blocks_run": int(_get(t, "blocks_run", 0) or 0),
                    "output": _get(t, "output"), "ok": _get(t, "ok"), "timed_out": bool(_get(t, "timed_out", False))})
    return out


def normalize_item(item: Any, *, reward: float | None = None, question: str | None = None,
                   index: int = 0) -> dict:
    """One trajectory or record as a plain dict with the fields the page shows."""
    stats = _get(item, "stats", None) or {}
    turns = _turns(item)
    if not turns and _get(item, "text"):  # a record with only its full text
        turns = [{"text": _get(item, "text"), "end": None, "code": None, "blocks_run": 0, "output": None,
                  "ok": None, "timed_out": False}]
    if reward is None:
        reward = _get(item, "reward", None)
    correct = _get(item, "correct", None)
    if correct is None and reward is not None:
        correct = float(reward) > 0
    meta = _get(item, "meta", None) or {}
    if question is None:
        question = _get(item, "question", None) or meta.get("question")
    mask = _get(item, "mask", None)
    truncated = _get(item, "truncated", None)
    void = _get(item, "void", None)
    return {
        "title": _get(item, "title", None) or meta.get("title") or _default_title(item, index),
        "question": question,
        "turns": turns,
        "answer": _get(item, "answer", None),
        "gold": _get(item, "gold", None) or meta.get("gold"),
        "reward": None if reward is None else float(reward),
        "correct": None if correct is None else bool(correct),
        "truncated": bool(stats.get("truncated", False) if truncated is None else truncated),
        "void": bool(stats.get("void", False) if void is None else void),
        "response_ids": list(_get(item, "response_ids", None) or []),
        "prompt_ids": list(_get(item, "prompt_ids", None) or []),
        "mask": list(mask) if mask is not None else [],
        "options": _get(item, "options", None),
        "choice": _get(item, "choice", None),
    }


def _default_title(item: Any, index: int) -> str:
    bench = _get(item, "benchmark", None)
    p = _get(item, "problem", _get(item, "prompt_index", None))
    s = _get(item, "sample", _get(item, "sample_index", None))
    parts = [str(bench)] if bench is not None else []
    if p is not None:
        parts.append(f"problem {p}")
    if s is not None:
        parts.append(f"sample {s}")
    return " · ".join(parts) or f"trajectory {index}"


# ----------------------------------------------------------------------------- block labels

def label_blocks(turns: list[dict], execute_token: str = EXECUTE_TOKEN) -> list[list[tuple[int, int, str, int | None]]]:
    """For each turn, its python blocks as (start, end, label, execution number).

    label: "executed" (the last block before the E that ran it), "deferred" (ran at a later
    E, together with the executed one), "not run". The execution number counts executions
    from 1 (None for blocks that did not run).
    """
    out: list[list[list]] = []
    pending: list[list] = []  # blocks since the last execution, as mutable entries
    n_exec = 0
    for turn in turns:
        text = turn["text"]
        blocks = []
        for b in find_code_blocks(_strip_specials(text, execute_token)):
            if not b.code.strip():
                continue
            entry = [b.start, b.end, "not run", None]
            blocks.append(entry)
            pending.append(entry)
        out.append(blocks)
        if turn.get("code") is not None or turn.get("blocks_run"):
            n_exec += 1
            ran = pending[-turn["blocks_run"]:] if turn.get("blocks_run") else pending[-1:]
            for entry in ran[:-1]:
                entry[2], entry[3] = "deferred", n_exec
            if ran:
                ran[-1][2], ran[-1][3] = "executed", n_exec
            pending = []
        elif turn.get("output") is not None:  # E with nothing pending: the window resets
            pending = []
    return [[tuple(e) for e in blocks] for blocks in out]


def _strip_specials(text: str, execute_token: str) -> str:
    """Same length as ``text``: control tokens blanked so that ``E`` right after a fence still
    closes the block (offsets stay valid)."""
    def blank(m: re.Match) -> str:
        return "\n" + " " * (len(m.group(0)) - 1) if m.group(0) == execute_token else " " * len(m.group(0))
    return _SPECIAL_RE.sub(blank, text)


# ----------------------------------------------------------------------------- rendering

def _inline(text: str) -> str:
    """Escaped model text with control tokens shown as chips."""
    out, pos = [], 0
    for m in _SPECIAL_RE.finditer(text):
        out.append(_esc(text[pos:m.start()]))
        tok = m.group(0)
        cls = "chip exec" if tok == EXECUTE_TOKEN else "chip"
        out.append(f'<span class="{cls}" title="control token">{_esc(tok)}</span>')
        pos = m.end()
    out.append(_esc(text[pos:]))
    return "".join(out)


_LABEL_TEXT = {"executed": "executed", "deferred": "deferred", "not run": "not run"}


def _render_turn(i: int, turn: dict, blocks) -> str:
    text = turn["text"]
    parts = [f'<div class="turn"><div class="turn-head">turn {i + 1}'
             f'{" · ends with " + _esc(turn["end"]) if turn.get("end") else ""}</div><div class="model m1">']
    pos = 0
    for start, end, label, n in blocks:
        parts.append(_inline(text[pos:start]))
        detail = f" (execution {n})" if n else ""
        css = label.replace(" ", "-")
        parts.append(f'<div class="block {css}"><span class="badge {css}">{_esc(_LABEL_TEXT[label] + detail)}</span>'
                     f'<pre>{_inline(text[start:end])}</pre></div>')
        pos = end
    parts.append(_inline(text[pos:]))
    parts.append("</div>")
    if turn.get("output") is not None:
        status = ("timed out" if turn.get("timed_out") else "ok" if turn.get("ok") else
                  "error" if turn.get("ok") is False else "nothing run")
        parts.append(f'<div class="obs m0"><div class="obs-head">observation (mask 0) · {_esc(status)}'
                     f'{" · " + str(turn["blocks_run"]) + " block(s) run" if turn.get("blocks_run") else ""}'
                     f'</div><pre>{_esc(turn["output"])}</pre></div>')
    parts.append("</div>")
    return "".join(parts)


def _render_tokens(item: dict, tokenizer) -> str:
    ids, mask = item["response_ids"], item["mask"]
    if not ids or tokenizer is None or len(mask) != len(ids):
        return ""
    spans = []
    for tid, m in zip(ids, mask):
        piece = tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        spans.append(f'<span class="tok t{1 if m else 0}" title="id {int(tid)} · mask {int(m)}">{_esc(piece)}</span>')
    n1 = sum(1 for m in mask if m)
    return (f'<details class="tokens"><summary>token view: {len(ids)} response tokens, {n1} trainable (mask 1), '
            f'{len(ids) - n1} observation (mask 0)</summary><div class="tokwrap">{"".join(spans)}</div></details>')


def _render_item(i: int, item: dict, tokenizer, execute_token: str) -> str:
    blocks = label_blocks(item["turns"], execute_token)
    labels = [lab for bl in blocks for (_, _, lab, _) in bl]
    n_exec = sum(1 for t in item["turns"] if t.get("code") is not None)
    correct = item["correct"]
    verdict = "correct" if correct else ("wrong" if correct is not None else "unscored")
    flags = [f for f in ("truncated", "void") if item[f]]
    head = [f'<span class="verdict {verdict}">{verdict}</span>']
    if item["reward"] is not None:
        head.append(f"reward {item['reward']:g}")
    head.append(f"{len(item['turns'])} turn(s)")
    head.append(f"{n_exec} execution(s)")
    if labels:
        head.append(f"blocks: {labels.count('executed')} executed, {labels.count('deferred')} deferred, "
                    f"{labels.count('not run')} not run")
    head += [f'<span class="flag">{f}</span>' for f in flags]
    body = []
    if item["question"] is not None:
        body.append(f'<div class="question"><b>Question</b><pre>{_esc(item["question"])}</pre>')
        if item.get("options"):
            opts = item["options"].items() if isinstance(item["options"], dict) else item["options"]
            body.append("<ol class=\"opts\">" + "".join(f"<li><b>{_esc(k)}.</b> {_esc(v)}</li>" for k, v in opts)
                        + "</ol>")
        body.append("</div>")
    body.append(f'<div class="answer">answer: <code>{_esc(item["answer"])}</code>'
                + (f' · choice <code>{_esc(item["choice"])}</code>' if item.get("choice") is not None else "")
                + (f' · gold: <code>{_esc(item["gold"])}</code>' if item["gold"] is not None else "") + "</div>")
    for j, (turn, bl) in enumerate(zip(item["turns"], blocks)):
        body.append(_render_turn(j, turn, bl))
    body.append(_render_tokens(item, tokenizer))
    attrs = (f'data-correct="{1 if correct else 0}" data-truncated="{int(item["truncated"])}" '
             f'data-void="{int(item["void"])}" data-deferred="{int("deferred" in labels)}"')
    return (f'<details class="card" {attrs}{" open" if i < 3 else ""}><summary><span class="title">{_esc(item["title"])}'
            f'</span> {" · ".join(head)}</summary><div class="body">{"".join(body)}</div></details>')


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{padding:14px 22px;background:#1f2937;color:#f3f4f6}header h1{font-size:18px;margin:0 0 4px}
.legend{font-size:12px;color:#cbd5e1}.legend span{margin-right:12px}
.controls{padding:10px 22px}.controls button{margin-right:6px;padding:4px 10px;border:1px solid #cbd5e1;
background:#fff;border-radius:4px;cursor:pointer}.controls button.on{background:#1f2937;color:#fff}
main{padding:0 22px 40px}.card{background:#fff;border:1px solid #e2e8f0;border-radius:6px;margin:10px 0}
.card>summary{padding:8px 12px;cursor:pointer;font-size:13px}.title{font-weight:600}
.body{padding:4px 14px 14px}pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace}
.question pre{background:#f8fafc;padding:6px;border-radius:4px}.answer{margin:8px 0;font-size:13px}
.turn{margin:10px 0;border-left:3px solid #94a3b8;padding-left:10px}.turn-head{font-size:11px;color:#64748b;margin-bottom:3px}
.model{white-space:pre-wrap;word-break:break-word;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace;background:#ecfdf5;
padding:6px;border-radius:4px}.obs{margin-top:4px;background:#eef2f7;padding:6px;border-radius:4px;color:#334155}
.obs-head{font-size:11px;color:#64748b}.block{margin:4px 0;border:1px solid #cbd5e1;border-radius:4px;background:#fff}
.block pre{padding:4px 6px}.block.executed{border-color:#2563eb}.block.deferred{border-color:#d97706}
.block.not-run{border-color:#9ca3af;border-style:dashed}.badge{display:inline-block;font:11px system-ui,sans-serif;
padding:1px 6px;border-radius:0 0 4px 0;color:#fff}.badge.executed{background:#2563eb}.badge.deferred{background:#d97706}
.badge.not-run{background:#9ca3af}.chip{background:#7c3aed;color:#fff;border-radius:3px;padding:0 3px;font-size:11px}
.chip.exec{background:#dc2626}.verdict{font-weight:600;padding:1px 6px;border-radius:3px}
.verdict.correct{background:#dcfce7;color:#166534}.verdict.wrong{background:#fee2e2;color:#991b1b}
.verdict.unscored{background:#e5e7eb}.flag{background:#fef3c7;color:#92400e;padding:1px 5px;border-radius:3px}
.tokwrap{font:12px/1.6 ui-monospace,Menlo,monospace;white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px}.tok.t1{background:#bbf7d0}.tok.t0{background:#e2e8f0;color:#475569}
.hidden{display:none}.opts{margin:4px 0}
"""

_JS = """
(function(){
  var buttons=document.querySelectorAll('.controls button');
  function show(f){
    document.querySelectorAll('.card').forEach(function(c){
      var ok=f==='all'||c.getAttribute('data-'+f.replace('!',''))===(f.charAt(0)==='!'?'0':'1');
      c.classList.toggle('hidden',!ok);
    });
    buttons.forEach(function(b){b.classList.toggle('on',b.getAttribute('data-f')===f);});
  }
  buttons.forEach(function(b){b.addEventListener('click',function(){show(b.getAttribute('data-f'));});});
  document.getElementById('expand').addEventListener('click',function(){
    document.querySelectorAll('.card').forEach(function(c){c.open=true;});});
  document.getElementById('collapse').addEventListener('click',function(){
    document.querySelectorAll('.card').forEach(function(c){c.open=false;});});
})();
"""


def render_viewer(items: Iterable[Any], *, tokenizer=None, title: str = "Rollouts",
                  rewards: Sequence[float] | None = None, questions: Sequence[str] | None = None,
                  execute_token: str = EXECUTE_TOKEN) -> str:
    """The viewer page as a string (see :func:`write_viewer`)."""
    items = list(items)
    if rewards is not None and len(rewards) != len(items):
        raise ValueError(f"{len(rewards)} rewards for {len(items)} trajectories")
    if questions is not None and len(questions) != len(items):
        raise ValueError(f"{len(questions)} questions for {len(items)} trajectories")
    norm = [normalize_item(it, reward=None if rewards is None else rewards[i],
                           question=None if questions is None else questions[i], index=i)
            for i, it in enumerate(items)]
    if tokenizer is not None:
        for n, it in zip(norm, items):
            if n["question"] is None and n["prompt_ids"]:
                n["question"] = tokenizer.decode(n["prompt_ids"], skip_special_tokens=False)
    n_correct = sum(1 for n in norm if n["correct"])
    cards = "".join(_render_item(i, n, tokenizer, execute_token) for i, n in enumerate(norm))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{_esc(title)}</h1>
<div class="legend">{len(norm)} trajectories, {n_correct} correct ·
<span style="background:#ecfdf5;color:#111;padding:0 4px">model text: trainable, mask 1</span>
<span style="background:#eef2f7;color:#111;padding:0 4px">observation: mask 0</span>
<span style="color:#93c5fd">executed</span> = the block whose {_esc(execute_token)} triggered the run ·
<span style="color:#fcd34d">deferred</span> = written before a later {_esc(execute_token)}, run with it ·
<span>not run</span> = no execution followed</div></header>
<div class="controls"><button data-f="all" class="on">all</button><button data-f="correct">correct</button>
<button data-f="!correct">wrong</button><button data-f="deferred">with deferred blocks</button>
<button data-f="truncated">truncated</button><button data-f="void">void</button>
<button id="expand">expand all</button><button id="collapse">collapse all</button></div>
<main>{cards}</main><script>{_JS}</script></body></html>
"""


def write_viewer(path: str | os.PathLike, trajectories_or_records: Iterable[Any], tokenizer=None, *,
                 title: str = "Rollouts", rewards: Sequence[float] | None = None,
                 questions: Sequence[str] | None = None, execute_token: str = EXECUTE_TOKEN) -> Path:
    """Writes the viewer page to ``path`` (atomically) and returns the path.

    ``trajectories_or_records``: ``Trajectory`` objects or dict records (see the module
    docstring). ``rewards`` / ``questions``: aligned with them, for trajectories that do not
    carry their own. ``tokenizer``: adds a per-token mask view where token ids are known, and
    decodes the prompt when no question is given.
    """
    path = Path(path)
    page = render_viewer(trajectories_or_records, tokenizer=tokenizer, title=title, rewards=rewards,
                         questions=questions, execute_token=execute_token)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
