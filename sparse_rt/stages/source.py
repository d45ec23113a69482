"""Source stage: batches (x, y) from a DataLoader or from an app, loaded ahead of the step.

A loader that does real work per sample (augmentation, decoding) would block the
event loop if iterated on it, and the step would wait for every batch. Here one
background thread iterates the loader (or collects from the DataLoader's own
workers when it has ``num_workers > 0``) into a bounded queue, so the next
batches are ready when the step asks and the loader's work overlaps with it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")

DEFAULT_PREFETCH = 2
_END = object()  # the loader is exhausted


class _Failure:
    """The loader raised; the consumer re-raises ``error`` itself (same type, message and traceback)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Producer(Generic[T]):
    """The thread's side: iterates the loader while a slot is free and hands each item to the loop.

    It holds no reference to its :class:`Prefetcher`, so dropping the Prefetcher
    (a ``break`` out of ``async for``) runs its ``__del__``, which stops this.
    """

    def __init__(self, loader: Iterable[T], prefetch: int, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()  # bounded by the slots, not by maxsize
        self.finished = asyncio.Event()
        self._loader, self._loop = loader, loop
        self._free, self._stopping = prefetch, False
        # An RLock: stop() may run from __del__, which the garbage collector can call
        # on any thread, this one included, possibly while it holds the lock.
        self._cond = threading.Condition(threading.RLock())
        self.thread = threading.Thread(target=self._run, name="source", daemon=True)

    def release_slot(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _take_slot(self) -> bool:
        """Wait until the queue has room; False once stopped (the consumer is gone)."""
        with self._cond:
            while self._free == 0 and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            self._free -= 1
            return True

    def _run(self) -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = iter(self._loader)
            while self._take_slot():
                try:
                    item = next(iterator)
                except StopIteration:
                    self._hand(_END)
                    return
                self._hand(item)
        except BaseException as exc:  # anything the loader raises is the consumer's to see
            self._hand(_Failure(exc))
        finally:
            iterator = None  # a DataLoader shuts its workers down with its iterator, not with this frame
            self._call(self.finished.set)

    def _hand(self, item: object) -> None:
        if not self._stopping:
            self._call(self.queue.put_nowait, item)

    def _call(self, callback: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to consume
            self.stop()


class Prefetcher(Generic[T]):
    """One pass over ``loader``, up to ``prefetch`` items ahead, as an async iterator.

    Memory stays bounded: the thread starts a new item only when fewer than
    ``prefetch`` wait in the queue, so at most ``prefetch + 1`` items exist at once,
    counting the one the consumer holds. ``prefetch=0`` iterates on the loop as
    sparse-rt always did (no thread), for loaders that must stay on one thread.

    An exception in the loader is raised by ``__anext__`` as the same object.
    ``break``, an exception in the loop body or cancellation stops the thread: it
    finishes the item it is loading, if any, and exits. ``async with`` (or ``aclose``)
    makes that certain even while a reference to the Prefetcher is kept.

    ``last_wait_ms`` is how long the consumer waited for the latest item (0 when it
    was ready), ``total_wait_ms`` the sum over the ``count`` items so far: the time
    the step starved for data.
    """

    def __init__(self, loader: Iterable[T], prefetch: int = DEFAULT_PREFETCH) -> None:
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer of at least 0 (0 = no thread), got {prefetch!r}")
        self.loader, self.prefetch = loader, prefetch
        self.last_wait_ms, self.total_wait_ms, self.count = 0.0, 0.0, 0
        self._producer: _Producer[T] | None = None
        self._iterator: Iterator[T] | None = None  # prefetch=0 only
        self._done = False

    def __aiter__(self) -> "Prefetcher[T]":
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        try:
            return await (self._next_on_loop() if self.prefetch == 0 else self._next_from_thread())
        except BaseException:  # exhausted, failed or cancelled while waiting: no more items will be taken
            self.close()
            raise

    async def _next_from_thread(self) -> T:
        if self._producer is None:
            self._producer = _Producer(self.loader, self.prefetch, asyncio.get_running_loop())
            self._producer.thread.start()
        queue = self._producer.queue
        if not queue.empty():
            await asyncio.sleep(0)  # a batch is ready; the sockets still get a turn between batches
        start = time.perf_counter()
        item = await queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            raise item.error
        self._record(start)
        self._producer.release_slot()
        return item  # type: ignore[return-value]  # anything else in the queue came from the loader

    async def _next_on_loop(self) -> T:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        else:
            await asyncio.sleep(0)  # let the sockets run between batches, even when every batch is ready
        start = time.perf_counter()
        try:
            item = next(self._iterator)
        except StopIteration:
            raise StopAsyncIteration from None
        self._record(start)
        return item

    def _record(self, start: float) -> None:
        self.last_wait_ms = (time.perf_counter() - start) * 1000.0
        self.total_wait_ms += self.last_wait_ms
        self.count += 1

    def close(self) -> None:
        """Stop the thread without waiting for it (it may be inside the loader); safe to call twice."""
        self._done = True
        self._iterator = None
        if self._producer is not None:
            self._producer.stop()

    async def aclose(self) -> None:
        """Stop the thread and wait, without blocking the loop, until it has exited."""
        self.close()
        if self._producer is not None and self._producer.thread.is_alive():
            await self._producer.finished.wait()

    async def __aenter__(self) -> "Prefetcher[T]":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_producer", None) is not None:  # __init__ may have raised before setting it
            self._producer.stop()


def batches(loader: Iterable[Batch], prefetch: int = DEFAULT_PREFETCH) -> Prefetcher[Batch]:
    """The loader's batches, loaded ``prefetch`` ahead in a thread: ``async for x, y in batches(loader)``.

    Keep the returned object to read its wait times (``last_wait_ms`` per batch).
    """
    return Prefetcher(loader, prefetch)
