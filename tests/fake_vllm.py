"""A FAKE vLLM for tests: vLLM is not installed anywhere our tests run.

`FakeVLLMEngine` and `FAKE_VLLM` (a stand-in for the ``vllm`` module) mirror vLLM 0.32's public
structures, read from its wheel: ``SamplingParams`` (the field names, and the checks we depend on: a
stop string needs ``detokenize=True``, temperature in [0, 2]), ``TokensPrompt`` (a TypedDict),
``Logprob(logprob, rank, decoded_token)``, ``CompletionOutput`` / ``RequestOutput``, ``LLM.generate``
/ ``sleep`` / ``wake_up`` / ``collective_rpc`` / ``reset_prefix_cache``, and its stopping rules (the
model's EOS stops unless ``ignore_eos``; a stop token is kept in ``token_ids`` with ``stop_reason`` =
its id; a stop string is matched in the detokenized text, keeping the tokens up to the one completing
it, ``stop_reason`` = the string; the budget gives "length"). The numbers it returns are made up.
"""

from __future__ import annotations

import dataclasses
import types

import torch

FAKE_EOS = 0  # the fake model's own EOS id (vLLM stops there unless ignore_eos=True)


@dataclasses.dataclass
class FakeSamplingParams:
    """vllm.SamplingParams 0.32: the fields our adapter may set (an unknown keyword is a TypeError)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):  # the checks of vLLM 0.32's _verify_args that apply to us
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError("seed out of int64 range")


def FakeTokensPrompt(*, prompt_token_ids):  # noqa: N802 - a TypedDict in vLLM: calling it gives a dict
    return {"prompt_token_ids": prompt_token_ids}


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: object
    outputs: list[CompletionOutput]
    finished: bool


FAKE_VLLM = types.SimpleNamespace(SamplingParams=FakeSamplingParams, TokensPrompt=FakeTokensPrompt,
                                  __version__="0.32.0")


def fake_logprob(token: int, position: int) -> float:
    return -((token * 13 + position) % 97) / 50.0 - 0.01


class FakeVLLMEngine:
    """A stand-in for ``vllm.LLM``: `script(prompt_ids, seed)` is what the "model" would write."""

    def __init__(self, script, decode=None, logprobs_mode="raw_logprobs"):
        self.script = script
        self.decode = decode
        self.model_config = types.SimpleNamespace(logprobs_mode=logprobs_mode)
        self.events: list = []  # ("generate" | "sleep" | "wake_up" | "reload_weights" | "reset_prefix_cache", ...)
        self.requests: list[tuple[dict, FakeSamplingParams]] = []
        self.loaded: dict[str, torch.Tensor] = {}
        self.sleeping = False
        self._n = 0

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts), "vLLM: one SamplingParams per prompt"
        assert not self.sleeping, "the engine must be woken up before it is used"
        self.events.append(("generate", len(prompts)))
        outs = []
        for prompt, sp in zip(prompts, params):
            assert isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}
            self.requests.append((prompt, sp))
            outs.append(self._run(prompt["prompt_token_ids"], sp))
        return outs

    def _run(self, prompt_ids, sp: FakeSamplingParams):
        planned = list(self.script(list(prompt_ids), sp.seed))
        ids, lps, finish, stop_reason = [], [], None, None
        for pos, tok in enumerate(planned):
            ids.append(tok)
            lps.append({tok: Logprob(fake_logprob(tok, len(prompt_ids) + pos), rank=1 + tok % 5,
                                     decoded_token=None if not sp.detokenize else self.decode([tok]))})
            # engine core (check_stop): EOS unless ignored, stop token ids, then the budget
            if not sp.ignore_eos and tok == FAKE_EOS:
                finish = "stop"
            elif tok in (sp.stop_token_ids or ()):
                finish, stop_reason = "stop", tok
            elif len(ids) >= sp.max_tokens:
                finish = "length"
            # output processor: stop strings in the detokenized text (only when detokenizing)
            if sp.detokenize and sp.stop:
                text = self.decode(ids)
                hit = next((s for s in sp.stop if s in text), None)
                if hit is not None:
                    finish, stop_reason = "stop", hit
            if finish:
                break
        assert finish, "the fake's script ran out before a stop"
        self._n += 1
        text = self.decode(ids) if sp.detokenize else ""
        out = CompletionOutput(0, text, ids, sum(d[t].logprob for d, t in zip(lps, ids)),
                               lps if sp.logprobs is not None else None, finish, stop_reason)
        return RequestOutput(str(self._n), None, list(prompt_ids), None, [out], True)

    def sleep(self, level=1, mode="abort"):
        self.events.append(("sleep", level))
        self.sleeping = True

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tags))
        if tags is None or "kv_cache" in tags:
            self.sleeping = False
        return not self.sleeping

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.events.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights", method
        kwargs = kwargs or {}
        assert kwargs.get("is_checkpoint_format") is True
        self.loaded = {name: t.clone() for name, t in kwargs["weights_iterator"]}
        self.events.append(("reload_weights", len(self.loaded)))
        return [None]
