r"""Benchmark evaluation: ``ihgrpo eval`` (SPEC sections 5 and 6).

    ihgrpo eval --model PATH --benchmark SPEC [--benchmark SPEC ...] [--k N] [--limit N]
                [--protocol delayed|coupled] [--top-p P] --out DIR [key=value ...]

``PATH`` is a local model directory or a Hugging Face name; the tokenizer comes from the same
place. Put all ``key=value`` settings together (before or after the options).

Benchmarks (``SPEC``)
---------------------
* ``demo``: the demo task's held-out set (``load_examples("demo:heldout")``), with the demo's
  instruction and budgets (4 turns, 512 response tokens, 256 per turn) unless set explicitly.
* ``paper``: the paper's six math benchmarks, read from ``data_dir`` (default
  ``../shared/data/math``, relative to the current directory): ``math500.parquet``,
  ``olympiad.parquet``, ``aime24.parquet``, ``aime25.parquet``, ``amc23.parquet``,
  ``hmmt25.parquet``. One of them alone by its name (``aime24``). A benchmark is named by its
  file or its spec, never by the ``data_source`` column (wrong in two of the files).
* ``other``: the no-tool domains in ``data_dir/other/``: ``mmlu_pro.jsonl``, ``logiqa.jsonl``,
  ``bbh_*.jsonl`` (the paper's BBH subsets are ``bbh_date_understanding``,
  ``bbh_formal_fallacies``, ``bbh_logical_deduction_seven_objects``). Each missing file is
  skipped with a message. One of them alone by its name (``mmlu_pro``): missing is an error.
* ``NAME=FILE``: a verl-style parquet (``prompt`` / ``reward_model.ground_truth``, like
  ``../shared/data/math``), or a JSONL / JSON list with ``question`` and ``answer`` fields; a
  file whose rows have ``options`` is a multiple-choice benchmark (below). A bare file path is
  named after its stem.

Multiple-choice JSONL (other domains, no tools)
-----------------------------------------------
One object per line::

    {"question": "Which ...?", "options": ["first", "second", "third"], "answer": "B"}
    {"question": "Which ...?", "options": {"A": "valid", "B": "invalid"}, "answer": "(A)"}

``options``: a list (lettered A, B, C, ... in order) or an object whose keys are single
letters. ``answer``: the correct letter (``B``, ``b``, ``(B)`` or ``B.``) or the exact text of
one option. Other fields are ignored. The prompt has no tool protocol: it asks the model to
reason and put the letter of its choice in ``\boxed{}``; a boxed letter, or a boxed option
text, is matched to its letter. The score is accuracy (avg@k).

Defaults (the paper's evaluation)
---------------------------------
temperature 1.0, top_p 0.7 (the release's configured value; its evaluation silently used 1.0,
a defect: here the configured top_p reaches the sampler), 5 turns, 8,000 response tokens,
observations capped at 256 tokens; k = 8 for math500 and olympiad, 32 for aime24, aime25,
amc23 and hmmt25, 8 for any other benchmark. ``key=value`` overrides: ``temperature``,
``top_p``, ``top_k``, ``k``, ``limit``, ``max_turns``, ``max_response_tokens``,
``max_tokens_per_turn``, ``max_observation_tokens``, ``exec_timeout_s``, ``batch_size``
(trajectories per generation batch), ``seed``, ``data_dir``, ``sandbox_workers``,
``sandbox_memory_mb``, ``sandbox_isolation``, ``reward_timeout_s``, ``dtype``, ``device``,
``instruction``, ``execute_token``, ``enable_thinking``, ``viewer_samples``.

Outputs in ``DIR``
------------------
``results.json`` (per benchmark: avg@k, pass@k, k, n_problems, delay_call_rate,
tool_calls_per_trajectory, code_error_rate, truncated_fraction, mean_response_tokens, ...;
``mean_of_benchmarks``, the unweighted mean of avg@k over the run's benchmarks, the paper's
headline for ``--benchmark paper``; ``mean_by_domain`` when math and multiple-choice benchmarks
are mixed; ``settings``; ``timing``), ``results.md`` (a table
like the paper's), ``samples.jsonl`` (one line per sample), ``chart.png`` (avg@k and pass@k per
benchmark) and ``rollouts.html`` (the rollout viewer on a few samples per benchmark).

Resume and seeding
------------------
``samples.jsonl`` is the ledger. Samples are keyed by (benchmark, problem index, sample index).
The work is cut into a fixed grid: the (problem, sample) pairs of a benchmark in problem-major
order, ``batch_size`` pairs per batch. After a batch is generated and scored, its lines are
appended with one ``write`` and an ``fsync``. A rerun of the same command reads the ledger,
drops a partial last line (and any duplicate), checks that the stored samples were made with
the same sampling settings and the same questions (else it stops: use another ``--out``), and
generates only the missing pairs.

Every sample has its own random stream: the uniform numbers that pick its tokens come from a
seed derived from (seed, benchmark, problem, sample, generation call), not from the batch
(:class:`RowSeededHFGenerator`). So a sample's tokens do not depend on which other samples share
its batch, on the batch size, or on what was done before an interruption: a resumed run samples
what an uninterrupted one would. (Rows of a batch differ only by floating-point noise of
differently shaped matrix products; since the batch grid is fixed, an interrupted batch is
regenerated with the same composition, bit for bit on CPU.) Growing ``k`` or ``limit`` in the
same ``DIR`` reuses the samples already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ihgrpo.data import DataError, load_examples, read_rows
from ihgrpo.protocol import EXECUTE_TOKEN, TurnEnd, build_prompt, extract_boxed, is_void

__all__ = [
    "PAPER_BENCHMARKS", "PAPER_K", "OTHER_BENCHMARKS", "DEFAULT_K", "EvalError", "EvalSettings",
    "Problem", "Benchmark", "SampleLedger", "RowSeededHFGenerator", "add_eval_arguments",
    "cmd_eval", "run_eval", "resolve_benchmarks", "parse_overrides", "score_samples",
    "benchmark_metrics", "choice_letter", "sample_seed", "MC_INSTRUCTION",
]

PAPER_BENCHMARKS = ("math500", "olympiad", "aime24", "aime25", "amc23", "hmmt25")
PAPER_K = {"math500": 8, "olympiad": 8, "aime24": 32, "aime25": 32, "amc23": 32, "hmmt25": 32}
PAPER_TITLES = {"math500": "MATH500", "olympiad": "OlympiadBench", "aime24": "AIME24",
                "aime25": "AIME25", "amc23": "AMC23", "hmmt25": "HMMT25"}
OTHER_BENCHMARKS = ("mmlu_pro", "logiqa", "bbh_date_understanding", "bbh_formal_fallacies",
                    "bbh_logical_deduction_seven_objects")
DEFAULT_K = 8
LEDGER = "samples.jsonl"

MC_INSTRUCTION = (r"Answer the following multiple-choice question. Think step by step, then put "
                  r"the letter of the correct option in \boxed{}, for example \boxed{A}.")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EvalError(ValueError):
    """A bad evaluation setting or output folder; the message is one line."""


# ----------------------------------------------------------------------------- settings

@dataclass
class EvalSettings:
    """Everything an evaluation run needs but the benchmark list and the output folder."""

    model: str = ""
    protocol: str = "delayed"
    k: int | None = None  # None: per benchmark (PAPER_K, else DEFAULT_K)
    limit: int | None = None  # the first N problems of each benchmark
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    max_turns: int = 5
    max_response_tokens: int = 8000
    max_tokens_per_turn: int | None = None
    max_observation_tokens: int = 256
    exec_timeout_s: float = 5.0
    batch_size: int = 32
    seed: int = 0
    data_dir: str = "../shared/data/math"
    sandbox_workers: int = 4
    sandbox_memory_mb: int = 1024
    sandbox_isolation: str = "auto"
    reward_timeout_s: float = 5.0
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    device: str = "auto"  # auto: cuda when available
    instruction: str | None = None  # None: the protocol's default prompt
    execute_token: str = EXECUTE_TOKEN
    enable_thinking: bool = False
    viewer_samples: int = 4  # trajectories per benchmark in rollouts.html
    # names of the settings given explicitly (packaged benchmarks keep their own defaults otherwise)
    explicit: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    def validate(self) -> None:
        checks = [
            (self.protocol in ("delayed", "coupled"), f"protocol must be delayed or coupled, got {self.protocol!r}"),
            (self.k is None or self.k >= 1, f"k must be >= 1, got {self.k}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (self.max_turns >= 1, f"max_turns must be >= 1, got {self.max_turns}"),
            (self.max_response_tokens >= 1, f"max_response_tokens must be >= 1, got {self.max_response_tokens}"),
            (self.max_tokens_per_turn is None or self.max_tokens_per_turn >= 1,
             f"max_tokens_per_turn must be >= 1, got {self.max_tokens_per_turn}"),
            (self.max_observation_tokens >= 1, f"max_observation_tokens must be >= 1, got {self.max_observation_tokens}"),
            (self.exec_timeout_s > 0, f"exec_timeout_s must be > 0, got {self.exec_timeout_s}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.sandbox_workers >= 1, f"sandbox_workers must be >= 1, got {self.sandbox_workers}"),
            (self.reward_timeout_s > 0, f"reward_timeout_s must be > 0, got {self.reward_timeout_s}"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"),
            (self.sandbox_isolation in ("auto", "bwrap", "none"),
             f"sandbox_isolation must be auto, bwrap or none, got {self.sandbox_isolation!r}"),
            (self.viewer_samples >= 0, f"viewer_samples must be >= 0, got {self.viewer_samples}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EvalError(msg)

    def public(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("explicit", None)
        return d


_ALIASES = {"batch": "batch_size", "workers": "sandbox_workers", "top-p": "top_p",
            "mode": "protocol", "model_path": "model"}


def _setting_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(EvalSettings) if f.name != "explicit"}


def _convert(key: str, typ: str, raw: str) -> Any:
    optional = "None" in typ
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        if typ.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        kind = typ.split(" |")[0]
        raise EvalError(f"{key}={raw}: expected {'a boolean' if kind == 'bool' else 'an ' + kind}") from None
    return raw


def parse_overrides(pairs: Iterable[str], settings: EvalSettings | None = None) -> EvalSettings:
    """Applies ``key=value`` strings to ``settings`` (a new EvalSettings by default)."""
    settings = settings or EvalSettings()
    types = _setting_types()
    changes: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise EvalError(f"expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in types:
            raise EvalError(f"unknown setting {key!r} (known: {', '.join(sorted(types))})")
        changes[key] = _convert(key, types[key], raw.strip() if key != "instruction" else raw)
    out = dataclasses.replace(settings, **changes)
    out.explicit = frozenset(settings.explicit | set(changes))
    return out


# ----------------------------------------------------------------------------- benchmarks

@dataclass(frozen=True)
class Problem:
    index: int  # row in the benchmark file
    question: str
    gold: str  # math: the ground truth; multiple choice: the correct letter
    options: tuple[tuple[str, str], ...] | None = None  # multiple choice: (letter, text) pairs


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    source: str
    domain: str = "math"  # "math" (tool protocol) or "choice" (multiple choice, no tools)
    k: int = DEFAULT_K
    # rollout defaults of a packaged benchmark (the demo's instruction and budgets)
    defaults: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return PAPER_TITLES.get(self.name, self.name)


def default_k(name: str) -> int:
    return PAPER_K.get(name, DEFAULT_K)


def _check_name(name: str, spec: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise DataError(f"benchmark {spec!r}: the name {name!r} must be letters, digits, '_', '-', '.' or '+'")
    return name


def resolve_benchmarks(specs: list[str], settings: EvalSettings,
                       echo: Callable[[str], None] = print) -> tuple[list[Benchmark], list[dict]]:
    """Benchmarks named by ``specs`` (see the module docstring) and the skipped ones."""
    if not specs:
        raise EvalError("no benchmark given (--benchmark SPEC)")
    out: list[Benchmark] = []
    skipped: list[dict] = []
    data_dir = Path(settings.data_dir)
    for spec in specs:
        spec = spec.strip()
        if "=" in spec:
            name, file = spec.split("=", 1)
            out.append(_load_file(_check_name(name.strip(), spec), Path(file.strip()), settings))
        elif spec == "demo":
            out.append(_load_demo(settings))
        elif spec == "paper":
            _need_dir(data_dir, "paper", "the six benchmark parquet files")
            for name in PAPER_BENCHMARKS:
                path = data_dir / f"{name}.parquet"
                if not path.is_file():
                    raise DataError(f"paper: {path} not found (set data_dir=DIR to the folder holding "
                                    f"{', '.join(n + '.parquet' for n in PAPER_BENCHMARKS)})")
                out.append(_load_file(name, path, settings))
        elif spec in PAPER_BENCHMARKS:
            path = data_dir / f"{spec}.parquet"
            if not path.is_file():
                raise DataError(f"{spec}: {path} not found (set data_dir=DIR, or use {spec}=FILE)")
            out.append(_load_file(spec, path, settings))
        elif spec == "other":
            other = data_dir / "other"
            names = list(OTHER_BENCHMARKS)
            if other.is_dir():
                names += sorted(p.stem for p in other.glob("bbh_*.jsonl") if p.stem not in names)
            for name in names:
                path = other / f"{name}.jsonl"
                if path.is_file():
                    out.append(_load_file(name, path, settings, choice=True))
                else:
                    echo(f"skipping {name}: {path} not found")
                    skipped.append({"benchmark": name, "reason": f"{path} not found"})
        elif spec in OTHER_BENCHMARKS or spec.startswith("bbh_"):
            path = data_dir / "other" / f"{spec}.jsonl"
            if not path.is_file():
                raise DataError(f"{spec}: {path} not found (set data_dir=DIR, or use {spec}=FILE)")
            out.append(_load_file(spec, path, settings, choice=True))
        elif spec.endswith((".parquet", ".jsonl", ".json")) or os.sep in spec:
            path = Path(spec)
            out.append(_load_file(_check_name(path.stem, spec), path, settings))
        else:
            raise DataError(f"unknown benchmark {spec!r} (use demo, paper, other, one of "
                            f"{', '.join(PAPER_BENCHMARKS + OTHER_BENCHMARKS)}, or NAME=FILE)")
    seen = Counter(b.name for b in out)
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise DataError(f"benchmark {dup[0]!r} is given twice")
    if not out:
        raise DataError(f"no benchmark to run: every one was skipped ({', '.join(s['benchmark'] for s in skipped)})")
    for b in out:
        b.k = settings.k or default_k(b.name)
    return out, skipped


def _need_dir(path: Path, what: str, holding: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what}: data directory {path} not found (set data_dir=DIR to the folder with {holding})")


def _load_demo(settings: EvalSettings) -> Benchmark:
    try:
        examples = load_examples("demo:heldout", limit=settings.limit)
    except ImportError as exc:
        raise DataError(f"demo: the demo task's held-out set is not available ({exc})") from None
    problems = [Problem(i, e.question, e.answer) for i, e in enumerate(examples)]
    try:  # the demo's own rollout settings (its instruction and budgets)
        from ihgrpo.demo.sft import demo_rollout_config

        cfg = demo_rollout_config()
        defaults = {"max_turns": cfg.max_turns, "max_response_tokens": cfg.max_response_tokens,
                    "max_tokens_per_turn": cfg.max_tokens_per_turn, "instruction": cfg.instruction}
    except ImportError:  # pragma: no cover - the demo without its SFT module
        defaults = {"max_turns": 4, "max_response_tokens": 512, "max_tokens_per_turn": 256}
    return Benchmark("demo", problems, "demo:heldout", defaults=defaults)


def _first_row(path: Path) -> dict | None:
    """The first row of a JSONL/JSON/parquet file, None when it cannot be read (the loader says why)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows == 0:
                return None
            return pf.read_row_group(0).slice(0, 1).to_pylist()[0]
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json":
                data = json.load(f)
                return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return row if isinstance(row, dict) else None
    except Exception:
        return None
    return None


