"""A synthetic task family for the demo: chains of dependent arithmetic steps on large numbers.

    Let a be 48213 times 7741. Let b be a divided by 97, rounded down. Let c be b mod 1000.
    Let d be c to the power 37 mod 1009. What is d?

Each step defines one variable (``a``, ``b``, ... in order) from the previous one and, at times,
an earlier one; the answer is the last variable, an integer. The numbers are too large to
compute in the head of a tiny model, so code is needed; every step can be written down without
seeing any result, so all of them can be deferred to one execution.

The sentence of a step reads in the order of its code (``Let c be b mod 1000.`` ->
``c = b % 1000``), so that a small model can translate it token by token.

Problems come from a seed (``random.Random``), deterministically. The train and held-out splits
are a partition by a hash of the question: they can never share a problem.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

__all__ = ["Step", "Problem", "TaskConfig", "OPS", "make_problem", "split_of", "generate_problems",
           "check_problem", "VARIABLE_NAMES"]

VARIABLE_NAMES = "abcdefghjkmnpqrstuvwxyz"  # no i, l, o: easy to confuse in print

# op -> (phrase, expression); the sentence is "Let {v} be <phrase>." and the code "{v} = <expression>".
OPS: dict[str, tuple[str, str]] = {
    "mul": ("{x} times {y}", "{x} * {y}"),
    "add": ("{x} plus {y}", "{x} + {y}"),
    "sub": ("{x} minus {y}", "{x} - {y}"),
    "square": ("{x} squared", "{x} ** 2"),
    "cube": ("{x} cubed", "{x} ** 3"),
    "pow": ("{x} to the power {y}", "{x} ** {y}"),
    "div": ("{x} divided by {y}, rounded down", "{x} // {y}"),
    "mod": ("{x} mod {y}", "{x} % {y}"),
    "digitsum": ("the digit sum of {x}", "sum(map(int, str({x})))"),
    "last3": ("the last three digits of {x}", "{x} % 1000"),
    "range": ("the sum of 1 to {x}", "sum(range({x} + 1))"),
}

@dataclass(frozen=True)
class Step:
    """One step: ``name = expr`` has value ``value``; ``text`` is its sentence in the question."""

    name: str
    expr: str
    value: int
    op: str
    text: str

    @property
    def code(self) -> str:
        return f"{self.name} = {self.expr}"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the integer value of the last step, as a string
    steps: list[Step] = field(default_factory=list)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def uid(self) -> str:
        return hashlib.sha256(self.question.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer,
                "steps": [{"name": s.name, "expr": s.expr, "value": s.value, "op": s.op, "text": s.text}
                          for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(d["question"], str(d["answer"]), [Step(**s) for s in d["steps"]])


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs."""

    min_steps: int = 3
    max_steps: int = 7
    start_digits: tuple[int, int] = (3, 4)  # the first step's number
    literal_digits: tuple[int, int] = (1, 1)  # every other number in the question
    max_value: int = 10 ** 12  # every intermediate value stays below this
    min_answer: int = 100  # the last step is redrawn (a few times) while its value is below this
    var_operand_prob: float = 0.25  # chance that "times" / "plus" take an earlier variable
    ops: tuple[str, ...] = tuple(OPS)
    # "words": "Let b be a divided by 7, rounded down."; "code": the code lines themselves,
    # one per line ("b = a // 7")
    phrasing: str = "words"
    test_fraction: float = 0.2  # share of the question space that is held out

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= len(VARIABLE_NAMES):
            raise ValueError(f"need 1 <= min_steps <= max_steps <= {len(VARIABLE_NAMES)}")
        for lo, hi in (self.start_digits, self.literal_digits):
            if not 1 <= lo <= hi:
                raise ValueError("digit ranges need 1 <= low <= high")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must be in (0, 1)")
        if self.phrasing not in ("words", "code"):
            raise ValueError(f"phrasing must be 'words' or 'code', got {self.phrasing!r}")
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}")
        if not {"square", "mul", "add", "cube", "pow"} & set(self.ops):
            raise ValueError("ops need one that grows a value (square, cube, pow, mul or add)")


def _num(rng: random.Random, digits: tuple[int, int], lo: int = 2) -> int:
    d = rng.randint(*digits)
    return rng.randint(max(lo, 10 ** (d - 1)), 10 ** d - 1)


def _valid(op: str, p: int, cfg: TaskConfig) -> bool:
    """Whether ``op`` can apply to the value ``p`` (keeping values in range and not trivial)."""
    big = cfg.max_value
    lit_max = 10 ** cfg.literal_digits[1] - 1
    return {
        "mul": 2 <= p and p * lit_max < big,
        "add": p < big - lit_max,
        "sub": p > 10 ** cfg.literal_digits[0],
        "square": 2 <= p and p * p < big,
        "cube": 2 <= p and p ** 3 < big,
        "pow": 2 <= p and p ** min(9, lit_max) < big,
        "div": p >= 10 * lit_max,
        "mod": p > lit_max,
        "digitsum": p >= 100,
        "last3": p >= 10 ** 4,
        "range": 2 <= p <= 10 ** 5,
    }[op]


