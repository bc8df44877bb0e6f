"""A generator that plays fixed token sequences: deterministic rollouts for tests and demos."""

from __future__ import annotations

from typing import Callable

from .generator import GenerationOutput, Generator, SamplingParams, check_seeds

Script = Callable[[str, list[int]], list[int]]


def scripted_logprob(token_id: int, position: int) -> float:
    """A recognisable fake log-prob, so tests can check that log-probs stay aligned with tokens."""
    return -((token_id * 31 + position) % 1000) / 1000.0 - 1e-3


class ScriptedGenerator(Generator):
    """Continues each request with the tokens its script gives.

    `script(request_id, prefix)` returns the tokens the "model" would write next (it may look at
    the prefix, e.g. to react to an observation). Stop tokens, stop strings (with `decode`) and
    token budgets then cut the continuation exactly as a real generator's would.
    """

    def __init__(self, script: Script | dict[str, list[list[int]]],
                 decode: Callable[[list[int]], str] | None = None):
        if isinstance(script, dict):
            turns = {k: list(v) for k, v in script.items()}
            calls: dict[str, int] = {}

            def play(rid: str, prefix: list[int]) -> list[int]:  # noqa: ARG001
                i = calls.get(rid, 0)
                calls[rid] = i + 1
                return turns[rid][i] if i < len(turns[rid]) else []

            self.script = play
        else:
            self.script = script
        self.decode = decode
        self.calls = 0
        self.seeds: list[list[int] | None] = []  # the per-request seeds of each call (the play ignores them)

    def generate(self, prefixes, params: SamplingParams, max_new_tokens=None, *, request_ids=None, seeds=None):
        if request_ids is None or len(request_ids) != len(prefixes):
            raise ValueError("ScriptedGenerator needs one request id per prefix")
        check_seeds(seeds, len(prefixes))
        self.seeds.append(None if seeds is None else list(seeds))
        if params.stop_strings and self.decode is None:
            raise ValueError("stop_strings need a decode function")
        self.calls += 1
        budgets = max_new_tokens or [params.max_new_tokens] * len(prefixes)
        outs = []
        for rid, prefix, budget in zip(request_ids, prefixes, budgets):
            planned = self.script(rid, list(prefix))
            ids: list[int] = []
            reason, hit = "length", None
            for tok in planned[:budget]:
                ids.append(tok)
                if tok in params.stop_token_ids:
                    reason = "stop_token"
                    break
                if params.stop_strings:
                    text = self.decode(ids)
                    hit = next((s for s in params.stop_strings if s in text), None)
                    if hit is not None:
                        reason = "stop_string"
                        break
            if not ids:
                raise ValueError(f"script for {rid!r} has nothing more to say")
            start = len(prefix)
            outs.append(GenerationOutput(ids, [scripted_logprob(t, start + i) for i, t in enumerate(ids)],
                                         reason, hit))
        return outs
