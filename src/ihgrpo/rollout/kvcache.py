"""A KV cache for batched decoding whose per-step cost is the model's own: `BufferCache`.

transformers' ``DynamicCache`` grows by ``torch.cat`` at every step, copying the whole cache
(all layers, all rows) once per generated token, so generating n tokens copies O(n^2) bytes.
A ``StaticCache`` preallocates, but its layers report their full length to the mask, so every
step attends over all ``max_cache_len`` columns (half of them empty, on average).

`BufferCache` is a ``transformers.Cache`` whose layers write the new keys / values into a
preallocated buffer ``[rows, kv_heads, capacity, head_dim]`` and hand attention the view
``[:rows, :, :filled]``: no copy of the past per step, and attention over the filled columns
only. The buffer grows in large chunks (so memory follows the longest row, and the total copying
is linear in the final length); finished rows leave the batch by moving the kept rows into the
buffer's first rows (``batch_select_indices``, called only when rows finish).

Keys and values are stored in the compute dtype: under autocast the autocast dtype (bf16 keys
and values where the model's projections run in bf16, though e.g. Qwen3's q/k RMSNorm hands
fp32 keys to the cache), else the dtype the model computes them in. Attention under autocast
reads them in that dtype anyway (``scaled_dot_product_attention`` and ``matmul`` autocast), so
this halves the cache without changing what attention computes.

It works with models that use the standard Cache API (``cache.update(k, v, layer_idx)`` in
every attention layer, the mask sized by ``get_mask_sizes``) and only full-attention layers:
Qwen3, Llama, Mistral, Qwen2, ... :func:`buffer_cache_unsupported` says why a model cannot use
it (a hybrid or sliding-window model, a transformers without layered caches), and the caller
falls back to ``DynamicCache``.
"""

from __future__ import annotations

import torch

try:  # layered caches (CacheLayerMixin) exist from transformers 4.56
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - depends on the installed transformers
    Cache = CacheLayerMixin = None

__all__ = ["BufferCache", "buffer_cache_unsupported", "is_buffer_cache"]

# Capacity is added in steps of at least this many positions (and at least half the current
# capacity), so a long generation re-allocates O(log n) times.
GROW_CHUNK = 1024


def is_buffer_cache(cache) -> bool:
    return BufferCache is not None and isinstance(cache, BufferCache)


