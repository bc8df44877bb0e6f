"""Question/answer data: verl-style parquet, JSONL, Hugging Face datasets, registered sources.

Every loader returns `Example`s and rejects bad rows with a DataError whose one-line message
names the file and the row: a silent wrong answer is worse than a stop.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ihgrpo import registry


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    id: str
    source: str = ""


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _verl_row(row: dict, where: str) -> tuple[str, str]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        question = prompt
    elif isinstance(prompt, (list, tuple)) and prompt:
        users = [m for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        question = users[-1].get("content") if users else None
    else:
        question = None
    if _text(question) is None:
        raise DataError(f"{where}: no user message in 'prompt'")
    rm = row.get("reward_model")
    gold = rm.get("ground_truth") if isinstance(rm, dict) else None
    if _text(gold) is None:
        raise DataError(f"{where}: missing ground truth (reward_model.ground_truth)")
    return question, _text(gold)


def _plain_row(row: dict, where: str, qkey: str, akey: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if "reward_model" in row and "prompt" in row:
        return _verl_row(row, where)
    q, a = _text(row.get(qkey)), _text(row.get(akey))
    if q is None:
        raise DataError(f"{where}: missing or empty question field {qkey!r}")
    if a is None:
        raise DataError(f"{where}: missing or empty answer field {akey!r}")
    return q, a


def read_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """(where, row) pairs of a .parquet, .jsonl or .json file; `where` names the row in errors."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
        yield from ((f"row {i}", r) for i, r in enumerate(rows))
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        yield from ((f"item {i}", r) for i, r in enumerate(data))
        return
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                yield f"line {i + 1}", json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}: line {i + 1}: invalid JSON ({exc})") from None


def load_examples(spec: str | list[str], *, question_key: str = "question", answer_key: str = "answer",
                  split: str = "train", limit: int | None = None) -> list[Example]:
    """Loads a dataset: a registered name (``demo``), a .parquet / .jsonl / .json path, or a
    Hugging Face dataset name; or a list of them, concatenated in order (``limit`` per source)."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise DataError("no dataset given (data.train is an empty list)")
        return [e for one in spec for e in load_examples(one, question_key=question_key, answer_key=answer_key,
                                                        split=split, limit=limit)]
    if not spec:
        raise DataError("no dataset given (data.train)")
    loader = registry.lookup("dataset", spec)
    if loader is not None:  # a named source, e.g. "demo", registered by the demo package
        return loader(spec, limit=limit)
    path = Path(spec)
    examples: list[Example] = []
    if path.suffix in (".parquet", ".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise DataError(f"{spec}: file not found")
        if path.suffix not in (".parquet", ".jsonl", ".json"):
            raise DataError(f"{spec}: unsupported file type (use .parquet, .jsonl or .json)")
        for i, (where, row) in enumerate(read_rows(path)):
            q, a = _plain_row(row, f"{path}: {where}", question_key, answer_key)
            examples.append(Example(q, a, f"{path.stem}-{i}", path.stem))
            if limit and len(examples) >= limit:
                break
    else:
        examples = _load_hf(spec, question_key, answer_key, split, limit)
    if not examples:
        raise DataError(f"{spec}: no rows")
    return examples


def _load_hf(name: str, qkey: str, akey: str, split: str, limit: int | None) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: not a file, and the 'datasets' package is not installed to load it "
                        "from the Hugging Face hub") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"{name}: cannot load dataset ({str(exc).splitlines()[0][:160]})") from None
    out = []
    for i, row in enumerate(ds):
        q, a = _plain_row(row, f"{name}[{split}]: row {i}", qkey, akey)
        out.append(Example(q, a, f"{name}-{i}", name))
        if limit and len(out) >= limit:
            break
    return out


class PromptSampler:
    """Endless, seeded pass over examples; its position is part of a checkpoint."""

    def __init__(self, examples: list[Example], seed: int, shuffle: bool = True):
        if not examples:
            raise DataError("no examples to sample from")
        self.examples = examples
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.examples[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.examples):
            raise DataError(f"checkpoint was made on {state.get('n')} examples; the dataset now has "
                            f"{len(self.examples)}")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._make_order()