def _load_file(name: str, path: Path, settings: EvalSettings, *, choice: bool | None = None) -> Benchmark:
    if not path.is_file():
        raise DataError(f"{name}: {path}: file not found")
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError(f"{name}: {path}: unsupported file type (use .parquet, .jsonl or .json)")
    if choice is None:
        row = _first_row(path)
        choice = isinstance(row, dict) and "options" in row
    if choice:
        return Benchmark(name, _load_choice(path, settings.limit), str(path), domain="choice")
    try:
        examples = load_examples(str(path), limit=settings.limit)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None
    return Benchmark(name, [Problem(i, e.question, e.answer) for i, e in enumerate(examples)], str(path))


def _load_choice(path: Path, limit: int | None) -> list[Problem]:
    out: list[Problem] = []
    for where, row in read_rows(path):
        where = f"{path}: {where}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: missing or empty 'question'")
        options = _parse_options(row.get("options"), where)
        gold = _gold_letter(row.get("answer"), options, where)
        out.append(Problem(len(out), q, gold, tuple(options.items())))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _parse_options(raw: Any, where: str) -> dict[str, str]:
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


def _gold_letter(raw: Any, options: dict[str, str], where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"{where}: missing or empty 'answer' (the correct option's letter)")
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\.?\s*", raw)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    by_text = [letter for letter, text in options.items() if text.strip() == raw.strip()]
    if len(by_text) == 1:
        return by_text[0]
    raise DataError(f"{where}: answer {raw!r} is neither an option letter ({', '.join(options)}) nor an option's text")


