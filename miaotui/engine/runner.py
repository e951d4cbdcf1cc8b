"""Run a Hugging Face decoder on the engine's cache: `extend` (prefill, verification) and a compiled `decode` step.

The runner owns the model, a `PagedCache` (blocks of token slots; a block table row per sequence, `max_batch`
rows of up to `max_len` positions) and the attention masks. A query at position p of a row sees positions 0..p of
its row (and, for sliding-window layers, only the last `window` of them). Masks are built here and handed to the model
ready-made, so any family whose attention reads a 4-D mask (or a dict of them per layer type) runs unchanged.

>>> import miaotui
>>> runner = ModelRunner(miaotui.load("path/to/causal-lm"), max_batch=2, max_len=64)  # doctest: +SKIP
>>> logits = runner.extend(torch.tensor([0]), [[1, 2, 3]])  # doctest: +SKIP
>>> logits.shape  # (rows, vocab)  # doctest: +SKIP
torch.Size([1, 8192])
"""

from __future__ import annotations

import contextlib
import sys
import time
import types

import torch

from miaotui.arch import CAUSAL_LM
from miaotui.engine.attention import use_gqa_sdpa
from miaotui.engine.cache import BLOCK_SIZE, PagedCache
from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel
from miaotui.modules import GEMV_ROWS
from miaotui.quantize import PackedLinear

SPAN_STEP = 64  # attention reads the cache up to the furthest position of the step, rounded up to this


def _num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise MiaotuiError(f"cannot tell the number of layers of {type(config).__name__}")


def _warm(step):
    """`step` (a warmed-up compiled decode step) with Dynamo checking only the guards that tell its cached graphs
    apart, which saves their evaluation on every call. Should a guard fail anyway (a graph break whose Python
    state changed after warm-up), Dynamo raises instead of recompiling; the step is then run again with every
    guard checked, from then on. Running it again is safe: a decode step writes the same cache entries from
    the same inputs."""
    trusted = True

    def run(*args):
        nonlocal trusted
        if trusted:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return step(*args)
            except RuntimeError as e:
                if "Recompilation triggered" not in str(e):
                    raise
                trusted = False
                with _cpu_gemv():  # this call compiles again
                    return step(*args)
        return step(*args)

    return run


def _hold_as_parameters(model: torch.nn.Module) -> None:
    """Hold the model's tensors that are not parameters (buffers, packed layers' runtime tensors) as
    `nn.Parameter` objects on the same storage, without gradients, where they are: buffers stay buffers, so
    saving, moving and counting see no change. The KV cache allocates its tensors as such already.

    Dynamo checks every tensor a compiled function reads that is not a Parameter against all the others for
    aliasing, on every call: with the 280 int4 tensors and 40 cache tensors of a 0.4B model, Dynamo's entry took
    0.72 ms a step, and 0.07 ms with them held as Parameters (they never alias one another).
    """

    def held(t):
        return torch.nn.Parameter(t, requires_grad=False) if type(t) is torch.Tensor else t

    for module in model.modules():
        for name, t in module._buffers.items():
            module._buffers[name] = held(t)
        if isinstance(module, PackedLinear):  # e.g. int4's scales and zeros in the kernel's layout
            for name, t in list(vars(module).items()):
                object.__setattr__(module, name, held(t))


@contextlib.contextmanager
def _cpu_gemv():
    """While a CPU graph compiles, let inductor's `decompose_mm_pass` (switched on by the compile options) turn
    every matmul of up to GEMV_ROWS rows into a multiply-sum, whatever its width (inductor's default stops at
    2048 columns and one row). Without that pass in this torch, nothing changes."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass
    except ImportError:  # pragma: no cover - torch without the pass
        yield
        return
    names = ("cpu_max_first_dimension_decomposition", "cpu_max_other_dimension_decomposition")
    saved = {n: getattr(mm_pass, n) for n in names if hasattr(mm_pass, n)}
    limits = dict(zip(names, (GEMV_ROWS, sys.maxsize), strict=True))
    for n in saved:
        setattr(mm_pass, n, limits[n])
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(mm_pass, n, v)


def _batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a compiled decode step is compiled for: powers of two below max_batch, and max_batch. A
    step runs the smallest that covers its busy rows, so a few requests do not pay for a full batch."""
    return [b for b in (1 << i for i in range(max_batch.bit_length())) if b < max_batch] + [max_batch]


