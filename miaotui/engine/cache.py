"""The engine's KV cache: preallocated rows (one per sequence slot), token at position p stored at index p.

Every row holds one sequence from index 0, so a row's next token is written at its own length and a
finished row is reused by the next request (or the sequence moves to a lower row, `move_rows`). The engine says
where each step writes (`write_index`, (b, q) positions, in rows `write_rows`), which rows attention reads (`rows`,
or None: rows 0..`batch`-1) and up to which index (`kv_positions`); the attention mask, not the cache, decides
what each query sees, so stale entries past a row's length are harmless.

Keys and values can be stored in int8 or fp8 (e4m3) with one scale per (row, head, position): a quarter or half
the bytes of bf16/fp32 at a small quality cost.

>>> import torch
>>> cache = SlotCache(num_layers=1, batch_size=2, max_len=8, kv_dtype="int8")
>>> cache.write_index = torch.tensor([[0, 1], [0, 1]])
>>> k, v = cache.update(torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4), 0)
>>> k.shape
torch.Size([2, 2, 8, 4])
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

KV_DTYPES = ("auto", "int8", "fp8")
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


class SlotLayer(CacheLayerMixin):
    """One transformer layer's keys and values: (B, H_kv, T, D) tensors allocated on first use."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self.cache
        self.dtype, self.device = key_states.dtype, key_states.device
        heads = key_states.shape[1]
        store = {"auto": key_states.dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[c.kv_dtype]

        def buffer(d: int, dtype) -> torch.Tensor:
            t = torch.zeros(c.rows_total, heads, c.max_len + 1, d, dtype=dtype, device=self.device)  # + scratch
            # a Parameter (no gradient): a compiled step then skips its per-call aliasing checks (runner.py)
            t = torch.nn.Parameter(t, requires_grad=False)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(t)
            return t

        self.keys = buffer(key_states.shape[-1], store)
        self.values = buffer(value_states.shape[-1], store)
        if c.kv_dtype != "auto":
            self.scales = (buffer(1, torch.float32), buffer(1, torch.float32))
        self.is_initialized = True

    def _write(self, store: torch.Tensor, scale: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """Write new (b, H, q, D) states at the engine's positions; return the states attention reads.

        Written in place by index assignment, which a compiled step keeps in place (a scatter made it copy the
        whole cache twice per layer and step)."""
        c = self.cache
        at = (c.write_rows, slice(None), c.write_index)  # (b, 1) rows x (b, q) positions, all heads
        if scale is not None:
            new, s = _quantize(new, c.kv_dtype)
            scale[at] = s.transpose(1, 2)  # (b, q, H, 1)
        bytes_only = store.dtype == torch.float8_e4m3fn  # no index assignment for fp8: move its bytes
        target = store.view(torch.uint8) if bytes_only else store
        target[at] = (new.view(torch.uint8) if bytes_only else new).transpose(1, 2)  # (b, q, H, D)
        seen, seen_scale = c.read(store), None if scale is None else c.read(scale)  # (b, H, T, D), (b, H, T, 1)
        return seen if scale is None else seen.to(self.dtype) * seen_scale.to(self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        ks, vs = self.scales if self.scales is not None else (None, None)
        return self._write(self.keys, ks, key_states), self._write(self.values, vs, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.max_len, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always given explicitly; the engine tracks each row's length

    def get_max_length(self) -> int:
        return self.cache.max_len

    def storage_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        tensors = [self.keys, self.values, *(self.scales or ())]
        return sum(t.numel() * t.element_size() for t in tensors)


def _quantize(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization with one scale per (row, head, position): (codes, (b, H, q, 1) scales)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8)
    if kv_dtype == "int8":
        scale = amax / 127.0
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale
    scale = amax / _FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class SlotCache(Cache):
    """A static KV cache of `batch_size` rows x `max_len` positions for every layer.

    kv_dtype: "auto" (the model's dtype), "int8" or "fp8" (e4m3), the latter two with per-position scales.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_dtype: str = "auto"):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        if batch_size < 1 or max_len < 1:
            raise ValueError("a cache needs at least one row and one position")
        self.rows_total, self.max_len, self.kv_dtype = batch_size, max_len, kv_dtype
        self.write_index = torch.zeros(batch_size, 1, dtype=torch.long)  # (b, q) set by the engine each step
        self.write_rows = torch.arange(batch_size)[:, None]  # (b, 1) the cache row of each, set with it
        self.rows: torch.Tensor | None = None  # the rows a step writes (prefill), or None: rows 0..batch-1
        self.batch = batch_size  # decode: the step covers rows 0..batch-1 (set by the engine each step)
        self.kv_positions = torch.arange(max_len)  # (T,) the indices attention reads, set by the engine each step
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def read(self, store: torch.Tensor) -> torch.Tensor:
        """What attention reads of one layer's store (rows_total, H, max_len + 1, D): indices 0..T-1 of the step's
        rows, a view when they are rows 0..batch-1. -> (b, H, T, D)"""
        seen = store.narrow(2, 0, self.kv_positions.shape[0])
        return seen.narrow(0, 0, self.batch) if self.rows is None else seen[self.rows]

    def storage_bytes(self) -> int:
        """Bytes held by the allocated keys, values and scales."""
        return sum(layer.storage_bytes() for layer in self.layers)

    @torch.inference_mode()
    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Copy rows src to rows dst in every layer (keys, values, scales): their sequences now live there."""
        for layer in self.layers:
            if layer.is_initialized:
                for t in (layer.keys, layer.values, *(layer.scales or ())):
                    t[dst] = t[src]
