"""The engine thread: owns the scheduler, steps it while there is work, and reports to asyncio consumers.

HTTP handlers run on the event loop; the model runs here, on one thread, so a long decode step never blocks
the server. `submit` is refused with QueueFull when too many requests wait for a cache row; `cancel` aborts a
request (its row is freed before the next step). A failing step fails the requests in it, not the server.

>>> worker = EngineWorker(Engine(miaotui.load("path/to/causal-lm")), max_queue=8)  # doctest: +SKIP
>>> worker.start()  # doctest: +SKIP
>>> job = worker.submit([1, 2, 3], SamplingParams(max_tokens=4), on_event=print)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.engine.scheduler import Request

log = logging.getLogger("miaotui.serve")
SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """More requests wait for a cache row than the server accepts."""


class EngineFailed(Exception):
    """The engine cannot serve any more (a parallel run lost a rank)."""


class Job:
    """One request handed to the worker; `on_event(kind, job, token, delta)` is called from the engine thread.

    kind is "token" (one new token and the text it adds) or "done" (finished: see request.finish_reason).
    """

    def __init__(self, request: Request, on_event: Callable[[str, Job, int | None, str], None]):
        self.request, self.on_event = request, on_event
        self.last_token_time: float | None = None


class EngineWorker:
    """Run an Engine's scheduler on a background thread for many concurrent clients."""

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        max_queue: int = 64,
        observe: Callable[[str, float], None] | None = None,
    ):
        """engine: an Engine, or a function that builds one, called on the engine thread by `start` (see
        `start`: then every torch operation of the server runs on that one thread)."""
        self._build = None if isinstance(engine, Engine) else engine
        self.max_queue = max_queue
        self.observe = observe or (lambda name, value: None)  # metrics: ("ttft"|"itl", seconds), ("tokens", n)
        self._cv = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._cancels: deque[Job] = deque()
        self._abort: str | None = None  # end every request with this error (abort_all)
        self._live: dict[int, Job] = {}  # request id -> job, touched by the engine thread only
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="miaotui-engine", daemon=True)
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.steps = 0
        self._progress = time.monotonic()  # when the engine thread last stepped or waited with nothing to do
        self.failed: str | None = None
        if self._build is None:
            self._adopt(engine)

    def _adopt(self, engine: Engine) -> None:
        self.engine, self.scheduler = engine, engine.scheduler
        # a parallel runner's other ranks wait on rank 0: keep them within their timeout while idle; a failed
        # parallel step leaves the ranks out of step, so it ends this engine (`failed` says why)
        self._idle = getattr(engine.runner, "idle", None)
        timeout = getattr(getattr(engine.runner, "parallel", None), "timeout_s", None)
        self._idle_every = timeout / 4 if self._idle is not None and timeout else None

    # -- called from any thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; given a builder, wait until it has built the engine (raising its error).

        Building on the engine thread matters on CPUs: compiled steps run their kernels on OpenMP thread teams,
        and a second team (the main thread's, from loading or compiling there) makes both spin less and sleep
        more; a compiled ref-llama-16m step took 5.5 ms instead of 1.1 ms on 2 cores when built on another thread.
        """
        if not self._thread.is_alive() and not self._built.is_set():
            self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failed is None

    @property
    def waiting(self) -> int:
        """Requests not yet given a cache row."""
        return len(self._inbox) + len(self.scheduler.waiting)

    def stalled_for(self) -> float:
        """Seconds the engine has had work without stepping (0 while it steps or idles)."""
        busy = self._inbox or self.scheduler.has_work()
        return time.monotonic() - self._progress if busy else 0.0

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise MiaotuiError if this request can never run here (too long, bad token ids)."""
        self.scheduler.check(Request(prompt_ids, params))

    def submit_many(self, items: list[tuple[list[int], SamplingParams]], on_event) -> list[Job]:
        """Queue several requests at once, all or none; QueueFull if they do not fit the queue."""
        jobs = [Job(Request(ids, params, self._on_token), on_event) for ids, params in items]
        if self.failed is not None:
            raise EngineFailed(self.failed)
        with self._cv:
            if self.waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting (limit {self.max_queue})")
            self._inbox.extend(jobs)
            self._cv.notify()
        return jobs

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event) -> Job:
        return self.submit_many([(prompt_ids, params)], on_event)[0]

    def cancel(self, job: Job) -> None:
        with self._cv:
            self._cancels.append(job)
            self._cv.notify()

    def abort_all(self, reason: str) -> None:
        """End every queued and running request now, with `reason` as its error (finish_reason "error")."""
        with self._cv:
            self._abort = reason
            self._cv.notify()

    # -- the engine thread -----------------------------------------------------------------------------
    def _on_token(self, request: Request, token: int, delta: str) -> None:
        job = self._live[request.id]
        now = time.perf_counter()
        if job.last_token_time is None:
            self.observe("ttft", now - request.submitted)
        else:
            self.observe("itl", now - job.last_token_time)
        job.last_token_time = now
        self.observe("tokens", 1)
        job.on_event("token", job, token, delta)

    def _finish(self, job: Job) -> None:
        self._live.pop(job.request.id, None)
        try:
            job.on_event("done", job, None, "")
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("delivering a finished request failed")

    def _run(self) -> None:
        try:
            if self._build is not None:
                self._adopt(self._build())
        except BaseException as e:  # handed to start()
            self._build_error = e
            return
        finally:
            self._built.set()
        while True:
            with self._cv:
                while not (self._stop or self._inbox or self._cancels or self._abort or self.scheduler.has_work()):
                    self._progress = time.monotonic()
                    if not self._cv.wait(timeout=self._idle_every) and self._idle is not None:
                        self._keep_ranks_waiting()
                if self._stop or self.failed is not None:
                    break
                jobs, cancels, abort = list(self._inbox), list(self._cancels), self._abort
                self._inbox.clear()
                self._cancels.clear()
                self._abort = None
            if abort is not None:
                self._end_all(jobs + list(self._live.values()), abort)
                jobs = []
            for job in cancels:
                if job.request.id in self._live:
                    self.scheduler.cancel(job.request)
                    self._finish(job)
                elif not job.request.done:  # still in the inbox snapshot: drop it before it starts
                    job.request.finish_reason = "abort"
            for job in jobs:
                if job.request.done:
                    self._finish(job)
                    continue
                self._live[job.request.id] = job
                try:
                    self.scheduler.submit(job.request)
                except Exception as e:  # refused: fail this request only
                    job.request.finish_reason, job.request.error = "error", str(e)
                    self._finish(job)
            if self.scheduler.has_work():
                self._step()
            self._progress = time.monotonic()
        for job in list(self._live.values()):
            self.scheduler.cancel(job.request)
            self._finish(job)

    def _end_all(self, jobs: list[Job], reason: str) -> None:
        for job in jobs:
            self.scheduler.cancel(job.request)
            job.request.finish_reason, job.request.error = "error", reason
            self._finish(job)

    def _keep_ranks_waiting(self) -> None:
        try:
            self._idle()
        except Exception as e:
            self.failed = f"the parallel engine failed: {e}"
            log.error(self.failed)

    def _step(self) -> None:
        try:
            finished = self.scheduler.step()
            self.steps += 1
        except Exception as e:
            log.exception("an engine step failed; failing the requests in it")
            reason = f"engine step failed: {type(e).__name__}: {e}"
            if self._idle is not None:
                self.failed = reason
            finished = self.scheduler.abort_all(reason)
        for request in finished:
            job = self._live.get(request.id)
            if job is not None:
                self._finish(job)