def _apply(op: str, p: int, y: int | None) -> int:
    return {
        "mul": lambda: p * y, "add": lambda: p + y, "sub": lambda: p - y,
        "square": lambda: p * p, "cube": lambda: p ** 3, "pow": lambda: p ** y,
        "div": lambda: p // y, "mod": lambda: p % y,
        "digitsum": lambda: sum(map(int, str(p))), "last3": lambda: p % 1000,
        "range": lambda: p * (p + 1) // 2,
    }[op]()


FIRST_OPS = ("square", "cube", "mul", "pow", "range")  # the first step grows its number


def _draw_step(rng: random.Random, cfg: TaskConfig, x: str, p: int, earlier: list[Step],
               first: bool = False) -> tuple[str, str | None, int]:
    """(op, second operand as text or None, value) for an op on ``x`` (value ``p``)."""
    ops = [o for o in cfg.ops if _valid(o, p, cfg) and (not first or o in FIRST_OPS)]
    ops = ops or [o for o in cfg.ops if _valid(o, p, cfg)] or ["add"]
    op = rng.choice(ops)
    if op in ("square", "cube", "digitsum", "last3", "range"):
        return op, None, _apply(op, p, None)
    if op in ("mul", "add"):
        others = [s for s in earlier if s.name != x and _apply(op, p, s.value) < cfg.max_value]
        if others and rng.random() < cfg.var_operand_prob:
            other = rng.choice(others)
            return op, other.name, _apply(op, p, other.value)
    if op == "sub":
        y = _num(rng, cfg.literal_digits, lo=1)
        while y >= p:
            y = _num(rng, cfg.literal_digits, lo=1)
    elif op == "pow":
        y = 2
        for _ in range(20):
            y = rng.randint(2, min(9, 10 ** cfg.literal_digits[1] - 1))
            if p ** y < cfg.max_value:
                break
        else:
            y = 2
    else:
        y = _num(rng, cfg.literal_digits)
    return op, str(y), _apply(op, p, y)


def make_problem(rng: random.Random, cfg: TaskConfig | None = None, n_steps: int | None = None) -> Problem:
    """One problem drawn from ``rng``."""
    cfg = cfg or TaskConfig()
    k = n_steps if n_steps is not None else rng.randint(cfg.min_steps, cfg.max_steps)
    if not 1 <= k <= len(VARIABLE_NAMES):
        raise ValueError(f"n_steps must be in [1, {len(VARIABLE_NAMES)}], got {k}")
    steps: list[Step] = []
    for i in range(k):
        v = VARIABLE_NAMES[i]
        if i == 0:
            start = _num(rng, cfg.start_digits)
            x, p = str(start), start
        else:
            x, p = steps[-1].name, steps[-1].value
        for _ in range(50):  # the answer is not tiny (not guessable)
            op, y, value = _draw_step(rng, cfg, x, p, steps, first=i == 0)
            if i < k - 1 or value >= cfg.min_answer:
                break
        phrase, expr = OPS[op]
        expr = expr.format(x=x, y=y)
        text = f"Let {v} be {phrase.format(x=x, y=y)}." if cfg.phrasing == "words" else f"{v} = {expr}"
        steps.append(Step(name=v, expr=expr, value=int(value), op=op, text=text))
    sep = " " if cfg.phrasing == "words" else "\n"
    question = sep.join(s.text for s in steps) + f"{sep}What is {steps[-1].name}?"
    return Problem(question=question, answer=str(steps[-1].value), steps=steps)


def split_of(question: str, test_fraction: float = TaskConfig.test_fraction) -> str:
    """"train" or "test", by a hash of the question text: a fixed partition of all questions."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "test" if h % 1_000_000 < int(test_fraction * 1_000_000) else "train"


def generate_problems(n: int, seed: int | str = 0, split: str = "train", cfg: TaskConfig | None = None,
                      *, n_steps: int | None = None) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train", "test" or "all") from ``seed``.

    Deterministic: the same arguments give the same list. Problems of the other split are
    skipped, so the train and test lists never share a question whatever the seeds.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    cfg = cfg or TaskConfig()
    rng = random.Random(f"ihgrpo-demo-{seed}-{split}")
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:  # pragma: no cover - the question space is huge
            raise RuntimeError("could not draw enough distinct problems")
        p = make_problem(rng, cfg, n_steps)
        if p.question in seen or (split != "all" and split_of(p.question, cfg.test_fraction) != split):
            continue
        seen.add(p.question)
        out.append(p)
    return out


def check_problem(problem: Problem) -> bool:
    """Runs the steps' code and compares every value (and the answer)."""
    ns: dict = {}
    for s in problem.steps:
        exec(s.code, {"__builtins__": {"sum": sum, "range": range, "map": map, "int": int, "str": str}}, ns)
        if ns[s.name] != s.value:
            return False
    return str(ns[problem.steps[-1].name]) == problem.answer