MASK_KINDS = {"full_attention": "full", "sliding_attention": "window", "chunked_attention": "chunk"}


def _mask_kinds(config) -> dict[str | None, tuple[str, int | None]]:
    """{layer type: (mask kind, window or chunk size)} from the config's `layer_types`; the key None when every
    layer takes one mask (no layer types: full attention, or a window on every layer when `sliding_window` is
    set). Layer types the engine cannot mask (linear attention, state-space layers) are refused."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return {None: ("window", window) if window else ("full", None)}
    kinds = {}
    for layer_type in set(types):
        kind = MASK_KINDS.get(layer_type)
        size = {"window": window, "chunk": getattr(config, "attention_chunk_size", None), "full": None}.get(kind)
        if kind is None or (kind != "full" and not size):
            raise MiaotuiError(f"the engine cannot run {layer_type!r} layers (it runs {', '.join(MASK_KINDS)})")
        kinds[layer_type] = (kind, size)
    return kinds


class ModelRunner:
    """A decoder model with a preallocated KV cache, stepping rows independently.

    max_batch: cache rows (sequences in flight); max_len: positions per row (prompt + new tokens).
    compile: compile the decode step (`torch.compile`; on CUDA with CUDA graphs, "reduce-overhead"), for every
    size in `batch_sizes` (powers of two below max_batch and max_batch; only max_batch unless `varying_batch`).
    kv_dtype: "auto", "int8" or "fp8" (see `miaotui.engine.cache`).
    kv_cache_memory: bytes for the KV cache's blocks (of `block_size` positions); default max_batch x max_len
    positions, each row owning its own (the identity block table). A budget gives as many blocks as fit (at least
    one max_len sequence's), which a block manager (`miaotui.engine.blocks`) shares out.
    """

    varying_batch = True

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch: int = 1,
        max_len: int | None = None,
        compile: bool = False,
        kv_dtype: str = "auto",
        kv_cache_memory: int | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        if lm.kind != CAUSAL_LM:
            raise MiaotuiError(f"generation needs a causal LM; {lm.source} is an {lm.kind}")
        context = lm.context_length
        max_len = max_len or min(context or 2048, 2048)
        if context is not None and max_len > context:
            raise MiaotuiError(f"max_len {max_len} exceeds the model's context of {context} tokens")
        if max_batch < 1 or max_len < 2:
            raise MiaotuiError("the engine needs max_batch >= 1 and max_len >= 2")
        self.lm, self.model, self.config = lm, lm.model.eval(), lm.model.config
        use_gqa_sdpa(self.model)
        self.device, self.max_batch, self.max_len = lm.device, max_batch, max_len
        self.mask_kinds = _mask_kinds(self.config.get_text_config())
        self.mask_dtype = next(self.model.parameters()).dtype
        self._positions = torch.arange(max_len, device=self.device)  # (T,)
        self._spans: dict[int, torch.Tensor] = {}
        self._kv = self._positions  # (T,) the positions attention reads this step
        self._row_ids = torch.arange(max_batch, device=self.device)  # (B,)
        layers = _num_layers(self.config)
        self.cache = PagedCache(layers, max_batch, max_len, kv_dtype, block_size, device=self.device)
        if kv_cache_memory is not None:
            blocks = self._agree_blocks(kv_cache_memory // (self._token_bytes() * block_size))
            if blocks < self.cache.width:
                raise MiaotuiError(
                    f"a KV cache of {kv_cache_memory / 2**20:.1f} MiB holds {blocks * block_size} tokens: too few "
                    f"for one sequence of {max_len} positions (lower max_len or give it more memory)"
                )
            self.cache = PagedCache(layers, max_batch, max_len, kv_dtype, block_size, blocks, self.device)
        self._decode = self._decode_eager
        self.compile_seconds: float | None = None
        # the batch sizes a compiled step is compiled for
        self.batch_sizes = _batch_sizes(max_batch) if self.varying_batch else [max_batch]
        if compile:
            self._compile()

    @torch.inference_mode()
    def _token_bytes(self) -> int:
        """Bytes one token's keys and values take in the cache, from a one-token pass that stores nothing."""
        self.cache.probing, self._kv = True, self._positions[:1]
        try:
            zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self._forward(zero, zero, 1)
        finally:
            self.cache.probing, self._kv = False, self._positions
        return self.cache.token_bytes()

    def _agree_blocks(self, blocks: int) -> int:
        """The number of cache blocks every process of the run can hold (one process: its own)."""
        return blocks

    # -- masks -------------------------------------------------------------------------------------------
    def _read_up_to(self, furthest: int | None) -> None:
        """Let attention read cache indices 0..T-1 this step: T covers position `furthest`, rounded up to
        SPAN_STEP; None (positions only on the GPU, where reading them would wait for it): all of them.

        Spans are marked as dynamic sizes, so the compiled CPU step does not recompile as they grow; the CUDA
        step (CUDA graphs, fixed shapes) always reads all positions.
        """
        if furthest is None:
            self._kv = self._positions  # (max_len,)
            return
        t = min(self.max_len, -(-(furthest + 1) // SPAN_STEP) * SPAN_STEP)
        span = self._spans.get(t)
        if span is None:
            span = self._spans[t] = self._positions[:t]  # (T,)
            torch._dynamo.mark_dynamic(span, 0, min=2, max=self.max_len)
        self._kv = span

    def _masks(self, qpos: torch.Tensor):
        """Additive masks for queries at positions qpos (b, q): (b, 1, q, T), or a dict per layer type."""
        kv = self._kv  # (T,)
        seen = kv[None, None, :] <= qpos[:, :, None]  # (b, q, T)
        seen[..., 0] |= qpos < 0  # a padding query sees index 0 only, so no row of its softmax is empty
        masks = {}
        for layer_type, (kind, size) in self.mask_kinds.items():
            allowed = seen
            if kind == "window":
                allowed = seen & (qpos[:, :, None] - kv[None, None, :] < size)
            elif kind == "chunk":  # a query sees the earlier positions of its own chunk
                allowed = seen & (qpos[:, :, None].clamp(min=0) // size == kv[None, None, :] // size)
                allowed[..., 0] |= qpos < 0
            masks[layer_type] = self._additive(allowed)
        return masks.get(None, masks)  # one mask for every layer, or one per layer type

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.mask_dtype, device=self.device)
        low = torch.full((), torch.finfo(self.mask_dtype).min, dtype=self.mask_dtype, device=self.device)
        return torch.where(allowed, zero, low)[:, None]  # (b, 1, q, T)

    # -- forward passes ------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, qpos: torch.Tensor, keep: int) -> torch.Tensor:
        """ids, qpos: (b, q), negative positions are padding. Returns logits of the last `keep` queries."""
        self.cache.prepare(self.cache.rows, qpos, self._kv)
        out = self.model(
            input_ids=ids,
            position_ids=qpos.clamp(min=0),
            attention_mask=self._masks(qpos),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits  # (b, keep, V)

    @torch.inference_mode()
    def extend(
        self, rows: torch.Tensor, tokens: list[list[int]], starts: list[int] | None = None, keep: int | None = None
    ):
        """Append token lists to the given rows (prefill, or speculative verification).

        rows: (b,) cache rows; tokens[i] goes to row rows[i] at positions starts[i].. (0 when starts is None).
        Returns the logits of each row's last token, (b, V), or of its last `keep` tokens, (b, keep, V).
        """
        starts = starts or [0] * len(tokens)
        width = max(len(t) for t in tokens)
        self.check_fits(tokens, starts)
        ids = torch.zeros(len(tokens), width, dtype=torch.long)
        qpos = torch.full((len(tokens), width), -1, dtype=torch.long)
        for i, (t, s) in enumerate(zip(tokens, starts, strict=True)):  # left padding: last tokens align
            ids[i, width - len(t) :] = torch.tensor(t)
            qpos[i, width - len(t) :] = torch.arange(s, s + len(t))
        self._read_up_to(max(s + len(t) for t, s in zip(tokens, starts, strict=True)) - 1)
        rows = rows.to(self.device)
        self.cache.rows = None if len(rows) == self.max_batch and bool((rows == self._row_ids).all()) else rows
        try:
            logits = self._forward(ids.to(self.device), qpos.to(self.device), keep or 1)
        finally:
            self.cache.rows = None
        return logits[:, -1] if keep is None else logits

    def check_fits(self, tokens: list[list[int]], starts: list[int]) -> None:
        """Raise a MiaotuiError unless each token list is non-empty and fits its row from its start."""
        for t, s in zip(tokens, starts, strict=True):
            if not t or s + len(t) > self.max_len:
                raise MiaotuiError(f"{s + len(t)} tokens do not fit the engine's {self.max_len} positions")

    def _decode_eager(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache.rows = None
        return self._forward(tokens[:, None], pos[:, None], 1)[:, -1]  # (B, V)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..n-1: tokens, pos (n,) on the device, n <= max_batch -> logits (n, V), a
        fresh tensor. Rows at a negative position (free, or busy with something else) write nothing. A compiled
        step runs the smallest compiled batch size >= n (`batch_sizes`): rows n.. up to it are such rows."""
        n = len(tokens)
        size = next((b for b in self.batch_sizes if b >= n), None) if self.compile_seconds is not None else n
        if size is None or n < 1:
            raise MiaotuiError(f"a decode step covers 1..{self.max_batch} rows, not {n}")
        # always fresh tensors made here (inference tensors): the same kind of input at every call, no recompile
        tokens, pos = torch.cat([tokens, tokens.new_zeros(size - n)]), torch.cat([pos, pos.new_full((size - n,), -1)])
        self._read_up_to(max(0, int(pos.max())) if pos.device.type == "cpu" else None)  # no device sync for it
        return self._decode(tokens, pos)[:n].clone()

    def _compile(self) -> None:
        """Compile the decode step once for the cache's shapes, and warm it up (timed).

        CUDA: CUDA graphs ("reduce-overhead"). CPU: inductor with
        - inductor's freezing passes, which rewrite int8 weight-only matmuls (a 0.4B `w8` step: 21 -> 14 ms); they
          do not fold the weights in as constants (Dynamo inlines the modules, so the weights stay graph inputs,
          read at every step: weights changed in place are seen);
        - batch-1 and -2 matmuls as fused GEMV reductions (`_cpu_gemv`): on ref-llama-16m a step went from 4.4 to
          2.5 ms in fp32 and from 4.0 to 2.3 ms in bf16, on a 0.4B Llama from 87 to 27 ms in fp32;
        - a C++ wrapper around the kernels instead of Python, and, once warm, Dynamo's guards checked only where
          the cached graphs differ (the step's batch shape never changes): 5-7 % on ref-llama-16m;
        - no size and stride assertions on the graph's inputs at every call: the runner makes every input itself
          (the cache, tokens, positions) and the weights keep their shapes (a model changed in any other way
          needs a new engine, as the skipped guards already assume). ref-llama-16m, two engines alternating:
          `generate` 1,013 -> 1,049 tok/s in bf16, 1,539 -> 1,681 in `w4`, 1,287 -> 1,358 in `w8`.
        """
        cpu = self.device.type == "cpu"
        options = {
            "freezing": True,
            "cpp_wrapper": True,
            "size_asserts": False,
            "post_grad_fusion_options": {"decompose_mm_pass": {}},
        }
        how = {"options": options} if cpu else {"mode": "reduce-overhead"}
        # Dynamo keeps compiled graphs per code object and stops compiling one after 8 graphs: each runner
        # steps through its own copy of the code, so any number of engines in a process all run compiled.
        step = types.FunctionType(ModelRunner._decode_eager.__code__.replace(), globals(), "decode_step")
        compiled = torch.compile(types.MethodType(step, self), fullgraph=False, dynamic=False, **how)
        self._decode = compiled
        t0 = time.perf_counter()
        tokens = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self._decode_eager(tokens, tokens)  # allocate the cache and the packed layers' layouts before tracing
        _hold_as_parameters(self.model)
        self.compile_seconds = 0.0  # from here on `decode` runs the compiled step
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * len(self.batch_sizes))  # a graph per batch size
        with _cpu_gemv() if cpu else contextlib.nullcontext():
            for size in self.batch_sizes:
                for _ in range(3):  # the first calls trace, compile and record the graph of this size
                    self.decode(tokens[:size], tokens[:size])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0
        if cpu:
            self._decode = _warm(compiled)

    def kv_cache_bytes(self) -> int:
        return self.cache.storage_bytes()

    def close(self) -> None:
        """Release what the runner holds beyond memory: nothing here; a parallel runner stops its ranks."""
