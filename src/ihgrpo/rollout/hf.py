"""`HFGenerator`: batched, KV-cached sampling with a Hugging Face transformers causal LM.

One call of :meth:`HFGenerator.generate` runs the whole batch in lock step:

* **Prefill.** The prefixes are left-padded into one ``[B, P]`` tensor with a 2-D attention
  mask and explicit ``position_ids`` (``cumsum(mask) - 1``, so every prefix starts at position
  0 whatever its padding), and go through *one* forward pass with a fresh cache and
  ``logits_to_keep=1`` (only the last position's logits are computed: with a 152k vocabulary the
  output layer over all prefix positions would dominate the prefill).
* **Decode.** Then one token per step for all live rows: input ``[b, 1]``, the next column of a
  preallocated mask, ``position_ids`` = each row's own next position. The cache position (the
  column in the cache) is shared by all rows and the model derives it from the cache length.
* **The cache** is a `BufferCache` (``kvcache.py``): keys and values are written into a buffer
  allocated in large chunks and attention reads the filled columns only, so a step costs the
  model's own work, not a copy of the cache (transformers' ``DynamicCache`` concatenates the
  whole cache at every step). Models it does not support (sliding-window or hybrid layers)
  decode with a ``DynamicCache``, with a warning.
* **Sampling** on the last position's logits, upcast to float32 (float64 models stay float64):
  temperature (0 = greedy argmax), top-k, then top-p (nucleus: the smallest set of most likely
  tokens whose probability reaches ``top_p``, on the top-k-renormalised distribution), drawn
  by inverse-CDF sampling (float64 sums) from one ``torch.Generator`` per call. The returned
  log-prob of a token is ``log_softmax(logits / temperature)`` at that token, *before* the
  top-k / top-p truncation (temperature 0 uses temperature 1), which is what the loss needs.
* **Stopping.** A row stops after a token in ``stop_token_ids`` (kept, ``"stop_token"``), after
  the token that completes one of ``stop_strings`` in the decoded continuation (kept,
  ``"stop_string"``), or at its token budget (``"length"``). The model's EOS is *not* a stop
  unless the caller lists it in ``stop_token_ids``.
* **Finished rows leave the batch.** Once enough rows have finished (``compact_fraction``), they
  are removed from the batch, the attention mask and the KV cache (``Cache.batch_select_indices``,
  which moves the kept rows inside the buffer) so that they stop costing compute. Rows are
  independent in every op (attention is per row, the rest is row-wise), so removing or keeping
  them never changes the other rows' results beyond floating-point noise of differently shaped
  matmuls.

Stop strings are matched on an incrementally decoded continuation: each step decodes only the
few tokens since the last complete character (the approach of vLLM's incremental
detokenizer: a token that ends in the middle of a UTF-8 character waits for the next one), and
only the last ``max(len(stop string)) - 1`` characters of earlier text are kept and searched,
together with the new text. Decoding is ``skip_special_tokens=False`` and
``clean_up_tokenization_spaces=False``: the continuation is matched as the model wrote it.

Randomness: ``params.seed`` seeds a fresh generator for the call (same seed, same prefixes, same
params, same device -> the same tokens; bit for bit on CPU). The uniform numbers are drawn on the
CPU and moved to the model's device, so they are the same wherever the model runs. Without it, the generator's own
``torch.Generator`` (seeded from ``seed=`` at construction, else from OS entropy) is used and
advances from call to call. A given prefix is *not* guaranteed the same sample in different batch
compositions (the random stream is shared by the batch); greedy decoding is. With per-request
``seeds``, it is: row i draws its uniforms from a CPU ``torch.Generator`` seeded by ``seeds[i]``
(``T`` float64 numbers, one per step, drawn up front), whatever else is in the batch.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .generator import GenerationOutput, Generator, ProgressReporter, SamplingParams, check_seeds
from .kvcache import BufferCache, buffer_cache_unsupported, is_buffer_cache

__all__ = ["HFGenerator"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# A token whose decoded text still ends in U+FFFD (an unfinished UTF-8 character) waits for the
# next token, at most this many tokens (a UTF-8 character has at most 4 bytes, so valid text is
# complete well before; past that the bytes are invalid and are taken as they decode).
_MAX_PENDING_TOKENS = 6


def _warn_dynamic_cache(reason: str) -> None:
    warnings.warn(f"HFGenerator: {reason}; decoding with transformers' DynamicCache instead (it "
                  "copies the whole cache at every step)", RuntimeWarning, stacklevel=3)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


class _StopStringMatcher:
    """Incremental detokenization of one row's continuation, and stop-string search in its tail."""

    __slots__ = ("tokenizer", "stops", "keep", "ids", "prefix_offset", "read_offset", "tail")

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.keep = max(len(s) for s in stops) - 1  # characters of old text a new match can use
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset]: context for decoding new tokens
        self.read_offset = 0  # ids[:read_offset] are in the text already
        self.tail = ""  # the last `keep` characters of the decoded text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str | None:
        """Add one token; return the stop string the continuation now contains, if any."""
        self.ids.append(token_id)
        # Decode with a little context (tokenizers such as SentencePiece drop or add a leading
        # space when a token is decoded alone) and take the text beyond the context.
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        pending = len(self.ids) - self.read_offset
        if full_text.endswith("\ufffd") and pending < _MAX_PENDING_TOKENS:
            return None  # an unfinished UTF-8 character: wait for its next byte(s)
        if len(full_text) <= len(prefix_text) and pending < _MAX_PENDING_TOKENS:
            return None  # nothing decodable yet (e.g. a token that decodes to "")
        new_text = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not new_text:
            return None
        window = self.tail + new_text
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = window.find(s)
            if i >= 0 and (best is None or i + len(s) < best[0]):
                best = (i + len(s), s)
        self.tail = window[max(0, len(window) - self.keep):] if self.keep else ""
        return None if best is None else best[1]


