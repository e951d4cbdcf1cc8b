"""The engine's KV cache: a pool of fixed-size blocks of token slots, and a block table per sequence row.

Every layer stores keys and values as (slots + 1, H, D): slot `block * block_size + offset`, plus one scratch
slot that padding writes to. Row r's position p lives in slot `table[r, p // block_size] * block_size +
p % block_size`, so a sequence holds only the blocks its length needs, anywhere in the pool, and blocks holding
the same prefix can be shared by several rows (`miaotui.engine.blocks` hands them out). By default the table is
the identity (row r owns blocks r * width .. (r + 1) * width - 1, `width` blocks covering max_len): every row has
its own max_len positions, and nothing needs to manage blocks.

Before each step the engine says (`prepare`) which rows it covers (or None: rows 0..b-1), the positions it writes
((b, q), padding negative) and the positions attention reads ((T,)); the slots (`write_slots`, `read_slots`) follow
from the table. The attention mask, not the cache, decides what each query sees, so slots past a row's length
(stale, or another sequence's) are harmless.

Keys and values can be stored in int8 or fp8 (e4m3) with one scale per (slot, head): a quarter or half the bytes
of bf16/fp32 at a small quality cost.

>>> import torch
>>> cache = PagedCache(num_layers=1, max_batch=2, max_len=8, kv_dtype="int8", block_size=4)
>>> cache.prepare(torch.arange(2), torch.tensor([[0, 1], [0, 1]]), torch.arange(8))
>>> k, v = cache.update(torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4), 0)
>>> k.shape  # (rows, H, positions read, D)
torch.Size([2, 2, 8, 4])
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

KV_DTYPES = ("auto", "int8", "fp8")
BLOCK_SIZE = 16
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _static(t: torch.Tensor) -> torch.Tensor:
    """A Parameter (no gradient) on t's storage: a compiled step then skips its per-call aliasing checks."""
    t = torch.nn.Parameter(t, requires_grad=False)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


