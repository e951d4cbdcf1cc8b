"""Start the ranks of a tensor/pipeline-parallel engine, on one machine or under `torchrun`.

On one machine `start_parallel` makes this process rank 0 and starts the other tp x pp - 1 ranks as child
processes (one per GPU, or per group of CPU cores with gloo), rendezvousing on a free local port. Under `torchrun`
(RANK and WORLD_SIZE set) every process calls it; rank 0 gets its runner back, the others serve steps inside it and
exit the process when rank 0 closes. Each rank loads the model from `source` itself, on the CPU, keeps its part
and moves it to its device.

Failures end the run with an error, never a hang: the ranks must meet within `ParallelConfig.start_timeout_s`
(loading included) and every collective of a step completes within `timeout_s`; a rank that dies breaks its
peers' connections at their next collective; and on rank 0 a watcher thread stops the process if a child dies and
rank 0 has not failed on its own within a grace period (a child dying while the others load, for instance).

>>> runner = start_parallel("path/to/causal-lm", ParallelConfig(tp=2), max_len=128)  # doctest: +SKIP
>>> runner.extend(torch.tensor([0]), [[1, 2, 3]]).shape  # (rows, vocab)  # doctest: +SKIP
torch.Size([1, 8192])
>>> runner.close()  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from miaotui.checkpoint import load_model
from miaotui.engine.distributed import ParallelRunner, Topology, split_model_
from miaotui.engine.parallel import ParallelConfig, check_tensor_parallel
from miaotui.errors import MiaotuiError
from miaotui.loading import resolve_device

GRACE_S = 15.0  # after a child dies, how long rank 0 may take to fail by itself before the watcher stops it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise MiaotuiError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", local_rank)


def _join(rank: int, world: int, init_method: str, spec: dict, lm=None) -> ParallelRunner:
    """Load (unless given) and split this rank's part of the model, meet the other ranks, build the runner."""
    parallel: ParallelConfig = spec["parallel"]
    device = resolve_device(spec["load_options"].get("device", "cpu"))
    backend = parallel.backend if parallel.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    rank_device = _rank_device(device, int(os.environ.get("LOCAL_RANK", rank)))
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    if lm is None:
        lm = load_model(spec["source"], **{**spec["load_options"], "device": "cpu"})
    topo = Topology(rank, parallel.tp, parallel.pp)
    split_model_(lm, topo)
    lm.model.to(rank_device)
    dist.init_process_group(  # waits for the slowest rank to load: the start-up timeout
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=parallel.start_timeout_s),
    )
    return ParallelRunner(lm, topo, parallel, **spec["runner_options"])


def _child(rank: int, world: int, init_method: str, spec: dict) -> None:
    """A child process: one rank that follows rank 0 until it stops; any failure exits non-zero."""
    torch.set_num_threads(spec["threads"])
    runner = None
    try:
        runner = _join(rank, world, init_method, spec)
        runner.follow()
        runner.close()
    except BaseException as e:  # one line on stderr; the parent reports which rank failed
        print(f"miaotui: rank {rank}: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)


class Supervisor:
    """Rank 0's view of its child ranks: exit codes, and a watcher that never lets a dead child go unnoticed."""

    def __init__(self, children: list, grace_s: float):
        self.children, self.grace_s, self.done = children, grace_s, threading.Event()
        threading.Thread(target=self._watch, name="miaotui-rank-watcher", daemon=True).start()

    def dead(self) -> list[str]:
        return [f"rank {i + 1} exited with code {c.exitcode}" for i, c in enumerate(self.children) if c.exitcode]

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            if self.dead():
                if self.done.wait(self.grace_s):
                    return
                print(f"miaotui: error: {'; '.join(self.dead())}; stopping the run", file=sys.stderr, flush=True)
                os._exit(1)

    def describe(self, error: BaseException) -> str:
        deadline = time.monotonic() + 2.0
        while not self.dead() and time.monotonic() < deadline:  # a dying child's exit code comes in shortly
            time.sleep(0.1)
        why = "; ".join(self.dead()) or "a collective failed or timed out"
        return f"the parallel run failed: {why} ({type(error).__name__}: {str(error).splitlines()[0][:200]})"

    def stop(self, wait_s: float = 10.0) -> None:
        """Wait up to `wait_s` for each child to exit, then kill it."""
        self.done.set()
        for child in self.children:
            child.join(timeout=wait_s)
            if child.is_alive():
                child.kill()
                child.join()


def start_parallel(
    source: str | os.PathLike,
    parallel: ParallelConfig,
    *,
    load_options: dict | None = None,
    **runner_options,
) -> ParallelRunner:
    """Start every rank of a tp x pp run and return rank 0's runner (this process).

    load_options: as for `miaotui.load` (dtype, device: "cpu" or "cuda"); runner_options: as for ModelRunner
    (max_batch, max_len, compile, kv_dtype). On CPU each local rank gets cores / ranks threads.
    """
    load_options = dict(load_options or {})
    world = parallel.world_size
    spec = {
        "source": str(source),
        "parallel": parallel,
        "load_options": load_options,
        "runner_options": runner_options,
    }
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: every rank runs this
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world:
            raise MiaotuiError(f"torchrun started {size} processes; tp {parallel.tp} x pp {parallel.pp} needs {world}")
        runner = _join(rank, world, "env://", spec)
        if rank != 0:
            runner.follow()
            runner.close()
            sys.exit(0)
        return runner
    lm = load_model(source, **{**load_options, "device": "cpu"})
    check_tensor_parallel(lm.model, lm.arch, parallel.tp)  # refuse before starting anything
    local = world if resolve_device(load_options.get("device", "cpu")).type == "cpu" else 1
    spec["threads"] = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(spec["threads"])
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child, args=(r, world, init_method, spec), daemon=True) for r in range(1, world)
    ]
    for child in children:
        child.start()
    supervisor = Supervisor(children, min(GRACE_S, parallel.timeout_s))
    try:
        runner = _join(0, world, init_method, spec, lm=lm)
    except BaseException as e:
        why = supervisor.describe(e)
        supervisor.stop(wait_s=1.0)
        raise MiaotuiError(why) from e
    runner.supervisor = supervisor
    return runner