@dataclass
class _Row:
    """Bookkeeping of one prefix while it is generated."""

    limit: int
    n: int = 0  # tokens generated so far
    finish_reason: str | None = None
    stop_string: str | None = None
    matcher: _StopStringMatcher | None = None


class HFGenerator(Generator):
    """A :class:`Generator` over a Hugging Face transformers causal LM (already loaded).

    Args:
        model: a causal LM (``AutoModelForCausalLM``-like: ``forward(input_ids, attention_mask,
            position_ids, cache / past_key_values, use_cache, logits_to_keep)``). It is put in
            eval mode; ``generate`` also switches it to eval for the call and restores the mode.
        tokenizer: needed only when ``SamplingParams.stop_strings`` is used.
        device: when given, the model is moved there. Generation always runs where the model's
            parameters are at call time (it may be moved after construction).
        dtype: e.g. ``torch.bfloat16`` / ``"bfloat16"`` on a GPU; when given the model is cast
            to it. Default: the model's dtype as loaded (float32 for a model built from a config).
        pad_token_id: the id written into left padding (it is masked out, so any valid id
            works); default: the model config's, else the tokenizer's, else 0.
        seed: seeds the generator's own ``torch.Generator``, used by calls whose params have no
            seed. ``None``: seeded from OS entropy.
        compact_fraction: finished rows are removed from the batch and the KV cache once they
            are at least this fraction of the rows still in it (``0``: as soon as one finishes;
            ``1``: only when all have, i.e. never). Removal moves the rows after the first
            removed one (a copy of their cache), once per removal.
        kv_cache: ``"buffer"`` (default): keys and values in a preallocated `BufferCache`
            (``rollout/kvcache.py``: no per-step copy, attention over the filled part only); a
            model it does not support falls back to ``"dynamic"`` with a warning.
            ``"dynamic"``: transformers' ``DynamicCache`` (a copy of the cache per step).
    """

    progress_every = 8  # `progress` (see Generator), when set, hears every this many decode steps and at the end

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None,
                 pad_token_id: int | None = None, seed: int | None = None,
                 compact_fraction: float = 0.0, kv_cache: str = "buffer"):
        if not 0.0 <= compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in [0, 1], got {compact_fraction}")
        if kv_cache not in ("buffer", "dynamic"):
            raise ValueError(f"kv_cache must be 'buffer' or 'dynamic', got {kv_cache!r}")
        dtype = _resolve_dtype(dtype)
        if device is not None:
            model = model.to(torch.device(device))
        if dtype is not None:
            model = model.to(dtype)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.compact_fraction = compact_fraction

        config = model.config
        try:  # the logits' width; the config's vocab_size where there is no output layer to ask
            self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        except (AttributeError, TypeError):
            self.vocab_size = int(config.get_text_config().vocab_size)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if isinstance(pad_token_id, (list, tuple)):
            pad_token_id = pad_token_id[0] if pad_token_id else None
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the model's "
                             f"vocabulary [0, {self.vocab_size})")

        # Random streams live on the CPU (uniforms are moved to the model's device), so they do
        # not depend on where the model is, or is moved to after construction.
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(int(seed))

        # transformers 5.x calls the cache argument `cache` (`past_key_values` is deprecated and
        # goes in 5.40); 4.x calls it `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        # Why this model decodes with a DynamicCache (None: it uses a BufferCache).
        self._no_buffer_cache = ("kv_cache='dynamic'" if kv_cache == "dynamic"
                                 else buffer_cache_unsupported(model))
        if kv_cache == "buffer" and self._no_buffer_cache is not None:
            _warn_dynamic_cache(self._no_buffer_cache)

    # ------------------------------------------------------------------ public API

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are now: a trainer builds the generator before
        accelerate.prepare moves the model (e.g. to CUDA), so it is read at generate time."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def generate(self, prefixes: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None, *,
                 request_ids: list[str] | None = None,  # noqa: ARG002
                 seeds: list[int] | None = None) -> list[GenerationOutput]:
        """One continuation per prefix (see the module docstring for the exact semantics).

        An empty batch returns ``[]``. Raises ``ValueError`` for an empty prefix, a token id
        outside the model's vocabulary, a ``max_new_tokens`` or ``seeds`` list of the wrong
        length, a ``max_new_tokens`` entry < 1, and ``stop_strings`` without a tokenizer.
        """
        limits = self._validate(prefixes, params, max_new_tokens)
        check_seeds(seeds, len(prefixes))
        if not prefixes:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._generate(prefixes, params, limits, seeds)
        finally:
            if was_training:
                self.model.train()

    # ------------------------------------------------------------------ internals

    def _validate(self, prefixes, params, max_new_tokens) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        n = len(prefixes)
        for i, p in enumerate(prefixes):
            if len(p) == 0:
                raise ValueError(f"prefix {i} is empty: every prefix needs at least one token "
                                 "(the model has nothing to condition on)")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"prefix {i} has token id {bad} outside the model's vocabulary "
                                 f"[0, {self.vocab_size})")
        if max_new_tokens is None:
            limits = [params.max_new_tokens] * n
        else:
            limits = [int(m) for m in max_new_tokens]
            if len(limits) != n:
                raise ValueError(f"max_new_tokens has {len(limits)} entries for {n} prefixes")
            for i, m in enumerate(limits):
                if m < 1:
                    raise ValueError(f"max_new_tokens[{i}] must be >= 1, got {m}")
        if params.stop_strings:
            if self.tokenizer is None:
                raise ValueError("stop_strings need a tokenizer: HFGenerator(model, tokenizer)")
            if any(not s for s in params.stop_strings):
                raise ValueError("stop_strings must not contain the empty string")
        return limits

    def _new_cache(self):
        """A fresh cache for one call: a `BufferCache` where the model supports it."""
        if self._no_buffer_cache is None:
            return BufferCache()
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56: no `config` argument
            return DynamicCache()

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        kwargs = {self._cache_kw: cache}
        if last_only and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    def _generate(self, prefixes, params: SamplingParams, limits: list[int], seeds: list[int] | None = None):
        dev = self.device
        B = len(prefixes)
        lens = [len(p) for p in prefixes]
        P, T = max(lens), max(limits)

        # Left padding; the mask buffer has room for every step (columns P.. are set as we go).
        ids_rows = [[self.pad_token_id] * (P - n) + list(p) for p, n in zip(prefixes, lens)]
        input_ids = torch.tensor(ids_rows, dtype=torch.long, device=dev)
        mask = torch.zeros((B, P + T), dtype=torch.long, device=dev)
        col = torch.arange(P, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
        mask[:, :P] = (col[None, :] >= (P - lens_t)[:, None]).long()
        position_ids = (mask[:, :P].cumsum(-1) - 1).clamp_(min=0)

        stop_ids = frozenset(params.stop_token_ids)
        rows = [_Row(limit=m) for m in limits]
        if params.stop_strings:
            for r in rows:
                r.matcher = _StopStringMatcher(self.tokenizer, tuple(params.stop_strings))

        gen = self._generator
        if params.seed is not None:
            gen = torch.Generator()
            gen.manual_seed(int(params.seed))
        row_u = self._row_uniforms(seeds, T) if seeds is not None and params.temperature > 0 else None

        tok_buf = torch.empty((B, T), dtype=torch.long, device=dev)
        lp_buf = torch.empty((B, T), dtype=torch.float32, device=dev)

        cache = self._new_cache()
        buffered = is_buffer_cache(cache)
        if buffered:
            cache.plan(P, T)
        logits = self._forward(input_ids, mask[:, :P], position_ids, cache, last_only=True)
        if buffered and cache.get_seq_length() != P:  # the model kept its keys elsewhere
            self._no_buffer_cache = "the model did not store its keys and values with cache.update"
            _warn_dynamic_cache(self._no_buffer_cache)
            cache = self._new_cache()
            logits = self._forward(input_ids, mask[:, :P], position_ids, cache, last_only=True)
        live = list(range(B))  # original row index of each batch row
        live_t = torch.arange(B, device=dev)
        next_pos = lens_t.clone()
        report = ProgressReporter(self.progress, rows, T, self.progress_every)

        for t in range(T):
            if row_u is not None:  # each live row's own stream, indexed by its original row
                u = row_u[live_t, t].reshape(-1, 1)
            else:
                u = self._uniforms(logits.shape[0], gen) if params.temperature > 0 else None
            tok, lp = self._sample(logits, params, u)
            tok_buf[live_t, t] = tok
            lp_buf[live_t, t] = lp.float()
            tok_list = tok.tolist()
            n_done = 0
            for i, x in zip(live, tok_list):
                r = rows[i]
                if r.finish_reason is not None:  # finished earlier, not removed yet
                    n_done += 1
                    continue
                r.n += 1
                if x in stop_ids:
                    r.finish_reason = "stop_token"
                elif r.matcher is not None and (s := r.matcher.push(x)) is not None:
                    r.finish_reason, r.stop_string = "stop_string", s
                elif r.n >= r.limit:
                    r.finish_reason = "length"
                if r.finish_reason is not None:
                    n_done += 1
            report.step(t + 1, n_done == len(live))
            if n_done == len(live):
                break
            if n_done and n_done >= self.compact_fraction * len(live):
                keep = [j for j, i in enumerate(live) if rows[i].finish_reason is None]
                keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(keep_t)
                mask = mask.index_select(0, keep_t)
                next_pos = next_pos.index_select(0, keep_t)
                tok = tok.index_select(0, keep_t)
                live = [live[j] for j in keep]
                live_t = live_t.index_select(0, keep_t)
            mask[:, P + t] = 1
            logits = self._forward(tok[:, None], mask[:, :P + t + 1], next_pos[:, None], cache,
                                   last_only=False)
            next_pos += 1

        tok_out = tok_buf.cpu().tolist()
        lp_out = lp_buf.cpu().tolist()
        return [GenerationOutput(token_ids=tok_out[i][:r.n], logprobs=lp_out[i][:r.n],
                                 finish_reason=r.finish_reason, stop_string=r.stop_string)
                for i, r in enumerate(rows)]

    def _uniforms(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """One uniform number per row for this step's draw ([n, 1] float64), from the shared stream
        (a CPU generator: the numbers do not depend on the model's device)."""
        return torch.rand((n, 1), dtype=torch.float64, generator=gen).to(self.device)

    def _row_uniforms(self, seeds: list[int], steps: int) -> torch.Tensor:
        """[B, steps] float64: row i's uniforms for every step, from a CPU generator seeded by
        seeds[i] (CPU, so that a row's stream is the same on every device)."""
        rows = []
        for seed in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(seed))
            rows.append(torch.rand(max(1, steps), dtype=torch.float64, generator=g))
        return torch.stack(rows).to(self.device)

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None):
        """Sample one token per row with the uniforms `u` ([B, 1]; unused when greedy);
        return (token ids, log-probs before truncation)."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        if params.temperature == 0:
            tok = logits.argmax(dim=-1)
            lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None]).squeeze(1)
            return tok, lp
        if params.temperature != 1.0:
            logits = logits / params.temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        V = logprobs.shape[-1]
        top_k = params.top_k if 0 < params.top_k < V else 0
        if top_k:
            # Sample among the k best only: no full-vocabulary mask or sort.
            cand_lp, cand_idx = logprobs.topk(top_k, dim=-1)  # sorted, best first
            if params.top_p < 1.0:
                cand_lp = _nucleus(cand_lp, params.top_p, sorted_desc=True)
            choice = _draw(torch.softmax(cand_lp, dim=-1), u)
            tok = cand_idx.gather(1, choice[:, None]).squeeze(1)
        elif params.top_p < 1.0:
            tok = _draw(torch.softmax(_nucleus(logprobs, params.top_p, sorted_desc=False), dim=-1), u)
        else:
            tok = _draw(logprobs.exp(), u)
        lp = logprobs.gather(1, tok[:, None]).squeeze(1)
        return tok, lp


def _draw(probs: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One sample per row of `probs` ([B, V], non-negative, rows need not sum to 1), with the
    row's uniform number from `u` ([B, 1] or [B], in [0, 1)).

    Inverse-CDF sampling in two levels, with float64 sums: pick a block of `block` tokens by its
    mass, then a token inside it. This draws one uniform number per row and costs about two
    passes over `probs`, where ``torch.multinomial`` takes ~45 ms for [8, 151936] on one CPU
    core. Tokens of probability 0 are never drawn.
    """
    B, V = probs.shape
    C = min(block, V)
    nb = V // C
    mass = probs[:, :nb * C].reshape(B, nb, C).sum(-1, dtype=torch.float64)
    if nb * C < V:
        tail = probs[:, nb * C:].sum(-1, keepdim=True, dtype=torch.float64)
        mass = torch.cat([mass, tail], dim=1)
    cmass = mass.cumsum(-1)
    u = u.to(torch.float64).reshape(B, 1) * cmass[:, -1:]
    # right=True: the first block whose cumulative mass exceeds u (so its own mass is > 0).
    b = torch.searchsorted(cmass, u, right=True).clamp_(max=mass.shape[1] - 1)
    u_in = (u - (cmass.gather(1, b) - mass.gather(1, b))).clamp_(min=0)
    idx = b * C + torch.arange(C, device=probs.device)
    inner = probs.gather(1, idx.clamp(max=V - 1)).to(torch.float64).masked_fill_(idx >= V, 0.0)
    c_in = inner.cumsum(-1)
    # Rounding may put u_in at or past the block's total: keep it inside the last positive token.
    u_in = torch.minimum(u_in, c_in[:, -1:] * (1 - 1e-12))
    j = torch.searchsorted(c_in, u_in, right=True)
    return (b * C + j).squeeze(1)


def _nucleus(logp: torch.Tensor, top_p: float, *, sorted_desc: bool) -> torch.Tensor:
    """Set to -inf every token outside the nucleus of `logp` (log-probs up to a constant).

    The nucleus is the smallest set of most likely tokens whose probability (renormalised over
    `logp`) reaches `top_p`: a token is kept iff the mass of the tokens before it (in
    descending order) is below `top_p`; the most likely token is always kept.
    """
    if sorted_desc:
        sorted_lp, order = logp, None
    else:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_lp, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p
    drop[:, 0] = False
    if order is not None:
        drop = torch.zeros_like(drop).scatter_(1, order, drop)
    return logp.masked_fill(drop, float("-inf"))