def choice_prompt(problem: Problem) -> str:
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


# ----------------------------------------------------------------------------- scoring

def score_samples(correct: dict[int, list[bool]]) -> tuple[float, float]:
    """(avg@k, pass@k) from each problem's per-sample correctness.

    avg@k is the mean correctness over all samples (= the mean over problems of each problem's
    accuracy when every problem has k samples); pass@k is the fraction of problems with at
    least one correct sample among its k.
    """
    if not correct:
        return 0.0, 0.0
    flat = [bool(c) for cs in correct.values() for c in cs]
    avg = sum(flat) / len(flat) if flat else 0.0
    passed = sum(any(cs) for cs in correct.values()) / len(correct)
    return avg, passed


def sample_stats(traj) -> dict:
    """Per-sample statistics (the terms of batch_stats, before averaging)."""
    execs = [r for r in traj.turns if r.code is not None]
    blocks = sum(r.blocks_run for r in execs)
    model_tokens = sum(traj.mask)
    return {
        "turns": len(traj.turns),
        "tool_calls": len(execs),
        "blocks_run": blocks,
        "deferred_blocks": sum(r.blocks_run - 1 for r in execs),
        "code_errors": sum(not r.ok for r in execs),
        "exec_timeouts": sum(bool(r.timed_out) for r in execs),
        "truncated": bool(traj.truncated),
        "void": bool(traj.void),
        "response_tokens": model_tokens,
        "observation_tokens": len(traj.response_ids) - model_tokens,
        "finish": traj.turns[-1].end.value if traj.turns else None,
    }


