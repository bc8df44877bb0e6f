"""Multiple-choice questions (other domains, no tools): options, the gold letter, the prompt,
and the letter a boxed answer names. Pure Python."""

from __future__ import annotations

import re
from typing import Any, Iterable

from ihgrpo.data import DataError

__all__ = ["MC_INSTRUCTION", "parse_options", "gold_letter", "choice_prompt", "choice_letter"]

MC_INSTRUCTION = (r"Answer the following multiple-choice question. Think step by step, then put "
                  r"the letter of the correct option in \boxed{}, for example \boxed{A}.")

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_options(raw: Any, where: str) -> dict[str, str]:
    if isinstance(raw, (list, tuple)):
        if len(raw) > len(_LETTERS):
            raise DataError(f"{where}: more than {len(_LETTERS)} options")
        opts = {_LETTERS[i]: raw[i] for i in range(len(raw))}
    elif isinstance(raw, dict):
        opts = {}
        for key, text in raw.items():
            letter = str(key).strip().strip("()").upper()
            if len(letter) != 1 or letter not in _LETTERS:
                raise DataError(f"{where}: option key {key!r} is not a single letter")
            opts[letter] = text
        opts = dict(sorted(opts.items()))
    else:
        raise DataError(f"{where}: missing 'options' (a list, or an object keyed by letters)")
    if len(opts) < 2:
        raise DataError(f"{where}: 'options' needs at least two options")
    for letter, text in opts.items():
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            opts[letter] = text = str(text)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: option {letter} is empty or not text")
    return opts


def gold_letter(raw: Any, options: dict[str, str], where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"{where}: missing or empty 'answer' (the correct option's letter)")
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\.?\s*", raw)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    by_text = [letter for letter, text in options.items() if text.strip() == raw.strip()]
    if len(by_text) == 1:
        return by_text[0]
    raise DataError(f"{where}: answer {raw!r} is neither an option letter ({', '.join(options)}) nor an option's text")


def choice_prompt(problem) -> str:
    """The prompt of a multiple-choice problem (no tool protocol)."""
    lines = [MC_INSTRUCTION, "", problem.question.strip(), ""]
    lines += [f"{letter}. {text}" for letter, text in problem.options or ()]
    return "\n".join(lines)


_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _norm_option(s: str) -> str:
    s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace("$", "").replace("\\", "")
    return re.sub(r"[^0-9a-z]+", " ", s.lower()).strip()


def choice_letter(boxed: str | None, options: dict[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """The option letter a boxed answer names: a letter (``B``, ``(B)``, ``B.``, ``Option B``,
    ``\\text{B}``, ``B. its text``) or an option's text (case, spaces and punctuation ignored)."""
    if boxed is None:
        return None
    opts = dict(options)
    s = boxed.strip()
    for _ in range(3):  # \text{\textbf{B}}
        s = _TEXT_WRAP.sub(r"\1", s).strip()
    s = s.strip("$ ").strip()
    m = re.fullmatch(r"(?i:option|answer|choice)?\s*[:\s]?\s*\(?([A-Za-z])\)?\s*[.:)]?", s)
    if m and m.group(1).upper() in opts:
        letter = m.group(1).upper()
        if m.group(1).isupper() or not any(_norm_option(t) == s.lower() for t in opts.values()):
            return letter
    m = re.match(r"\(?([A-Z])\)?\s*[.:)]\s+\S", s) or re.match(r"\(([A-Z])\)\s*\S", s)
    if m and m.group(1) in opts:
        return m.group(1)
    target = _norm_option(s)
    if target:
        hits = [letter for letter, text in opts.items() if _norm_option(text) == target]
        if len(hits) == 1:
            return hits[0]
    return None
