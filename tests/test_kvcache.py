"""BufferCache (ihgrpo.rollout.kvcache) and HFGenerator's decoding with it, CPU only.

The reference is HFGenerator's earlier path, transformers' ``DynamicCache``
(``kv_cache="dynamic"``): the buffered path must give the same tokens and the same log-probs,
bit for bit, greedy and seeded sampling, while rows leave the batch and the buffer grows, on
tiny random Qwen3 and Llama models; and under CPU bf16 autocast the cache holds bf16.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from ihgrpo.rollout import kvcache  # noqa: E402
from ihgrpo.rollout.generator import SamplingParams  # noqa: E402
from ihgrpo.rollout.hf import HFGenerator  # noqa: E402
from ihgrpo.rollout.kvcache import BufferCache, buffer_cache_unsupported  # noqa: E402

VOCAB = 256
PREFIXES = [
    [3, 17, 99, 4, 250, 8, 61],
    [12],
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 1, 2],
    [77, 78, 79],
    [5, 6],
]
# Different budgets: rows finish (and leave the batch) at different steps.
BUDGETS = [40, 6, 23, 1, 31]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(arch: str, seed: int = 0, **extra) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, head_dim=16,
                  max_position_embeddings=512, **extra)
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # sharper next-token distributions than the random init's
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request) -> torch.nn.Module:
    return _tiny(request.param)


def _run(model, kv_cache: str, params: SamplingParams, seeds=None, **kw):
    """Generate with `kv_cache`; return the outputs and the caches the calls used."""
    gen = HFGenerator(model, kv_cache=kv_cache, **kw)
    caches = []
    new_cache = gen._new_cache
    gen._new_cache = lambda: caches.append(new_cache()) or caches[-1]
    outs = gen.generate(PREFIXES, params, max_new_tokens=BUDGETS, seeds=seeds)
    return outs, caches


def _same(a, b) -> None:
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]  # bit for bit
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]


PARAMS = [
    SamplingParams(temperature=0.0, max_new_tokens=40),
    SamplingParams(temperature=1.0, max_new_tokens=40, seed=3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=40, seed=4),
]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "t1", "topk-topp"])
@pytest.mark.parametrize("compact_fraction", [0.0, 0.5])
def test_buffer_equals_dynamic(model, params, compact_fraction):
    old, old_caches = _run(model, "dynamic", params, compact_fraction=compact_fraction)
    new, new_caches = _run(model, "buffer", params, compact_fraction=compact_fraction)
    assert isinstance(old_caches[0], DynamicCache) and isinstance(new_caches[0], BufferCache)
    _same(old, new)
    assert [len(o.token_ids) for o in new] == BUDGETS
    # Rows left the batch: the cache ends with fewer rows than it started with.
    assert new_caches[0].layers[0].rows < len(PREFIXES)


def test_buffer_equals_dynamic_with_per_request_seeds(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=40)
    seeds = [11, 12, 13, 14, 15]
    _same(_run(model, "dynamic", params, seeds)[0], _run(model, "buffer", params, seeds)[0])


def test_buffer_equals_dynamic_across_growth_and_stops(model, monkeypatch):
    """A tiny growth chunk: the buffer is re-allocated many times while rows stop (on a stop
    token) and leave; still the same tokens and log-probs."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    full, _ = _run(model, "dynamic", greedy)
    stop = full[0].token_ids[9]  # row 0 stops at its 10th token (others may stop earlier)
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=7, stop_token_ids=(stop,))
    old, _ = _run(model, "dynamic", params)
    monkeypatch.setattr(kvcache, "GROW_CHUNK", 3)
    new, caches = _run(model, "buffer", params)
    _same(old, new)
    layer = caches[0].layers[0]
    longest = max(len(p) for p in PREFIXES) + max(len(o.token_ids) for o in new)
    # Grown in steps, never beyond prefix + budget.
    assert layer.filled <= longest <= layer.keys.shape[2] <= max(len(p) for p in PREFIXES) + 40


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_autocast_bf16_cache_holds_bf16(attn):
    model = _tiny("qwen3", seed=2)
    model.config._attn_implementation = attn
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old, old_caches = _run(model, "dynamic", params)
        new, new_caches = _run(model, "buffer", params)
    # Qwen3's q/k RMSNorm hands fp32 keys to the cache: DynamicCache keeps fp32, ours bf16 ...
    assert old_caches[0].layers[0].keys.dtype == torch.float32
    assert new_caches[0].dtype == torch.bfloat16
    for layer in new_caches[0].layers:
        assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    # ... and attention reads keys and values in bf16 under autocast anyway: the same samples.
    _same(old, new)
    # Without autocast, the model's own dtype.
    assert _run(model, "buffer", params)[1][0].dtype == torch.float32