def benchmark_metrics(records: list[dict], n_problems: int, k: int) -> dict:
    """SPEC section 5 metrics of one benchmark from its ledger records (n_problems * k of them)."""
    correct: dict[int, list[bool]] = {}
    for r in records:
        correct.setdefault(int(r["problem"]), []).append(bool(r["correct"]))
    avg, passed = score_samples(correct)
    n = max(1, len(records))
    st = [r.get("stats", {}) for r in records]
    calls = sum(s.get("tool_calls", 0) for s in st)
    blocks = sum(s.get("blocks_run", 0) for s in st)
    return {
        "avg@k": avg,
        "pass@k": passed,
        "k": k,
        "n_problems": n_problems,
        "n_samples": len(records),
        "accuracy": avg,
        "delay_call_rate": sum(s.get("deferred_blocks", 0) for s in st) / blocks if blocks else 0.0,
        "tool_calls_per_trajectory": calls / n,
        "code_using_fraction": sum(s.get("tool_calls", 0) > 0 for s in st) / n,
        "code_error_rate": sum(s.get("code_errors", 0) for s in st) / calls if calls else 0.0,
        "truncated_fraction": sum(bool(s.get("truncated")) for s in st) / n,
        "void_fraction": sum(bool(s.get("void")) for s in st) / n,
        "turns_per_trajectory": sum(s.get("turns", 0) for s in st) / n,
        "mean_response_tokens": sum(s.get("response_tokens", 0) for s in st) / n,
    }


# ----------------------------------------------------------------------------- seeding

