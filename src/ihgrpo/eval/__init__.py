r"""Benchmark evaluation: ``ihgrpo eval`` (SPEC sections 5 and 6).

    ihgrpo eval --model PATH --benchmark SPEC [--benchmark SPEC ...] [--k N] [--limit N]
                [--protocol delayed|coupled] [--top-p P] [--max-response-tokens N] [--config YAML]
                --out DIR [key=value ...]

``PATH`` is a local model directory, a Hugging Face name or a registered model name; the
tokenizer comes from the same place. Any causal LM: under the delayed protocol, a vocabulary
without the execute token gets it (:func:`ihgrpo.vocab.add_protocol_tokens`); the coupled
protocol needs none. A tokenizer without a chat template gets the plain frame
``User: {instruction and question}\nAssistant:`` (after its BOS token). Put all ``key=value`` settings together (before or after
the options).

Layout: :mod:`.benchmarks` (what a SPEC names), :mod:`.choice` (multiple choice), :mod:`.metrics`
(avg@k, pass@k, ...), :mod:`.ledger` (samples.jsonl), :mod:`.runner` (generation and scoring;
the only module that needs torch), :mod:`.progress` (the display while it runs), :mod:`.report`
(results.md, chart, viewer), :mod:`.cli`.

Benchmarks (``SPEC``)
---------------------
* a registered benchmark (:mod:`ihgrpo.registry`): ``demo``, the demo task's held-out set, with
  the demo's instruction and budgets (4 turns, 512 response tokens, 256 per turn) as a layer
  under the user's settings (registered by the demo package, which the ``ihgrpo`` command imports).
* ``paper``: the paper's six math benchmarks, read from ``data_dir`` (default
  ``../shared/data/math``, relative to the current directory): ``math500.parquet``,
  ``olympiad.parquet``, ``aime24.parquet``, ``aime25.parquet``, ``amc23.parquet``,
  ``hmmt25.parquet``. One of them alone by its name (``aime24``). A benchmark is named by its
  file or its spec, never by the ``data_source`` column (wrong in two of the files).
  ``olympiad`` (alone or in ``paper``) is the release's 500-problem subsample of the 674-row file:
  the rows pandas' ``DataFrame.sample(n=500, random_state=42)`` takes, in that order (computed with
  numpy, which pandas uses; pandas is not needed). ``olympiad-full`` scores all rows of the same file.
  ``limit`` takes the first N problems of the selection.
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

Settings (:class:`ihgrpo.config.EvalConfig`)
--------------------------------------------
The training config's ``model`` and ``rollout`` sections plus ``eval`` (k, limit, batch_size,
data_dir, device, reward_timeout_s, viewer_samples) and ``seed``, read like a training config:
the defaults, a benchmark's own defaults, ``--config YAML``, then ``key=value`` settings by
dotted name (``rollout.max_turns=3``) or bare name (``max_turns=3``; ``model`` is model.path,
``protocol`` rollout.mode), then the options. Bad settings are a one-line ConfigError.

The defaults are the paper's evaluation: temperature 1.0, top_p 0.7 (the release's configured
value; its evaluation silently used 1.0, a defect: here the configured top_p reaches the
sampler), 5 turns, 8,000 response tokens, observations capped at 256 tokens; k = 8 for
math500 and olympiad, 32 for aime24, aime25, amc23 and hmmt25, 8 for any other benchmark.

Token budgets
-------------
``max_response_tokens`` (``--max-response-tokens N``; default 8,000, the ``demo`` benchmark 512)
is a sample's whole budget after its prompt: the model's tokens of every turn plus the
observations. ``max_tokens_per_turn`` (default none) caps one turn (one generation call); a turn
gets the smaller of it and what is left of ``max_response_tokens``, so ``--max-response-tokens
N`` alone also bounds every turn by N. (The paper's setting is up to 8,000 tokens per turn
within a 16,000-token context, prompt included: ``max_tokens_per_turn=8000`` with
``max_response_tokens`` about 16,000 minus the prompt.) A sample that runs out of budget is
truncated (``truncated_fraction``).

Progress
--------
While batches are generated, the progress goes to stderr: samples done / to do (a sample counts
once its batch is in the ledger), tokens generated and tokens/s, the rows still generating in the
current generation call and its decode step (so it moves within a batch), the elapsed time and
an ETA from the samples done so far. A live ``rich`` bar when stderr is a terminal, else a plain
line at most every 10 s::

    eval: 32/48 samples · aime24 · 51,200 tokens · 212 tok/s · 7/16 rows (step 1840/8000) · 4:01 elapsed · ETA 2:00

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
seed derived from (seed, benchmark, problem, sample, generation call), not from the batch (the
generator's per-request ``seeds``). So a sample's tokens do not depend on which other samples share
its batch, on the batch size, or on what was done before an interruption: a resumed run samples
what an uninterrupted one would. (Rows of a batch differ only by floating-point noise of
differently shaped matrix products; since the batch grid is fixed, an interrupted batch is
regenerated with the same composition, bit for bit on CPU.) Growing ``k`` or ``limit`` in the
same ``DIR`` reuses the samples already there.
"""

from __future__ import annotations

from .benchmarks import (DEFAULT_K, OTHER_BENCHMARKS, PAPER_BENCHMARKS, PAPER_K, PAPER_TITLES, Benchmark,
                         EvalError, Problem, default_k, resolve_benchmarks)
from .choice import MC_INSTRUCTION, choice_letter, choice_prompt
from .cli import add_eval_arguments, cmd_eval, config_from_args, main
from .ledger import LEDGER, SampleLedger
from .metrics import benchmark_metrics, sample_stats, score_samples
from .report import results_markdown, write_chart
from .runner import bench_config, flat_settings, run_eval, sample_seed

__all__ = [
    "PAPER_BENCHMARKS", "PAPER_K", "PAPER_TITLES", "OTHER_BENCHMARKS", "DEFAULT_K", "LEDGER", "MC_INSTRUCTION",
    "EvalError", "Problem", "Benchmark", "SampleLedger", "add_eval_arguments", "bench_config", "benchmark_metrics",
    "choice_letter", "choice_prompt", "cmd_eval", "config_from_args", "default_k", "flat_settings", "main",
    "resolve_benchmarks", "results_markdown", "run_eval", "sample_seed", "sample_stats", "score_samples",
    "write_chart",
]
