"""The narrow interface between the rollout engine and a token generator.

Prefix token ids in; continuation ids and their log-probs out. Backends: Hugging Face
transformers (`HFGenerator`), vLLM (`VLLMGenerator`, an optional extra), a scripted player for
tests (`ScriptedGenerator`).

A backend with its own copy of the weights (vLLM) is told about every optimizer step through
`sync_weights(model)`, and may free its accelerator memory while the trainer uses it (`sleep`; it
wakes by itself on the next `generate`). Backends that run the trainer's module itself need neither.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one turn.

    `logprobs` returned by a generator are log-probabilities of the sampled tokens under the
    temperature-scaled distribution, before top-p / top-k truncation (what the loss uses).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()  # generation stops after one of these (it is kept)
    stop_strings: tuple[str, ...] = ()  # ... or once the decoded continuation contains one
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationOutput:
    token_ids: list[int]
    logprobs: list[float]
    # "stop_token" (last id is in stop_token_ids), "stop_string", or "length"
    finish_reason: str
    stop_string: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateProgress:
    """A report from inside one `generate` call (see `Generator.progress`)."""

    new_tokens: int  # tokens sampled since the previous report of this call, over all rows
    tokens: int  # tokens sampled so far in this call
    finished: int  # rows finished so far in this call
    rows: int  # rows in this call
    step: int  # decode steps so far
    max_steps: int  # the call's largest token budget


class Generator(abc.ABC):
    """Generates continuations for a batch of token-id prefixes.

    `progress`: an optional callback a caller sets on the generator. A generator that supports
    it calls it with a `GenerateProgress` while a `generate` call runs (HFGenerator: every
    `progress_every` decode steps, and once when the last row finishes, so that the
    `new_tokens` of one call add up to the tokens it returns). Other generators ignore it: an
    attribute rather than an argument, so that every generator and wrapper keeps working.
    """

    progress: Callable[[GenerateProgress], None] | None = None

    @abc.abstractmethod
    def generate(self, prefixes: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None, *,
                 request_ids: list[str] | None = None,
                 seeds: list[int] | None = None) -> list[GenerationOutput]:
        """One continuation per prefix. `max_new_tokens` overrides params.max_new_tokens per
        prefix; `request_ids` name the trajectories (for logging, caching or scripted play).

        `seeds`: one per prefix. Row i then samples from its own random stream, a function of
        seeds[i] alone: its tokens do not depend on the other rows of the batch, on the batch
        size or on earlier calls (up to floating-point noise of differently shaped batches).
        Without `seeds`, rows share the stream of params.seed (or the generator's own)."""

    def sync_weights(self, model) -> None:  # noqa: B027 - a no-op unless the backend copies the weights
        """Sample from `model`'s current weights from now on (called after every optimizer step)."""

    def sleep(self) -> None:  # noqa: B027
        """Free accelerator memory for training; the next `generate` wakes the backend up."""


def derive_seed(key: int, n: int) -> int:
    """The seed of the n-th generation call of a request whose own seed is `key` (a 63-bit
    hash, so that consecutive keys or calls give unrelated streams)."""
    digest = hashlib.sha256(f"{key}/{n}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class ProgressReporter:
    """Turns a decode loop's rows (objects with `.n`, tokens so far, and `.finish_reason`,
    None while generating) into `GenerateProgress` reports every `every` steps."""

    __slots__ = ("callback", "rows", "max_steps", "every", "tokens")

    def __init__(self, callback: Callable[[GenerateProgress], None] | None, rows: list,
                 max_steps: int, every: int):
        self.callback, self.rows, self.max_steps, self.every = callback, rows, max_steps, max(1, every)
        self.tokens = 0

    def step(self, step: int, last: bool) -> None:
        """After decode step `step` (1-based); `last`: every row has finished."""
        if self.callback is None or (step % self.every and not last):
            return
        tokens = sum(r.n for r in self.rows)
        finished = sum(r.finish_reason is not None for r in self.rows)
        new, self.tokens = tokens - self.tokens, tokens
        self.callback(GenerateProgress(new_tokens=new, tokens=tokens, finished=finished,
                                       rows=len(self.rows), step=step, max_steps=self.max_steps))


def check_seeds(seeds: list[int] | None, n: int) -> None:
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} prefixes")
