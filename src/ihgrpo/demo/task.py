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

# op -> (sentence template, expression template)
OPS: dict[str, tuple[str, str]] = {
    "mul": ("Let {v} be {x} times {y}.", "{x} * {y}"),
    "add": ("Let {v} be {x} plus {y}.", "{x} + {y}"),
    "sub": ("Let {v} be {x} minus {y}.", "{x} - {y}"),
    "div": ("Let {v} be {x} divided by {y}, rounded down.", "{x} // {y}"),
    "mod": ("Let {v} be {x} mod {y}.", "{x} % {y}"),
    "pow": ("Let {v} be {x} to the power {y} mod {m}.", "pow({x}, {y}, {m})"),
    "sum": ("Let {v} be the sum of the integers from {x} to {y}.", "sum(range({x}, {y} + 1))"),
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
    max_factor_digits: int = 5  # literal factors of a product (and first-step terms)
    max_divisor_digits: int = 3  # divisors of a rounded-down division
    max_modulus_digits: int = 4  # moduli of mod and of modular powers
    max_exponent: int = 99
    max_range: int = 9999  # endpoints of literal range sums
    max_value: int = 10 ** 12  # intermediate values stay below this (only reducing ops above 10^7)
    var_operand_prob: float = 0.2  # chance that a second operand is an earlier variable
    ops: tuple[str, ...] = ("mul", "add", "sub", "div", "mod", "pow", "sum")
    # "words": "Let b be a divided by 97, rounded down."; "code": "Let b = a // 97." (the code
    # line verbatim: a tiny model only has to copy it)
    phrasing: str = "words"
    test_fraction: float = 0.2  # share of the question space that is held out

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= len(VARIABLE_NAMES):
            raise ValueError(f"need 1 <= min_steps <= max_steps <= {len(VARIABLE_NAMES)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must be in (0, 1)")
        if self.phrasing not in ("words", "code"):
            raise ValueError(f"phrasing must be 'words' or 'code', got {self.phrasing!r}")
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}")


def _num(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    digits = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 2, 10 ** digits - 1)


def _range_sum(lo: int, hi: int) -> int:
    return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0


def _first_step(rng: random.Random, cfg: TaskConfig, v: str) -> tuple[str, dict, int]:
    ops = [o for o in ("mul", "sum", "pow") if o in cfg.ops] or ["mul"]
    op = rng.choice(ops)
    if op == "mul":
        x, y = _num(rng, 2, cfg.max_factor_digits), _num(rng, 2, cfg.max_factor_digits)
        return op, {"x": x, "y": y}, x * y
    if op == "sum":
        x = rng.randint(1, cfg.max_range // 2)
        y = rng.randint(x + 1, cfg.max_range)
        return op, {"x": x, "y": y}, _range_sum(x, y)
    x = _num(rng, 3, cfg.max_factor_digits)
    e = rng.randint(2, cfg.max_exponent)
    m = _num(rng, 3, cfg.max_modulus_digits)
    return op, {"x": x, "y": e, "m": m}, pow(x, e, m)


def _next_step(rng: random.Random, cfg: TaskConfig, prev: Step, earlier: list[Step]) -> tuple[str, dict, int]:
    p = prev.value
    small = [s for s in earlier if s.value < 10 ** 6]
    choices = []
    for op in cfg.ops:
        if op in ("mul", "add") and p < 10 ** 7:
            choices.append(op)
        elif op == "sub" and 1000 < p < 10 ** 9:
            choices.append(op)
        elif op == "div" and p >= 10 ** 4:
            choices.append(op)
        elif op == "mod" and p >= 1000:
            choices.append(op)
        elif op == "pow" and p >= 2:
            choices.append(op)
        elif op == "sum" and 2 <= p <= 5000:
            choices.append(op)
    if not choices:  # tiny values: grow them
        choices = [o for o in ("mul", "add") if o in cfg.ops] or ["pow"]
    op = rng.choice(choices)
    x = prev.name
    if op in ("mul", "add"):
        if small and rng.random() < cfg.var_operand_prob:
            other = rng.choice(small)
            return op, {"x": x, "y": other.name}, p * other.value if op == "mul" else p + other.value
        y = _num(rng, 2, cfg.max_factor_digits if op == "add" or p < 10 ** 3 else 3)
        return op, {"x": x, "y": y}, p * y if op == "mul" else p + y
    if op == "sub":
        y = rng.randint(10, min(p - 1, 10 ** cfg.max_factor_digits - 1))
        return op, {"x": x, "y": y}, p - y
    if op == "div":
        y = _num(rng, 2, min(cfg.max_divisor_digits, len(str(p)) - 2))
        return op, {"x": x, "y": y}, p // y
    if op == "mod":
        y = _num(rng, 2, min(cfg.max_modulus_digits, len(str(p)) - 1))
        return op, {"x": x, "y": y}, p % y
    if op == "pow":
        e = rng.randint(2, cfg.max_exponent)
        m = _num(rng, 3, cfg.max_modulus_digits)
        return op, {"x": x, "y": e, "m": m}, pow(p, e, m)
    # sum: from the variable to a literal above it, or from 1 to the variable
    if rng.random() < 0.5:
        return op, {"x": 1, "y": x}, _range_sum(1, p)
    y = rng.randint(p + 1, p + cfg.max_range)
    return op, {"x": x, "y": y}, _range_sum(p, y)


def make_problem(rng: random.Random, cfg: TaskConfig | None = None, n_steps: int | None = None) -> Problem:
    """One problem drawn from ``rng``."""
    cfg = cfg or TaskConfig()
    k = n_steps if n_steps is not None else rng.randint(cfg.min_steps, cfg.max_steps)
    if not 1 <= k <= len(VARIABLE_NAMES):
        raise ValueError(f"n_steps must be in [1, {len(VARIABLE_NAMES)}], got {k}")
    steps: list[Step] = []
    for i in range(k):
        v = VARIABLE_NAMES[i]
        for _ in range(100):
            op, args, value = (_first_step(rng, cfg, v) if i == 0
                               else _next_step(rng, cfg, steps[-1], steps[:-1]))
            if 0 <= value < cfg.max_value:
                break
        else:  # pragma: no cover - the ops keep values in range
            raise RuntimeError("could not draw a step in range")
        sentence, expr = OPS[op]
        fmt = {"v": v, **{k2: str(a) for k2, a in args.items()}}
        expr = expr.format(**fmt)
        text = sentence.format(**fmt) if cfg.phrasing == "words" else f"Let {v} = {expr}."
        steps.append(Step(name=v, expr=expr, value=int(value), op=op, text=text))
    question = " ".join(s.text for s in steps) + f" What is {steps[-1].name}?"
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
        exec(s.code, {"__builtins__": {"pow": pow, "sum": sum, "range": range}}, ns)
        if ns[s.name] != s.value:
            return False
    return str(ns[problem.steps[-1].name]) == problem.answer
