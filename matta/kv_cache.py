"""The KV caches a forward continues from: the list cache (per layer keys and values, concatenated
each step) and :class:`StaticKVCache`, preallocated buffers of row slots that a decode step writes
in place and that rows join and leave one row at a time. Pure torch."""

from __future__ import annotations

import torch

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each (B, n_head, T_cached, head_dim)."""


class StaticKVCache:
    """Preallocated per-layer key/value buffers of row slots (slots, n_kv, capacity, head_dim): the
    first ``batch_size`` slots are the live rows, row i filled up to ``lengths[i]``; ``length`` is the
    longest row's.

    A decode step writes each row's new key and value in place at that row's own length and
    attends to views of the buffers, so it copies nothing: the list cache (:data:`KVCache`)
    re-concatenates the whole cache every step, memory traffic that grows with batch x context.
    Rows come and go without touching the others: :meth:`write_rows` copies new rows into slots,
    :meth:`move_row` copies one row's filled part to another slot, each costing that row's
    length, never the batch's. When a row or a step would not fit, the buffers grow
    geometrically (amortised O(1) per token).

    A cache made by :meth:`from_list` from a (left-padded) forward holds every row at the common
    length; an attention mask marks its padding.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot_lengths: torch.Tensor,
                 batch_size: int) -> None:
        self.keys, self.values = keys, values
        self.slot_lengths = slot_lengths  # (slots,) long: filled positions per slot
        self.batch_size = batch_size
        self.length = int(self.lengths.max()) if batch_size else 0

    @property
    def lengths(self) -> torch.Tensor:
        """(batch_size,) filled positions of the live rows (a view: a step advances it in place)."""
        return self.slot_lengths[: self.batch_size]

    @classmethod
    def empty_like(cls, cache: KVCache, slots: int, capacity: int) -> StaticKVCache:
        """An empty cache (no live row) of ``slots`` rows x ``capacity`` positions, shaped like ``cache``'s layers.
        Zeroed, not just allocated: a decode step multiplies masked positions' values by a zero
        probability, and uninitialised memory may hold NaN (0 x NaN is NaN)."""
        k = cache[0][0]
        return cls.zeros(len(cache), k.shape[1], k.shape[3], slots, capacity, dtype=k.dtype, device=k.device)

    @classmethod
    def zeros(cls, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int, *, dtype: torch.dtype,
              device: torch.device | str) -> StaticKVCache:
        """An empty cache (no live row) of ``slots`` rows x ``capacity`` positions for a model of
        ``layers`` layers with ``kv_heads`` key/value heads of ``head_dim``, zeroed (see :meth:`empty_like`)."""
        keys = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        values = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        return cls(keys, values, torch.zeros(slots, dtype=torch.long, device=device), 0)

    @classmethod
    def from_list(cls, cache: KVCache, capacity: int) -> StaticKVCache:
        """Copy a list cache into buffers of at least ``capacity`` positions."""
        batch, length = cache[0][0].shape[0], cache[0][0].shape[2]
        static = cls.empty_like(cache, batch, max(capacity, length))
        static.write_rows(cache, torch.full((batch,), length, dtype=torch.long, device=cache[0][0].device))
        return static

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    def as_list(self) -> KVCache:
        """Views of the live rows' filled part (up to the longest row), per layer (keys, values)."""
        B, L = self.batch_size, self.length
        return [(k[:B, :, :L], v[:B, :, :L]) for k, v in zip(self.keys, self.values, strict=True)]

    def reserve(self, length: int, limit: int, slots: int = 0) -> None:
        """Make room for ``length`` positions (growing to at most ``limit``) and ``slots`` rows."""
        if length <= self.capacity and slots <= self.slots:
            return
        capacity = min(limit, max(length, 2 * self.capacity)) if length > self.capacity else self.capacity
        grown = StaticKVCache.empty_like(self.as_list(), max(slots, 2 * self.slots) if slots > self.slots else self.slots,
                                         capacity)
        for new, old in zip(grown.keys + grown.values, self.keys + self.values, strict=True):
            new[: self.slots, :, : self.capacity] = old  # geometric growth: a rare whole copy
        grown.slot_lengths[: self.slots] = self.slot_lengths
        self.keys, self.values, self.slot_lengths = grown.keys, grown.values, grown.slot_lengths

    def write_rows(self, cache: KVCache, lengths: torch.Tensor, left_padded: bool = False) -> None:
        """Append live rows: row j of ``cache`` (per layer (b, n_kv, T, hs)) becomes row
        ``batch_size + j`` holding ``lengths[j]`` positions, its first ones (its last ones when
        ``left_padded``: a left-padded prefill's real tokens end at T)."""
        b, T = cache[0][0].shape[0], cache[0][0].shape[2]
        B = self.batch_size
        self.reserve(T, T, B + b)
        if not left_padded or bool((lengths == T).all()):
            for layer, (k, v) in enumerate(cache):
                self.keys[layer][B : B + b, :, :T] = k
                self.values[layer][B : B + b, :, :T] = v
        else:
            for j, n in enumerate(lengths.tolist()):  # strip each row's padding: one row's copy each
                for layer, (k, v) in enumerate(cache):
                    self.keys[layer][B + j, :, :n] = k[j, :, T - n :]
                    self.values[layer][B + j, :, :n] = v[j, :, T - n :]
        self.slot_lengths[B : B + b] = lengths
        self.set_batch_size(B + b)

    def move_row(self, source: int, target: int) -> None:
        """Copy slot ``source``'s filled part into slot ``target`` (any slots, live or not)."""
        n = int(self.slot_lengths[source])
        for buffer in self.keys + self.values:
            buffer[target, :, :n] = buffer[source, :, :n]
        self.slot_lengths[target] = n

    def rewind(self, length: int) -> None:
        """Every live row back to ``length`` positions (a benchmark timing the same step again)."""
        self.slot_lengths[: self.batch_size] = length
        self.length = length

    def set_batch_size(self, batch_size: int) -> None:
        """The first ``batch_size`` slots are the live rows (the caller moved them there)."""
        if batch_size > self.slots:
            raise ValueError(f"{batch_size} live rows do not fit {self.slots} slots")
        self.batch_size = batch_size
        self.length = int(self.lengths.max()) if batch_size else 0