class PagedLayer(CacheLayerMixin):
    """One transformer layer's keys and values: (slots + 1, H, D) tensors allocated on first use."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: PagedCache):
        super().__init__()
        self.cache = cache
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = None
        self.token_bytes = 0  # bytes one token's keys, values and scales take in this layer (known once seen)

    def _measure(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads, quantized = key_states.shape[1], self.cache.kv_dtype != "auto"
        size = 1 if quantized else key_states.element_size()
        self.token_bytes = heads * (key_states.shape[-1] + value_states.shape[-1]) * size + 8 * heads * quantized

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self.cache
        self.dtype, self.device = key_states.dtype, key_states.device
        heads = key_states.shape[1]
        store = {"auto": key_states.dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[c.kv_dtype]

        def buffer(d: int, dtype) -> torch.Tensor:
            return _static(torch.zeros(c.num_slots + 1, heads, d, dtype=dtype, device=self.device))  # + scratch

        self.keys = buffer(key_states.shape[-1], store)
        self.values = buffer(value_states.shape[-1], store)
        if c.kv_dtype != "auto":
            self.scales = (buffer(1, torch.float32), buffer(1, torch.float32))
        self._measure(key_states, value_states)
        self.is_initialized = True

    def _write(self, store: torch.Tensor, scale: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """Write new (b, H, q, D) states into their slots; return the states attention reads, (b, H, T, D).

        Written in place by index assignment, which a compiled step keeps in place; the read is a gather by the
        slots, which a compiled step fuses into attention's reductions."""
        c = self.cache
        new = new.transpose(1, 2)  # (b, q, H, D)
        if scale is not None:
            new, s = _quantize(new, c.kv_dtype)
            scale[c.write_slots] = s  # (b, q, H, 1)
        bytes_only = store.dtype == torch.float8_e4m3fn  # no index assignment for fp8: move its bytes
        target = store.view(torch.uint8) if bytes_only else store
        target[c.write_slots] = new.view(torch.uint8) if bytes_only else new
        seen = store[c.read_slots].transpose(1, 2)  # (b, H, T, D)
        if scale is None:
            return seen
        return seen.to(self.dtype) * scale[c.read_slots].transpose(1, 2).to(self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.cache.probing:  # a sizing pass: note the shapes, store nothing
            self._measure(key_states, value_states)
            return key_states, value_states
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
    """Symmetric quantization with one scale per (row, position, head): (codes, (b, q, H, 1) scales)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8)
    if kv_dtype == "int8":
        scale = amax / 127.0
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale
    scale = amax / _FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class PagedCache(Cache):
    """A KV cache of `num_blocks` blocks of `block_size` slots for every layer, addressed per row by `table`.

    max_batch: rows (sequences in a step); max_len: positions per row. num_blocks: default max_batch x width
    (width = blocks covering max_len) with the identity table; fewer blocks than that need a block manager.
    kv_dtype: "auto" (the model's dtype), "int8" or "fp8" (e4m3), the latter two with per-slot scales.
    """

    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        max_len: int,
        kv_dtype: str = "auto",
        block_size: int = BLOCK_SIZE,
        num_blocks: int | None = None,
        device: torch.device | str = "cpu",
    ):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        if max_batch < 1 or max_len < 1 or block_size < 1:
            raise ValueError("a cache needs at least one row, one position and blocks of one slot")
        self.max_batch, self.max_len, self.kv_dtype, self.block_size = max_batch, max_len, kv_dtype, block_size
        self.width = -(-max_len // block_size)  # blocks a full-length row needs
        identity = num_blocks is None
        self.num_blocks = max_batch * self.width if identity else num_blocks
        if self.num_blocks < self.width:
            raise ValueError(f"{self.num_blocks} blocks cannot hold one sequence of {max_len} positions")
        table = torch.arange(max_batch * self.width) if identity else torch.zeros(max_batch * self.width)
        self.table = _static(table.long().view(max_batch, self.width).to(device))  # (B, width) block ids
        self.version = 0  # counts changes to the table
        self.probing = False  # a sizing pass (`token_bytes`) runs through without storing
        self.rows: torch.Tensor | None = None  # (b,) the rows a step covers, or None: rows 0..batch-1
        self.batch = max_batch
        self.write_slots = torch.zeros(max_batch, 1, dtype=torch.long)  # (b, q) set by `prepare`
        self.read_slots = torch.zeros(max_batch, 1, dtype=torch.long)  # (b, T)
        super().__init__(layers=[PagedLayer(self) for _ in range(num_layers)])

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def set_blocks(self, row: int, blocks: list[int], start: int = 0) -> None:
        """Give row `row` the blocks `blocks` from its block index `start` on."""
        if blocks:
            self.table[row, start : start + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            self.version += 1

    def move_row(self, src: int, dst: int) -> None:
        """The sequence of row src now lives in row dst (its blocks stay where they are)."""
        self.table[dst] = self.table[src]
        self.version += 1

    def _slots(self, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Slots of positions pos ((b, q), or (T,) for every row) of the rows of table (b, width)."""
        bs = self.block_size
        if pos.dim() == 1:
            return table[:, pos // bs] * bs + pos % bs  # (b, T)
        return table.gather(1, (pos // bs).clamp(min=0)) * bs + pos % bs  # (b, q)

    def prepare(self, rows: torch.Tensor | None, qpos: torch.Tensor, kv_positions: torch.Tensor) -> None:
        """Set a step's slots: rows (b,) or None (rows 0..b-1), queries at positions qpos (b, q) (negative:
        padding, written to the scratch slot), attention reading positions kv_positions (T,)."""
        b = qpos.shape[0]
        table = self.table[:b] if rows is None else self.table[rows]  # (b, width)
        self.batch = b
        self.write_slots = torch.where(qpos < 0, self.num_slots, self._slots(table, qpos))  # (b, q)
        self.read_slots = self._slots(table, kv_positions)  # (b, T)

    def token_bytes(self) -> int:
        """Bytes one token's keys and values take over all layers (after a step or a sizing pass)."""
        return sum(layer.token_bytes for layer in self.layers)

    def storage_bytes(self) -> int:
        """Bytes held by the allocated keys, values and scales."""
        return sum(layer.storage_bytes() for layer in self.layers)