def sample_seed(seed: int, benchmark: str, problem: int, sample: int) -> int:
    """The random-stream key of one sample: a function of these four values only."""
    digest = hashlib.sha256(f"ihgrpo-eval/{seed}/{benchmark}/{problem}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _call_seed(key: int, call: int) -> int:
    digest = hashlib.sha256(f"{key}/{call}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _make_row_seeded_generator():
    """Defines RowSeededHFGenerator on first use (transformers/torch are imported lazily)."""
    import torch

    from ihgrpo.rollout.hf import HFGenerator

    class _RowSeeded(HFGenerator):
        """An :class:`HFGenerator` where every row draws from its own random stream.

        Register a trajectory's key with :meth:`register` (``request_id -> key``); the n-th
        ``generate`` call for that request id then samples its tokens from uniforms seeded by
        ``(key, n)``, whatever else is in the batch. Sampling is otherwise HFGenerator's
        (temperature, top-k, top-p nucleus, inverse-CDF draws; the same log-probs). Rows
        without a key use HFGenerator's shared stream.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.row_keys: dict[str, int] = {}
            self._calls: Counter = Counter()
            self._u = None
            self._live = None
            self._step = 0

        def register(self, request_id: str, key: int) -> None:
            self.row_keys[request_id] = int(key)
            self._calls[request_id] = 0

        def forget(self, request_ids: Iterable[str]) -> None:
            for r in request_ids:
                self.row_keys.pop(r, None)
                self._calls.pop(r, None)

        def generate(self, prefixes, params, max_new_tokens=None, *, request_ids=None):
            if not prefixes or request_ids is None or any(r not in self.row_keys for r in request_ids):
                return super().generate(prefixes, params, max_new_tokens, request_ids=request_ids)
            limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prefixes)
            T = max(1, max(int(m) for m in limits))
            rows = []
            for r in request_ids:
                g = torch.Generator(device="cpu")
                g.manual_seed(_call_seed(self.row_keys[r], self._calls[r]))
                self._calls[r] += 1
                rows.append(torch.rand(T, dtype=torch.float64, generator=g))
            self._u = torch.stack(rows).to(self.device)
            self._live = torch.arange(len(prefixes), device=self.device)
            self._step = 0
            try:
                return super().generate(prefixes, params, max_new_tokens, request_ids=request_ids)
            finally:
                self._u = self._live = None

        def _new_cache(self):
            cache = super()._new_cache()
            if self._u is not None:  # follow the rows that leave the batch
                select = cache.batch_select_indices

                def batch_select_indices(indices):
                    self._live = self._live.index_select(0, indices.to(self._live.device))
                    return select(indices)

                cache.batch_select_indices = batch_select_indices
            return cache

        def _uniforms(self, n, gen):
            if self._u is None:
                return super()._uniforms(n, gen)
            u = self._u[self._live, self._step].reshape(n, 1)
            self._step += 1
            return u

    _RowSeeded.__name__ = _RowSeeded.__qualname__ = "RowSeededHFGenerator"
    return _RowSeeded


_ROW_SEEDED: list = []


def _row_seeded_class():
    if not _ROW_SEEDED:
        _ROW_SEEDED.append(_make_row_seeded_generator())
    return _ROW_SEEDED[0]


def __getattr__(name):  # RowSeededHFGenerator pulls in torch and transformers: build it when asked
    if name == "RowSeededHFGenerator":
        return _row_seeded_class()
    raise AttributeError(name)


# ----------------------------------------------------------------------------- the ledger

class SampleLedger:
    """``samples.jsonl``: one JSON line per sample, keyed by (benchmark, problem, sample).

    Appends are whole batches of lines in one ``write`` followed by ``fsync``. Loading drops a
    partial last line (an append cut short), undecodable lines and duplicates, and rewrites the
    file without them (atomically), so that the next append starts on a clean line.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[tuple[str, int, int], dict] = {}
        self.dropped = 0

    def load(self) -> "SampleLedger":
        self.records.clear()
        if not self.path.exists():
            return self
        data = self.path.read_bytes()
        kept: list[bytes] = []
        dropped = 0
        lines = data.split(b"\n")
        for raw in lines:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = (str(rec["benchmark"]), int(rec["problem"]), int(rec["sample"]))
                rec["correct"], rec["text"]  # noqa: B018 - a complete record has these
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if key in self.records:
                dropped += 1
                continue
            self.records[key] = rec
            kept.append(raw)
        self.dropped = dropped
        if dropped or (data and not data.endswith(b"\n")):
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(line + b"\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        return self

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(payload)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        for r in records:
            self.records[(r["benchmark"], r["problem"], r["sample"])] = r

    def __contains__(self, key) -> bool:
        return key in self.records

    def for_benchmark(self, name: str) -> list[dict]:
        return [r for (b, _, _), r in self.records.items() if b == name]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- running

def _rollout_settings(bench: Benchmark, s: EvalSettings) -> dict:
    """The rollout settings of one benchmark: the run's, or a packaged benchmark's own defaults
    for the keys not given explicitly."""
    out = {"protocol": s.protocol, "max_turns": s.max_turns, "max_response_tokens": s.max_response_tokens,
           "max_tokens_per_turn": s.max_tokens_per_turn, "max_observation_tokens": s.max_observation_tokens,
           "exec_timeout_s": s.exec_timeout_s, "instruction": s.instruction, "execute_token": s.execute_token,
           "enable_thinking": s.enable_thinking}
    for key, value in bench.defaults.items():
        if key not in s.explicit:
            out[key] = value
    if bench.domain == "choice":  # no tools: one generation, the plain prompt
        out.update(protocol="none", max_turns=1, instruction=MC_INSTRUCTION, max_tokens_per_turn=None)
    return out


def _model_id(path: str) -> str:
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _fingerprint(bench: Benchmark, s: EvalSettings) -> tuple[str, dict]:
    """What a sample depends on (besides its question): the model and the sampling settings."""
    sampling = {"model": _model_id(s.model), "dtype": s.dtype, "temperature": s.temperature, "top_p": s.top_p,
                "top_k": s.top_k, "seed": s.seed, "domain": bench.domain, **_rollout_settings(bench, s)}
    blob = json.dumps(sampling, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], sampling


def _check_ledger(ledger: SampleLedger, benches: list[Benchmark], s: EvalSettings, out: Path) -> None:
    known_path = out / "eval_settings.json"
    known = json.loads(known_path.read_text()) if known_path.exists() else {}
    for b in benches:
        fp, sampling = _fingerprint(b, s)
        for rec in ledger.for_benchmark(b.name):
            p = rec["problem"]
            if rec.get("fingerprint") != fp:
                old = known.get(rec.get("fingerprint"), {})
                diff = [f"{key}: {old.get(key)!r} -> {sampling.get(key)!r}" for key in sampling
                        if old and old.get(key) != sampling.get(key)]
                raise EvalError(f"{out / LEDGER} holds {b.name} samples made with other settings"
                                f"{' (' + '; '.join(diff)[:300] + ')' if diff else ''}; use another --out, "
                                f"or the same settings to resume")
            if p < len(b.problems) and (rec.get("question") != b.problems[p].question
                                        or rec.get("gold") != b.problems[p].gold):
                raise EvalError(f"{out / LEDGER}: {b.name} problem {p} is not the question of {b.source}; "
                                f"use another --out for another data file")


def _plan(bench: Benchmark, ledger: SampleLedger, batch_size: int) -> list[list[tuple[int, int]]]:
    """The missing (problem, sample) pairs, in batches of the fixed grid."""
    pairs = [(p, s) for p in range(len(bench.problems)) for s in range(bench.k)]
    batches = []
    for start in range(0, len(pairs), batch_size):
        missing = [ps for ps in pairs[start:start + batch_size] if (bench.name, *ps) not in ledger]
        if missing:
            batches.append(missing)
    return batches


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


class _Runner:
    """The model, generator, sandbox pool and verifier of one run (built only when needed)."""

    def __init__(self, s: EvalSettings, model, tokenizer, echo):
        import torch

        from ihgrpo.trainer import load_model_and_tokenizer

        self.s = s
        device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        if model is None:
            t0 = time.perf_counter()
            model, tokenizer = load_model_and_tokenizer(s.model, dtype=dtype)
            echo(f"loaded {s.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                 f"{dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
        elif tokenizer is None:
            raise EvalError("a tokenizer is needed with a model object")
        self.tokenizer = tokenizer
        self.eos = _eos_ids(model, tokenizer)
        if not self.eos:
            raise EvalError(f"{s.model}: neither the model nor the tokenizer names an EOS token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.generator = _row_seeded_class()(model, tokenizer, device=device, pad_token_id=pad, seed=s.seed)
        self.device, self.dtype = device, dtype
        self.pool = None
        self.verifier = None
        self.engines: dict[str, Any] = {}

    def engine(self, bench: Benchmark):
        from ihgrpo.rollout import RolloutConfig, RolloutEngine

        if bench.name not in self.engines:
            r = _rollout_settings(bench, self.s)
            try:
                cfg = RolloutConfig(
                    mode=r["protocol"] if bench.domain == "math" else "delayed", max_turns=r["max_turns"],
                    max_response_tokens=r["max_response_tokens"], max_tokens_per_turn=r["max_tokens_per_turn"],
                    max_observation_tokens=r["max_observation_tokens"], exec_timeout_s=r["exec_timeout_s"],
                    straggler_wait_s=None, execute_token=r["execute_token"], instruction=r["instruction"],
                    enable_thinking=r["enable_thinking"])
                engine = RolloutEngine(self.generator, self.tokenizer, None, cfg, eos_token_ids=self.eos)
            except ValueError as exc:  # e.g. an execute token the tokenizer splits
                raise EvalError(f"{bench.name}: {' '.join(str(exc).split())}") from None
            if bench.domain == "math" and self.pool is None:
                from ihgrpo.sandbox import SandboxPool

                self.pool = SandboxPool(max_workers=self.s.sandbox_workers, timeout_s=self.s.exec_timeout_s,
                                        memory_mb=self.s.sandbox_memory_mb, isolation=self.s.sandbox_isolation)
            engine.pool = self.pool
            self.engines[bench.name] = engine
        return self.engines[bench.name]

    def rewards(self, answers: list[str | None], golds: list[str]) -> list[float]:
        if self.verifier is None:
            from ihgrpo.rewards import RewardVerifier

            self.verifier = RewardVerifier(timeout_s=self.s.reward_timeout_s)
        return self.verifier.verify_batch(answers, golds)

    def run_batch(self, bench: Benchmark, pairs: list[tuple[int, int]]) -> list:
        """Trajectories of the given (problem, sample) pairs, scored, in order."""
        from ihgrpo.rollout import SamplingParams, Trajectory

        engine = self.engine(bench)
        cfg = engine.config
        s = self.s
        trajs = []
        prompts: dict[int, list[int]] = {}
        for p, k in pairs:
            if p not in prompts:
                problem = bench.problems[p]
                content = (choice_prompt(problem) if bench.domain == "choice" else
                           build_prompt(problem.question, cfg.mode, instruction=cfg.instruction,
                                        execute_token=cfg.execute_token))
                prompts[p] = engine.chat.prompt_ids(content)
            uid = f"{bench.name}-p{p}-s{k}"
            self.generator.register(uid, sample_seed(s.seed, bench.name, p, k))
            trajs.append(Trajectory(uid=uid, prompt_index=p, sample_index=k, prompt_ids=list(prompts[p])))
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_new_tokens=cfg.max_tokens_per_turn or cfg.max_response_tokens)
        try:
            if bench.domain == "choice":
                self._plain(engine, trajs, params)
            else:
                engine.run(trajs, params)
        finally:
            self.generator.forget(t.uid for t in trajs)
        if bench.domain == "choice":
            for t in trajs:
                opts = bench.problems[t.prompt_index].options
                t.meta["choice"] = choice_letter(t.answer, opts)
                t.reward = float(t.meta["choice"] == bench.problems[t.prompt_index].gold)
        else:
            rewards = self.rewards([t.answer for t in trajs], [bench.problems[t.prompt_index].gold for t in trajs])
            for t, r in zip(trajs, rewards):
                t.reward = float(r)
        return trajs

    def _plain(self, engine, trajs, params) -> None:
        """No tools: one generation per sample, stopped by EOS or the response budget."""
        from ihgrpo.rollout import SamplingParams, TurnRecord

        budget = engine.config.max_response_tokens
        sp = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            max_new_tokens=budget, stop_token_ids=tuple(self.eos))
        outs = self.generator.generate([t.prompt_ids for t in trajs], sp, [budget] * len(trajs),
                                       request_ids=[t.uid for t in trajs])
        for t, o in zip(trajs, outs):
            ids = list(o.token_ids)
            t.response_ids, t.mask, t.logprobs = ids, [1] * len(ids), [float(x) for x in o.logprobs]
            end = TurnEnd.EOS if o.finish_reason == "stop_token" else TurnEnd.BUDGET
            t.turns.append(TurnRecord(text=engine.chat.decode(ids), end=end, n_tokens=len(ids)))
            t.finished, t.truncated = end is TurnEnd.EOS, end is not TurnEnd.EOS
            text = engine.chat.model_text(ids)
            t.answer = extract_boxed(text)
            t.void = is_void(text, t.finished)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.verifier is not None:
            self.verifier.close()


def _record(bench: Benchmark, traj, fingerprint: str, full_text: str) -> dict:
    problem = bench.problems[traj.prompt_index]
    rec = {
        "benchmark": bench.name, "problem": traj.prompt_index, "sample": traj.sample_index,
        "question": problem.question, "gold": problem.gold, "answer": traj.answer,
        "correct": bool(traj.reward), "reward": float(traj.reward or 0.0), "text": full_text,
        "turns": [{"text": r.text, "end": r.end.value, "n_tokens": r.n_tokens, "code": r.code,
                   "blocks_run": r.blocks_run, "output": r.output, "ok": r.ok, "timed_out": r.timed_out}
                  for r in traj.turns],
        "stats": sample_stats(traj), "fingerprint": fingerprint,
    }
    if bench.domain == "choice":
        rec["options"] = dict(problem.options or ())
        rec["choice"] = traj.meta.get("choice")
    return rec


def run_eval(settings: EvalSettings, out_dir: str | Path, *, benchmarks: list[str] | list[Benchmark],
             model=None, tokenizer=None, on_batch: Callable[[str, list[dict]], None] | None = None,
             echo: Callable[[str], None] | None = None) -> dict:
    """Evaluates, resuming from ``out_dir/samples.jsonl``; writes every output and returns the
    results (the content of results.json).

    ``benchmarks``: specs (strings) or :class:`Benchmark` objects. ``model``/``tokenizer``:
    already loaded objects instead of ``settings.model`` (which still names the model in the
    outputs). ``on_batch(benchmark, records)`` runs after each batch is durably in the ledger.
    """
    echo = echo or (lambda msg: print(msg, flush=True))
    settings.validate()
    out = Path(out_dir)
    skipped: list[dict] = []
    if benchmarks and isinstance(benchmarks[0], Benchmark):
        benches = list(benchmarks)
        for b in benches:
            b.k = settings.k or b.k
    else:
        benches, skipped = resolve_benchmarks(list(benchmarks), settings, echo)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ledger = SampleLedger(out / LEDGER).load()
    if ledger.records:
        echo(f"resuming: {len(ledger.records)} samples already in {out / LEDGER}"
             + (f" ({ledger.dropped} partial or duplicate lines dropped)" if ledger.dropped else ""))
    _check_ledger(ledger, benches, settings, out)
    known_path = out / "eval_settings.json"
    known = json.loads(known_path.read_text()) if known_path.exists() else {}
    for b in benches:
        fp, sampling = _fingerprint(b, settings)
        known[fp] = sampling
    _atomic_write(known_path, json.dumps(known, indent=2))

    plans = {b.name: _plan(b, ledger, settings.batch_size) for b in benches}
    todo = sum(len(pairs) for batches in plans.values() for pairs in batches)
    for b in benches:
        have = len(b.problems) * b.k - sum(len(x) for x in plans[b.name])
        echo(f"{b.name}: {len(b.problems)} problems x k={b.k} ({b.domain}; {b.source})"
             + (f", {have} samples done" if have else ""))
    runner = None
    t_start = time.perf_counter()
    generated = 0
    gen_time = 0.0
    try:
        if todo:
            runner = _Runner(settings, model, tokenizer, echo)
        for b in benches:
            fp, _ = _fingerprint(b, settings)
            for pairs in plans[b.name]:
                t0 = time.perf_counter()
                trajs = runner.run_batch(b, pairs)
                engine = runner.engine(b)
                records = [_record(b, t, fp, engine.chat.decode(t.response_ids)) for t in trajs]
                ledger.append(records)
                dt = time.perf_counter() - t0
                gen_time += dt
                generated += len(records)
                probs = sorted({p for p, _ in pairs})
                acc = sum(r["correct"] for r in records) / len(records)
                echo(f"  {b.name}: problems {probs[0]}-{probs[-1]}, {len(records)} samples, "
                     f"accuracy {acc:.3f}, {dt:.1f} s ({generated}/{todo})")
                if on_batch is not None:
                    on_batch(b.name, records)
    finally:
        if runner is not None:
            runner.close()
    results = _results(benches, ledger, settings, skipped, runner)
    results["timing"] = {"wall_s": time.perf_counter() - t_start, "generation_s": gen_time,
                         "samples_generated": generated}
    _write_outputs(out, results, benches, ledger, settings, echo, runner.tokenizer if runner else tokenizer)
    return results


def _results(benches: list[Benchmark], ledger: SampleLedger, s: EvalSettings, skipped, runner) -> dict:
    per: dict[str, dict] = {}
    for b in benches:
        recs = [ledger.records[(b.name, p, k)] for p in range(len(b.problems)) for k in range(b.k)]
        m = benchmark_metrics(recs, len(b.problems), b.k)
        rollout = _rollout_settings(b, s)
        rollout["instruction"] = ("multiple-choice, no tools" if b.domain == "choice" else
                                  "default" if rollout["instruction"] is None else
                                  "custom" if rollout["instruction"] == s.instruction else b.name)
        per[b.name] = {**m, "domain": b.domain, "source": b.source, "rollout": rollout}
    avgs = [v["avg@k"] for v in per.values()]
    settings = s.public()
    settings["model"] = _model_id(s.model)
    settings["k"] = {b.name: b.k for b in benches}
    if runner is not None:
        settings["device"], settings["dtype"] = runner.device, runner.dtype
    res = {"benchmarks": per, "mean_of_benchmarks": sum(avgs) / len(avgs) if avgs else 0.0}
    domains = sorted({b.domain for b in benches})
    if len(domains) > 1:
        res["mean_by_domain"] = {d: sum(v["avg@k"] for v in per.values() if v["domain"] == d)
                                 / sum(v["domain"] == d for v in per.values()) for d in domains}
    res["settings"] = settings
    if skipped:
        res["skipped"] = skipped
    return res


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(results: dict) -> str:
    per = results["benchmarks"]
    s = results["settings"]
    names = list(per)
    head = ["Model"] + [f"{PAPER_TITLES.get(n, n)} (avg@{per[n]['k']})" for n in names] + ["Mean"]
    model = Path(s["model"]).name or s["model"]
    row = [f"{model} ({s['protocol']})"] + [_pct(per[n]["avg@k"]) for n in names] + [_pct(results["mean_of_benchmarks"])]
    lines = [f"# Evaluation of `{s['model']}`", "",
             f"Protocol {s['protocol']}, temperature {s['temperature']}, top_p {s['top_p']}, top_k {s['top_k']}, "
             f"seed {s['seed']}. Scores in percent; the mean is the unweighted mean of avg@k.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", "",
             "## Details", "",
             "| Benchmark | k | problems | avg@k | pass@k | delay-call rate | tool calls / traj. | "
             "code error rate | truncated | void | response tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        m = per[n]
        lines.append(f"| {n} | {m['k']} | {m['n_problems']} | {_pct(m['avg@k'])} | {_pct(m['pass@k'])} | "
                     f"{m['delay_call_rate']:.3f} | {m['tool_calls_per_trajectory']:.2f} | "
                     f"{m['code_error_rate']:.3f} | {m['truncated_fraction']:.3f} | {m['void_fraction']:.3f} | "
                     f"{m['mean_response_tokens']:.0f} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{x['benchmark']} ({x['reason']})" for x in results["skipped"])]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, results: dict) -> bool:
    """avg@k and pass@k per benchmark as grouped bars (matplotlib, Agg). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    per = results["benchmarks"]
    names = list(per)
    x = list(range(len(names)))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.6), dpi=120)
    avg = [100 * per[n]["avg@k"] for n in names]
    pas = [100 * per[n]["pass@k"] for n in names]
    b1 = ax.bar([i - w / 2 for i in x], avg, w, label="avg@k", color="#4C72B0")
    b2 = ax.bar([i + w / 2 for i in x], pas, w, label="pass@k", color="#DD8452")
    for bars in (b1, b2):
        for bar in bars:
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{PAPER_TITLES.get(n, n)}\nk={per[n]['k']}" for n in names], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{Path(results['settings']['model']).name} ({results['settings']['protocol']}): "
                 f"mean avg@k {100 * results['mean_of_benchmarks']:.1f}", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _viewer_records(benches: list[Benchmark], ledger: SampleLedger, n: int) -> list[dict]:
    out = []
    for b in benches:
        first = [ledger.records[(b.name, p, 0)] for p in range(min(n, len(b.problems)))]
        if n and first and not any(r["correct"] for r in first):
            good = next((r for (name, p, k), r in sorted(ledger.records.items())
                         if name == b.name and p < len(b.problems) and k < b.k and r["correct"]), None)
            if good is not None:
                first[-1] = good
        for r in first:
            r = dict(r)
            r["title"] = f"{b.name} · problem {r['problem']} · sample {r['sample']}"
            out.append(r)
    return out


def _write_outputs(out: Path, results: dict, benches, ledger, s: EvalSettings, echo, tokenizer) -> None:
    from ihgrpo.viewer import write_viewer

    _atomic_write(out / "results.json", json.dumps(results, indent=2))
    md = results_markdown(results)
    _atomic_write(out / "results.md", md)
    written = ["results.json", "results.md", LEDGER]
    if write_chart(out / "chart.png", results):
        written.append("chart.png")
    else:
        echo("note: matplotlib is not installed (pip install 'ihgrpo[plot]'): no chart.png")
    if s.viewer_samples:
        write_viewer(out / "rollouts.html", _viewer_records(benches, ledger, s.viewer_samples),
                     title=f"ihgrpo eval: {Path(s.model).name or s.model}")
        written.append("rollouts.html")
    echo("")
    echo(md.split("## Details")[0].split("\n", 2)[2].strip())
    echo(f"wrote {', '.join(written)} in {out}")


# ----------------------------------------------------------------------------- command line

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ihgrpo eval``."""
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a local model directory or a Hugging Face name (the tokenizer comes from it too)")
    parser.add_argument("--benchmark", action="append", required=True, metavar="SPEC",
                        help="demo | paper | other | math500 | ... | NAME=FILE (.parquet, .jsonl); repeatable")
    parser.add_argument("--k", type=int, default=None, help="samples per problem (default: 8 for math500 and "
                        "olympiad, 32 for aime24, aime25, amc23 and hmmt25, else 8)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--protocol", choices=("delayed", "coupled"), default=None,
                        help="delayed (D, default) or coupled (C) code execution")
    parser.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling (default 0.7)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder; rerun to resume")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings: temperature, top_p, top_k, max_turns, max_response_tokens, "
                             "max_observation_tokens, exec_timeout_s, batch_size, seed, data_dir, sandbox_workers, ...")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    s = parse_overrides(getattr(args, "overrides", None) or [], EvalSettings(model=args.model))
    flags = {key: getattr(args, key, None) for key in ("k", "limit", "protocol", "top_p")}
    flags = {key: v for key, v in flags.items() if v is not None}
    s = dataclasses.replace(s, **flags, explicit=frozenset(s.explicit | set(flags)))
    s.validate()
    return s


def _usage_errors() -> tuple[type[Exception], ...]:
    from ihgrpo.sandbox import SandboxUnavailable
    from ihgrpo.trainer import ModelLoadError

    errors: list[type[Exception]] = [EvalError, DataError, ModelLoadError, SandboxUnavailable]
    try:
        from ihgrpo.config import ConfigError

        errors.append(ConfigError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def cmd_eval(args: argparse.Namespace) -> int:
    """``ihgrpo eval``: 0 on success, 2 (one line on stderr) for bad input, 130 when interrupted."""
    try:
        settings = settings_from_args(args)
        run_eval(settings, args.out, benchmarks=args.benchmark)
    except _usage_errors() as exc:
        msg = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        print(f"ihgrpo eval: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ihgrpo eval: interrupted; rerun the same command to resume from {Path(args.out) / LEDGER}",
              file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ihgrpo eval", description=__doc__.split("\n")[0])
    add_eval_arguments(parser)
    return cmd_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
