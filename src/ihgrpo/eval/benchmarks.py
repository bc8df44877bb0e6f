"""Benchmarks: what ``--benchmark SPEC`` names, loaded into problems (no model, no torch)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ihgrpo import registry
from ihgrpo.data import DataError, load_examples, read_rows

from .choice import gold_letter, parse_options

__all__ = ["PAPER_BENCHMARKS", "PAPER_K", "PAPER_TITLES", "OTHER_BENCHMARKS", "DEFAULT_K", "EvalError",
           "Problem", "Benchmark", "default_k", "resolve_benchmarks", "pandas_sample_rows", "OLYMPIAD_SAMPLE"]

PAPER_BENCHMARKS = ("math500", "olympiad", "aime24", "aime25", "amc23", "hmmt25")
PAPER_K = {"math500": 8, "olympiad": 8, "olympiad-full": 8, "aime24": 32, "aime25": 32, "amc23": 32, "hmmt25": 32}
PAPER_TITLES = {"math500": "MATH500", "olympiad": "OlympiadBench", "olympiad-full": "OlympiadBench (all rows)",
                "aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "hmmt25": "HMMT25"}
# The release scores OlympiadBench on a subsample of the 674-row file:
# `df.sample(n=500, random_state=42)`; `olympiad-full` scores every row.
OLYMPIAD_SAMPLE = (500, 42)
OTHER_BENCHMARKS = ("mmlu_pro", "logiqa", "bbh_date_understanding", "bbh_formal_fallacies",
                    "bbh_logical_deduction_seven_objects")
DEFAULT_K = 8

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class EvalError(ValueError):
    """A bad evaluation request or output folder; the message is one line."""


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
    selection: str = ""  # how the problems were chosen from the file, when not all of them
    k: int = DEFAULT_K
    # a registered benchmark's own settings (dotted config keys, e.g. the demo's instruction and
    # budgets): a layer under the user's settings
    defaults: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return PAPER_TITLES.get(self.name, self.name)


def default_k(name: str) -> int:
    return PAPER_K.get(name, DEFAULT_K)


def pandas_sample_rows(n_rows: int, n: int, random_state: int) -> list[int]:
    """The rows, in their order, that pandas' ``DataFrame.sample(n=n, random_state=random_state)``
    takes from ``n_rows`` rows, without pandas: pandas draws ``RandomState(random_state).choice(
    n_rows, n, replace=False)`` (pandas/core/sample.py), which numpy's legacy generator computes
    as the first ``n`` entries of ``permutation(n_rows)``. A test checks it against pandas."""
    import numpy as np

    if not 0 <= n <= n_rows:
        raise ValueError(f"cannot sample {n} of {n_rows} rows without replacement")
    return [int(i) for i in np.random.RandomState(random_state).choice(n_rows, size=n, replace=False)]


def _olympiad(path: Path, limit: int | None) -> Benchmark:
    """``olympiad``: the release's subsample of the file, in pandas' order (``olympiad-full``,
    loaded like any file, keeps every row)."""
    bench = _load_file("olympiad", path, None)
    n, seed = OLYMPIAD_SAMPLE
    if len(bench.problems) > n:  # a smaller file is taken to be a subsample already
        bench.selection = (f"the release's subsample: pandas sample(n={n}, random_state={seed}) "
                           f"of {len(bench.problems)} rows")
        bench.problems = [bench.problems[i] for i in pandas_sample_rows(len(bench.problems), n, seed)]
    bench.problems = bench.problems[:limit or None]
    return bench


def _check_name(name: str, spec: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise DataError(f"benchmark {spec!r}: the name {name!r} must be letters, digits, '_', '-', '.' or '+'")
    return name


def resolve_benchmarks(specs: list[str], cfg, echo: Callable[[str], None] = print
                       ) -> tuple[list[Benchmark], list[dict]]:
    """Benchmarks named by ``specs`` (see :mod:`ihgrpo.eval`) and the skipped ones; ``cfg`` is an
    :class:`~ihgrpo.config.EvalConfig` (its ``eval.data_dir``, ``eval.limit`` and ``eval.k``)."""
    if not specs:
        raise EvalError("no benchmark given (--benchmark SPEC)")
    out: list[Benchmark] = []
    skipped: list[dict] = []
    data_dir = Path(cfg.eval.data_dir)
    limit = cfg.eval.limit
    for spec in specs:
        spec = spec.strip()
        if "=" in spec:
            name, file = spec.split("=", 1)
            out.append(_load_file(_check_name(name.strip(), spec), Path(file.strip()), limit))
        elif spec in registry.names("benchmark"):
            out.append(_load_registered(spec, cfg))
        elif spec == "paper":
            _need_dir(data_dir, "paper", "the six benchmark parquet files")
            for name in PAPER_BENCHMARKS:
                path = data_dir / f"{name}.parquet"
                if not path.is_file():
                    raise DataError(f"paper: {path} not found (set data_dir=DIR to the folder holding "
                                    f"{', '.join(n + '.parquet' for n in PAPER_BENCHMARKS)})")
                out.append(_olympiad(path, limit) if name == "olympiad" else _load_file(name, path, limit))
        elif spec in PAPER_BENCHMARKS or spec == "olympiad-full":
            path = data_dir / f"{spec.removesuffix('-full')}.parquet"
            if not path.is_file():
                raise DataError(f"{spec}: {path} not found (set data_dir=DIR, or use {spec}=FILE)")
            out.append(_olympiad(path, limit) if spec == "olympiad" else _load_file(spec, path, limit))
        elif spec == "other":
            other = data_dir / "other"
            names = list(OTHER_BENCHMARKS)
            if other.is_dir():
                names += sorted(p.stem for p in other.glob("bbh_*.jsonl") if p.stem not in names)
            for name in names:
                path = other / f"{name}.jsonl"
                if path.is_file():
                    out.append(_load_file(name, path, limit, choice=True))
                else:
                    echo(f"skipping {name}: {path} not found")
                    skipped.append({"benchmark": name, "reason": f"{path} not found"})
        elif spec in OTHER_BENCHMARKS or spec.startswith("bbh_"):
            path = data_dir / "other" / f"{spec}.jsonl"
            if not path.is_file():
                raise DataError(f"{spec}: {path} not found (set data_dir=DIR, or use {spec}=FILE)")
            out.append(_load_file(spec, path, limit, choice=True))
        elif spec.endswith((".parquet", ".jsonl", ".json")) or os.sep in spec:
            path = Path(spec)
            out.append(_load_file(_check_name(path.stem, spec), path, limit))
        else:
            known = ", ".join([*registry.names("benchmark"), "paper", "other"])
            raise DataError(f"unknown benchmark {spec!r} (use {known}, one of "
                            f"{', '.join(PAPER_BENCHMARKS + ('olympiad-full',) + OTHER_BENCHMARKS)}, or NAME=FILE)")
    seen = Counter(b.name for b in out)
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise DataError(f"benchmark {dup[0]!r} is given twice")
    if not out:
        raise DataError(f"no benchmark to run: every one was skipped ({', '.join(s['benchmark'] for s in skipped)})")
    for b in out:
        b.k = cfg.eval.k or default_k(b.name)
    return out, skipped


def _need_dir(path: Path, what: str, holding: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what}: data directory {path} not found (set data_dir=DIR to the folder with {holding})")


def _load_registered(name: str, cfg) -> Benchmark:
    try:
        return registry.lookup("benchmark", name)(name, cfg)
    except ImportError as exc:
        raise DataError(f"{name}: the registered benchmark is not available ({exc})") from None


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


def _load_file(name: str, path: Path, limit: int | None, *, choice: bool | None = None) -> Benchmark:
    if not path.is_file():
        raise DataError(f"{name}: {path}: file not found")
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError(f"{name}: {path}: unsupported file type (use .parquet, .jsonl or .json)")
    if choice is None:
        row = _first_row(path)
        choice = isinstance(row, dict) and "options" in row
    if choice:
        return Benchmark(name, _load_choice(path, limit), str(path), domain="choice")
    try:
        examples = load_examples(str(path), limit=limit)
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
        options = parse_options(row.get("options"), where)
        gold = gold_letter(row.get("answer"), options, where)
        out.append(Problem(len(out), q, gold, tuple(options.items())))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no rows")
    return out