def test_bf16_model_matches_dynamic():
    model = _tiny("llama", seed=3).to(torch.bfloat16)
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=6)
    old, _ = _run(model, "dynamic", params)
    new, caches = _run(model, "buffer", params)
    _same(old, new)
    assert caches[0].dtype == torch.bfloat16


# ------------------------------------------------------------------ the cache itself


def _kv(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def test_cache_matches_concatenation_and_writes_in_place(monkeypatch):
    monkeypatch.setattr(kvcache, "GROW_CHUNK", 4)
    ours = BufferCache().plan(5, 13)
    ref = DynamicCache()
    k, v = _kv(4, 5, 0)
    assert ours.get_mask_sizes(5, 0) == (5, 0)
    for step in range(13):
        ko, vo = ours.update(k, v, 0)
        kr, vr = ref.update(k, v, 0)
        assert torch.equal(ko, kr) and torch.equal(vo, vr)
        layer = ours.layers[0]
        # A view of the buffer, over the filled positions only.
        assert ko.data_ptr() == layer.keys.data_ptr() and ko.shape[2] == layer.filled
        assert ours.get_seq_length() == ref.get_seq_length() == layer.filled
        assert ours.get_mask_sizes(1, 0) == (layer.filled + 1, 0)
        if step == 4:  # rows 0 and 2 leave the batch
            keep = torch.tensor([1, 3])
            ours.batch_select_indices(keep)
            ref.batch_select_indices(keep)
        if step == 9:  # row 0 (of the two left) leaves
            ours.batch_select_indices(torch.tensor([1]))
            ref.batch_select_indices(torch.tensor([1]))
        k, v = _kv(ref.layers[0].keys.shape[0], 1, step + 1)
    assert layer.keys.shape[2] == 5 + 13  # grew to the planned maximum, no further


def test_no_copy_between_growths():
    """Decoding within the allocated capacity writes into the same buffer: no per-step copy."""
    cache = BufferCache().plan(3, 10)
    cache.update(*_kv(2, 3, 0), 0)
    ptr = cache.layers[0].keys.data_ptr()
    for step in range(10):
        cache.update(*_kv(2, 1, step), 0)
        assert cache.layers[0].keys.data_ptr() == ptr
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].keys.data_ptr() == ptr  # rows move inside the buffer


# ------------------------------------------------------------------ fallback


def test_sliding_window_model_falls_back_with_warning():
    model = _tiny("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding_attention" in buffer_cache_unsupported(model)
    with pytest.warns(RuntimeWarning, match="sliding_attention.*DynamicCache"):
        gen = HFGenerator(model)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at construction
        out = gen.generate(PREFIXES, params)
    _same(out, HFGenerator(model, kv_cache="dynamic").generate(PREFIXES, params))


class _KeysElsewhereLM(torch.nn.Module):
    """A wrapper standing for a model that does not keep its keys in the cache it is given
    (unless it is transformers' DynamicCache): it re-reads its whole input every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.seen = None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0):
        if isinstance(cache, DynamicCache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False)


def test_model_not_using_cache_update_falls_back():
    inner = _tiny("llama", seed=4)
    gen = HFGenerator(_KeysElsewhereLM(inner))  # the config allows a BufferCache
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    with pytest.warns(RuntimeWarning, match="did not store its keys"):
        out = gen.generate(PREFIXES, params)
    _same(out, HFGenerator(inner, kv_cache="dynamic").generate(PREFIXES, params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once
        gen.generate(PREFIXES[:1], params)


def test_bad_kv_cache_option(model):
    with pytest.raises(ValueError, match="kv_cache must be 'buffer' or 'dynamic'"):
        HFGenerator(model, kv_cache="static")
