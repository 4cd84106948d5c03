"""Scheduling inferences: bounded in-flight work, a bounded queue, optional dynamic batching.

Runs on the server's event loop; model execution happens on `max_concurrency` worker threads,
each with its own runtime instance of the release (see models.InstancePool). A request waits in
the queue for a free slot; when `max_queue` requests already wait, it is refused at once
(503): memory never grows with load. With batching, requests for a model whose inputs have a
dynamic batch dimension are stacked (up to `max_batch` samples, waiting at most `max_delay_ms`
for more after the first) and run as one call; each request gets its own rows back. A request
whose inference takes under `inline_ms` (measured when the release was loaded) runs on the
loop's own thread when a slot is free: for a model that small, handing it to a worker thread
and back costs more than the inference.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from edgekit.serve.metrics import Metrics
from edgekit.serve.models import ModelEntry, Release
from edgekit.serve.protocol import ProtocolError


class QueueFull(ProtocolError):
    def __init__(self, limit: int):
        super().__init__(503, f"the server's queue is full ({limit} requests waiting); retry later")


@dataclass
class _Item:
    release: Release
    arrays: Dict[str, np.ndarray]
    raw: bool
    n: int
    future: "asyncio.Future"

    @property
    def key(self) -> Tuple:
        return (id(self.release), self.raw) + tuple((a.dtype.str, a.shape[1:]) for a in self.arrays.values())


class Engine:
    def __init__(self, *, max_concurrency: int, max_queue: int, max_batch: int, max_delay_ms: float,
                 metrics: Metrics, inline_ms: float = 0.0):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.inline_ms = inline_ms
        self.metrics = metrics
        self.waiting = 0
        self.in_flight = 0
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="edgekit-infer")
        self._slots: Optional[asyncio.Semaphore] = None
        self._batchers: Dict[str, "_Batcher"] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def start(self) -> None:
        """Create the loop-bound parts (on the running loop: Python 3.9 binds them at creation)."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max_concurrency)

    async def stop(self) -> None:
        for b in self._batchers.values():
            b.task.cancel()
        self._pool.shutdown(wait=True)

    # -- accounting ---------------------------------------------------------
    def check_capacity(self) -> None:
        """Refuse (503) before a body is even read when the queue is already full."""
        if self._slots.locked() and self.waiting >= self.max_queue + (self.max_batch if self.max_batch > 1 else 0):
            raise QueueFull(self.max_queue)

    def _admit(self, batching: bool) -> None:
        """A request waits only when every slot is busy (a batch being filled may hold up to
        max_batch requests besides the queue); beyond that it is refused at once."""
        if batching:
            full = self.waiting >= self.max_queue + self.max_batch
        else:
            full = self._slots.locked() and self.waiting >= self.max_queue
        if full:
            raise QueueFull(self.max_queue)
        self.waiting += 1
        self.metrics.queue_length.set(self.waiting)

    def _leave_queue(self, n: int) -> None:
        self.waiting -= n
        self.metrics.queue_length.set(self.waiting)

    # -- running ------------------------------------------------------------
    async def infer(self, entry: ModelEntry, release: Release, arrays: Dict[str, np.ndarray],
                    raw: bool) -> Dict[str, np.ndarray]:
        n = int(next(iter(arrays.values())).shape[0])
        if self.max_batch > 1 and release.batchable and n < self.max_batch:
            b = self._batchers.get(entry.name)
            if b is None:
                b = self._batchers[entry.name] = _Batcher(self, entry.name)
            self._admit(True)
            fut = self._loop.create_future()
            b.queue.put_nowait(_Item(release, arrays, raw, n, fut))
            return await fut
        if n * release.sample_ms <= self.inline_ms and not self._slots.locked():
            # a tiny model: run it on the loop's thread (a worker thread hand-off costs more than it)
            async with self._slots:
                self.in_flight += 1
                try:
                    return self._execute(release, [(arrays, raw, n)])[0]
                finally:
                    self.in_flight -= 1
        self._admit(False)
        queued = True
        try:
            async with self._slots:
                self._leave_queue(1)
                queued = False
                outs = await self._run(release, [(arrays, raw, n)])
                return outs[0]
        finally:
            if queued:
                self._leave_queue(1)

    async def _run(self, release: Release, groups: List[Tuple[Dict[str, np.ndarray], bool, int]]
                   ) -> List[Dict[str, np.ndarray]]:
        """Run on a worker thread (the caller holds a slot)."""
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            return await self._loop.run_in_executor(self._pool, self._execute, release, groups)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    def _execute(self, release: Release, groups) -> List[Dict[str, np.ndarray]]:
        m = release.pool.acquire()
        try:
            out = []
            for arrays, raw, n in groups:
                t0 = time.perf_counter()
                out.append(m.run(arrays, raw=raw))
                self.metrics.inference_latency.observe(time.perf_counter() - t0, model=release.name)
                self.metrics.batch_size.observe(n, model=release.name)
            return out
        finally:
            release.pool.release(m)


class _Batcher:
    """One per model: collects queued requests into batches and runs them as slots free up."""

    def __init__(self, engine: Engine, name: str):
        self.engine = engine
        self.name = name
        self.queue: "asyncio.Queue[_Item]" = asyncio.Queue()
        self._carry: Optional[_Item] = None
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _next(self, timeout: Optional[float]) -> Optional[_Item]:
        if self._carry is not None:
            it, self._carry = self._carry, None
            return it
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout is not None and timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def _fill(self, items: List[_Item], n: int, item: _Item) -> Tuple[int, bool]:
        if n + item.n > self.engine.max_batch:
            self._carry = item
            return n, False
        items.append(item)
        return n + item.n, True

    async def _loop(self) -> None:
        eng = self.engine
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            items, n = [first], first.n
            deadline = loop.time() + eng.max_delay
            while n < eng.max_batch:
                it = await self._next(deadline - loop.time())
                if it is None:
                    break
                n, ok = self._fill(items, n, it)
                if not ok:
                    break
            await eng._slots.acquire()
            while n < eng.max_batch and self._carry is None:  # whatever arrived while waiting for a slot
                it = await self._next(0)
                if it is None:
                    break
                n, _ = self._fill(items, n, it)
            eng._leave_queue(len(items))
            loop.create_task(self._run(items))

    async def _run(self, items: List[_Item]) -> None:
        try:
            groups: Dict[Tuple, List[_Item]] = {}
            for it in items:
                if not it.future.cancelled():
                    groups.setdefault(it.key, []).append(it)
            for members in groups.values():
                rel = members[0].release
                names = list(members[0].arrays)
                stacked = {k: (members[0].arrays[k] if len(members) == 1 else
                               np.concatenate([m.arrays[k] for m in members])) for k in names}
                total = sum(m.n for m in members)
                try:
                    out = (await self.engine._run(rel, [(stacked, members[0].raw, total)]))[0]
                except Exception as e:  # handed to each request of the batch (500 with the message)
                    for m in members:
                        if not m.future.done():
                            m.future.set_exception(e)
                    continue
                start = 0
                for m in members:
                    if not m.future.done():
                        m.future.set_result({k: v[start:start + m.n] for k, v in out.items()})
                    start += m.n
        finally:
            self.engine._slots.release()