def buffer_cache_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot decode with a `BufferCache` (``None``: it can)."""
    if CacheLayerMixin is None:
        return "this transformers has no layered Cache API (CacheLayerMixin)"
    try:
        BufferCache()._new_layer()
    except TypeError as e:  # a transformers whose Cache / CacheLayerMixin API differs from ours
        return f"this transformers' Cache API differs ({e})"
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, TypeError):
        text = config
    try:  # transformers' own rule for which cache layer each model layer gets
        from transformers.cache_utils import get_layer_types_and_kwargs

        types = get_layer_types_and_kwargs(text)[0]
    except (ImportError, AttributeError, TypeError):  # older transformers: the same rule by hand
        types = getattr(text, "layer_types", None)
        if types is None:
            if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
                types = ["sliding_attention"]
            elif getattr(text, "attention_chunk_size", None) is not None:
                types = ["chunked_attention"]
            else:
                types = ["full_attention"]
    other = sorted(set(types) - {"full_attention"})
    if other:
        return f"it has {', '.join(other)} layers (only full-attention layers are supported)"
    return None


if CacheLayerMixin is not None:

    class _BufferLayer(CacheLayerMixin):
        """One layer's keys and values in a preallocated, growable buffer."""

        is_sliding = False
        is_compileable = False
        is_croppable = True

        def __init__(self, capacity: int = 0, max_length: int | None = None):
            super().__init__()
            self.capacity = capacity  # positions to allocate at first use (at least the prefill)
            self.max_length = max_length  # never allocate beyond this (None: no bound)
            self.filled = 0  # positions written (the same for every row)
            self.rows = 0  # rows in the batch: the buffers' first `rows` rows
            self.dtype = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            self.dtype = key_states.dtype
            if torch.is_autocast_enabled(self.device.type):
                self.dtype = torch.get_autocast_dtype(self.device.type)
            self.rows = key_states.shape[0]
            cap = max(self.capacity or key_states.shape[-2] + GROW_CHUNK, key_states.shape[-2])
            self.keys = self._alloc(key_states, self.rows, cap)
            self.values = self._alloc(value_states, self.rows, cap)
            self.is_initialized = True

        def _alloc(self, like: torch.Tensor, rows: int, cap: int) -> torch.Tensor:
            return torch.empty((rows, like.shape[1], cap, like.shape[-1]), dtype=self.dtype,
                               device=self.device)

        def _grow(self, need: int) -> None:
            cap = self.keys.shape[-2]
            new = max(need, cap + max(GROW_CHUNK, cap // 2))
            if self.max_length is not None:
                new = max(need, min(new, self.max_length))
            # Only the live rows move to the new buffers (rows that left are not copied).
            keys, values = self._alloc(self.keys, self.rows, new), self._alloc(self.values, self.rows, new)
            keys[:, :, :self.filled] = self.keys[:self.rows, :, :self.filled]
            values[:, :, :self.filled] = self.values[:self.rows, :, :self.filled]
            self.keys, self.values = keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if key_states.shape[0] != self.rows:
                raise ValueError(f"the cache holds {self.rows} rows, the model gave {key_states.shape[0]}")
            start, end = self.filled, self.filled + key_states.shape[-2]
            if end > self.keys.shape[-2]:
                self._grow(end)
            self.keys[:self.rows, :, start:end] = key_states
            self.values[:self.rows, :, start:end] = value_states
            self.filled = end
            return self.keys[:self.rows, :, :end], self.values[:self.rows, :, :end]

        def get_mask_sizes(self, query_length) -> tuple[int, int]:
            if isinstance(query_length, torch.Tensor):  # transformers 4.x passes cache_position
                query_length = query_length.shape[0]
            return self.filled + query_length, 0

        def get_seq_length(self) -> int:
            return self.filled

        def get_max_length(self) -> int:
            return -1  # grows as needed

        @property
        def batch_size(self) -> int:
            return self.rows

        def reset(self) -> None:
            self.keys = self.values = None
            self.is_initialized = False
            self.filled = self.rows = 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of positions to remove")
            self.filled = max(0, self.filled + tokens_to_remove)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the rows `indices` (ascending), moved into the buffers' first rows."""
            if not self.is_initialized:
                return
            idx = indices.to(self.device)
            n = idx.shape[0]
            # Rows before the first one that moves are already in place.
            moved = (idx != torch.arange(n, device=self.device)).nonzero()
            if n and moved.numel():
                first = int(moved[0, 0])
                src = idx[first:]
                for buf in (self.keys, self.values):
                    buf[first:n, :, :self.filled] = buf[src, :, :self.filled]
            self.rows = n

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            raise NotImplementedError("BufferCache does not support beam search")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("BufferCache does not support batch_repeat_interleave")

    class BufferCache(Cache):
        """A ``transformers.Cache`` of `_BufferLayer`s, one per attention layer, created at its
        first ``update``. Size it with :meth:`plan` before the first forward pass (default: the
        prefill's length plus `GROW_CHUNK`, unbounded)."""

        def __init__(self):
            self.capacity = 0
            self.max_length: int | None = None
            super().__init__(layer_class_to_replicate=self._new_layer)

        def _new_layer(self) -> _BufferLayer:
            return _BufferLayer(self.capacity, self.max_length)

        def plan(self, prefill: int, new_tokens: int) -> BufferCache:
            """Allocate the prefill plus up to `GROW_CHUNK` new positions at first, and never more
            than ``prefill + new_tokens`` in all."""
            self.capacity = prefill + min(new_tokens, GROW_CHUNK)
            self.max_length = prefill + new_tokens
            return self

        @property
        def dtype(self) -> torch.dtype | None:
            """The dtype keys and values are stored in (None before the first forward pass)."""
            return self.layers[0].dtype if self.layers else None

else:  # pragma: no cover
    BufferCache = None
