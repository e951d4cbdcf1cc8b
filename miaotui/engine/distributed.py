"""The engine on several processes: rank 0 drives, every other rank runs the same steps in lockstep.

Each rank holds a `ParallelRunner`: a `ModelRunner` whose model is its tensor-parallel shard of its pipeline
stage's blocks (`miaotui.engine.parallel`, `miaotui.engine.stages`). Rank 0 is the only one with a scheduler:
every `extend` or `decode` it is asked for is first broadcast to the other ranks (one int64 header; a prefill adds
one payload), which wait in `follow()` and run the same step, so collectives always meet. With pipeline stages the
last stage sends the logits back to rank 0. Anything that drives a `ModelRunner` (the scheduler, `Engine`, a
server) drives a parallel one from rank 0 unchanged; `idle()` keeps waiting ranks within the timeout when rank 0
has nothing to do, and `close()` stops them.

Ranks are numbered stage-major: rank = stage * tp + tp_rank.

>>> Topology(rank=3, tp=2, pp=2).stage, Topology(rank=3, tp=2, pp=2).tp_rank
(1, 1)
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from miaotui.engine.parallel import ParallelConfig, RowParallel, shard_tensor_parallel_
from miaotui.engine.runner import ModelRunner
from miaotui.engine.stages import ReceiveInput, SendOutput, split_stages_
from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel

OP_STOP, OP_EXTEND, OP_DECODE, OP_IDLE, OP_TABLE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Topology:
    """Where one rank sits in a run of `tp` x `pp` ranks."""

    rank: int
    tp: int
    pp: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def last_stage_lead(self) -> int:
        """The rank that returns the logits to rank 0: tp rank 0 of the last stage."""
        return (self.pp - 1) * self.tp


def split_model_(lm: LoadedModel, topo: Topology) -> None:
    """Keep this rank's part of the model, in place: its stage's blocks, its tensor-parallel shard of them."""
    if topo.tp > 1:
        shard_tensor_parallel_(lm.model, lm.arch, topo.tp_rank, topo.tp)
    if topo.pp > 1:
        prev_rank = topo.rank - topo.tp if topo.stage > 0 else None
        next_rank = topo.rank + topo.tp if topo.stage < topo.pp - 1 else None
        split_stages_(lm.model, lm.arch, topo.stage, topo.pp, prev_rank, next_rank)


class ParallelRunner(ModelRunner):
    """One rank's runner: the model split in place, steps announced by rank 0 (see the module doc).

    Every decode step covers all rows (`varying_batch` False), so all ranks run the one compiled size.

    lm: the model already split for this rank (`split_model_`) and on its device. The default process group
    must be initialised (see `miaotui.engine.launch.start_parallel`); the run's own groups, with the step
    timeout `parallel.timeout_s`, are created here by every rank together.
    """

    varying_batch = False

    def __init__(self, lm: LoadedModel, topo: Topology, parallel: ParallelConfig, **runner_options):
        self.topo, self.parallel, self._live = topo, parallel, False
        self.supervisor = None  # rank 0 started by start_parallel: its child ranks (launch.Supervisor)
        timeout = datetime.timedelta(seconds=parallel.timeout_s)
        world = list(range(topo.tp * topo.pp))
        self.group = dist.new_group(world, timeout=timeout)
        stages = [dist.new_group(world[s * topo.tp : (s + 1) * topo.tp], timeout=timeout) for s in range(topo.pp)]
        for module in lm.model.modules():
            if isinstance(module, RowParallel):
                module.group = stages[topo.stage]
            elif isinstance(module, ReceiveInput | SendOutput):
                module.group = self.group
        super().__init__(lm, **runner_options)
        self._header = torch.zeros(1 + 2 * self.max_batch, dtype=torch.long, device=self.device)  # (1 + 2B,)
        self._sent_table = self.cache.version
        self._live = True  # from here on rank 0 announces steps (compile warm-up runs on every rank alike)

    def _agree_blocks(self, blocks: int) -> int:
        """The fewest blocks any rank can hold (pipeline stages hold different layers): every rank's table
        addresses the same blocks."""
        count = torch.tensor([blocks], dtype=torch.long, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        return int(count)

    def _announce_table(self) -> None:
        """Rank 0: send the block table to the other ranks if it changed since they last had it."""
        if self.cache.version != self._sent_table:
            self._announce(OP_TABLE, self.cache.table.flatten())
            self._sent_table = self.cache.version

    # -- rank 0 ------------------------------------------------------------------------------------------
    def _announce(self, op: int, payload: torch.Tensor | None = None, decode: tuple | None = None) -> None:
        if self.topo.rank != 0 or not self._live:
            return
        header = self._header
        header.zero_()
        header[0] = op
        if decode is not None:
            tokens, pos = decode
            header[1 : 1 + self.max_batch], header[1 + self.max_batch :] = tokens, pos
        if payload is not None:
            header[1] = len(payload)
        dist.broadcast(header, 0, group=self.group)
        if payload is not None:
            dist.broadcast(payload.to(self.device), 0, group=self.group)

    def extend(self, rows, tokens, starts=None, keep=None):
        starts = starts or [0] * len(tokens)
        self.check_fits(tokens, starts)
        if self.topo.rank == 0 and self._live:
            lengths = [len(t) for t in tokens]
            flat = [len(tokens), 0 if keep is None else keep, *rows.tolist(), *starts, *lengths]
            with self._guard():
                self._announce_table()
                self._announce(OP_EXTEND, torch.tensor(flat + [x for t in tokens for x in t], dtype=torch.long))
        with self._guard():
            return self._final(super().extend(rows, tokens, starts, keep))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = len(tokens)  # every rank steps all rows (one compiled size): pad to them
        pad = self.max_batch - n
        tokens, pos = torch.cat([tokens, tokens.new_zeros(pad)]), torch.cat([pos, pos.new_full((pad,), -1)])
        with self._guard():
            if self._live and self.topo.rank == 0:
                self._announce_table()
            self._announce(OP_DECODE, decode=(tokens, pos))
            return self._final(super().decode(tokens, pos))[:n]

    @contextlib.contextmanager
    def _guard(self):
        """On rank 0, turn a broken or timed-out collective into a MiaotuiError naming the failed rank."""
        try:
            yield
        except RuntimeError as e:  # torch.distributed's errors (DistError) are RuntimeErrors
            if self.topo.rank != 0 or not self._live:
                raise
            why = self.supervisor.describe(e) if self.supervisor is not None else f"the parallel run failed: {e}"
            self.close(announce=False)
            raise MiaotuiError(why) from e

    def idle(self) -> None:
        """Rank 0 has no work: let the waiting ranks start a new wait (call more often than the timeout)."""
        with self._guard():
            self._announce(OP_IDLE)

    def close(self, announce: bool = True) -> None:
        """Rank 0: tell the other ranks to stop (unless `announce` is False, after a failure). Every rank then
        leaves the process group."""
        if announce and self._live and self.topo.rank == 0:
            self._announce(OP_STOP)
        self._live = False
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.supervisor is not None:
            self.supervisor.stop(wait_s=10.0 if announce else 1.0)

    def _final(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits on rank 0: computed there, or received from the last pipeline stage."""
        lead = self.topo.last_stage_lead
        if self.topo.pp == 1 or not self._live or self.topo.rank not in (0, lead):
            return logits
        if self.topo.rank == lead:
            dist.send(logits.float().contiguous(), dst=0, group=self.group)
            return logits
        received = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # (b, [keep,] V)
        dist.recv(received, src=lead, group=self.group)
        return received.to(logits.dtype)

    # -- every other rank ------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Run the steps rank 0 announces until it says stop (ranks other than 0)."""
        if self.topo.rank == 0:
            raise MiaotuiError("rank 0 drives the run; follow() is for the other ranks")
        b = self.max_batch
        while True:
            header = self._header
            dist.broadcast(header, 0, group=self.group)
            op = int(header[0])
            if op == OP_STOP:
                return
            if op == OP_DECODE:
                self.decode(header[1 : 1 + b].clone(), header[1 + b :].clone())
            elif op == OP_TABLE:
                payload = torch.empty(int(header[1]), dtype=torch.long, device=self.device)
                dist.broadcast(payload, 0, group=self.group)
                self.cache.table.copy_(payload.view_as(self.cache.table))
            elif op == OP_EXTEND:
                payload = torch.empty(int(header[1]), dtype=torch.long, device=self.device)
                dist.broadcast(payload, 0, group=self.group)
                self.extend(*_unpack_extend(payload.tolist()))


def _unpack_extend(flat: list[int]):
    """(rows, tokens, starts, keep) from an announced prefill."""
    n, keep = flat[0], flat[1] or None
    rows, starts, lengths = flat[2 : 2 + n], flat[2 + n : 2 + 2 * n], flat[2 + 2 * n : 2 + 3 * n]
    tokens, at = [], 2 + 3 * n
    for length in lengths:
        tokens.append(flat[at : at + length])
        at += length
    return torch.tensor(rows), tokens, starts, keep
