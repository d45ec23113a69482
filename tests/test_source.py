"""The source stage's prefetching: bounded, overlapping, in order, failing loudly and never leaving a thread."""
from __future__ import annotations

import asyncio
import threading
from typing import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sparse_rt.stages.source import Prefetcher, batches

JOIN_S = 5.0  # a bound on waiting for the thread, never reached when it stops as it should


class LoaderBroke(RuntimeError):
    """A loader's own exception type, to check that the consumer sees exactly it."""


class Recording:
    """A loader that counts what it produced and remembers the thread it ran on."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n  # None: endless
        self.produced = 0
        self.thread: threading.Thread | None = None
        self.started = threading.Event()

    def __iter__(self) -> Iterator[int]:
        self.thread = threading.current_thread()
        self.started.set()
        while self.n is None or self.produced < self.n:
            self.produced += 1
            yield self.produced - 1


def _stopped(thread: threading.Thread | None) -> bool:
    assert thread is not None, "the loader never ran"
    thread.join(JOIN_S)
    return not thread.is_alive() and thread not in threading.enumerate()


async def test_items_in_order_and_dataloader_batches_unchanged() -> None:
    assert [i async for i in Prefetcher(range(50))] == list(range(50))
    x = torch.arange(40.0).view(20, 2)
    loader = DataLoader(TensorDataset(x, torch.arange(20)), batch_size=3)
    got = [(bx, by) async for bx, by in batches(loader)]
    expected = list(loader)
    assert len(got) == len(expected) == 7
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))


@pytest.mark.parametrize("prefetch", [1, 2, 4])
async def test_queue_is_bounded_while_the_consumer_holds_a_batch(prefetch: int) -> None:
    full, overfull = threading.Event(), threading.Event()
    taken = 0
    most_ahead = 0

    def loader() -> Iterator[int]:
        nonlocal most_ahead
        for i in range(3 * prefetch + 5):
            # Started item i: i + 1 produced. The consumer counts a batch just after the
            # slot it frees, so it may lag by one: the design's bound is prefetch ahead.
            most_ahead = max(most_ahead, i + 1 - taken)
            if i == prefetch:  # the one held plus prefetch queued
                full.set()
            if i == prefetch + 1:  # only checked before the consumer takes its second batch
                overfull.set()
            yield i

    source = Prefetcher(loader(), prefetch)
    first = await source.__anext__()
    taken = 1
    assert first == 0
    assert await asyncio.to_thread(full.wait, JOIN_S)
    # The producer now waits for a slot; give it every chance to overstep before checking it did not.
    assert not await asyncio.to_thread(overfull.wait, 0.3)
    rest = []
    async for i in source:
        rest.append(i)
        taken += 1
    assert rest == list(range(1, 3 * prefetch + 5))
    assert most_ahead <= prefetch + 1


@pytest.mark.parametrize("prefetch", [1, 2])
async def test_next_batch_is_produced_while_the_consumer_holds_this_one(prefetch: int) -> None:
    n = 6
    produced = [threading.Event() for _ in range(n)]

    def loader() -> Iterator[int]:
        for i in range(n):
            produced[i].set()
            yield i

    async for i in Prefetcher(loader(), prefetch):
        if i + 1 < n:  # still holding batch i, not yet asking for the next one
            assert await asyncio.to_thread(produced[i + 1].wait, JOIN_S), f"batch {i + 1} not loaded during step {i}"


async def test_loader_exception_reaches_the_consumer_as_itself() -> None:
    loader = Recording()
    original = LoaderBroke("sample 3 is corrupt: expected 3x32x32, got 3x31x32")

    def failing() -> Iterator[int]:
        for i in loader:
            if i == 3:
                raise original
            yield i

    source = Prefetcher(failing())
    got = []
    with pytest.raises(LoaderBroke, match="sample 3 is corrupt: expected 3x32x32, got 3x31x32") as info:
        async for i in source:
            got.append(i)
    assert info.value is original and got == [0, 1, 2]
    assert _stopped(loader.thread)
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()


async def test_dataset_exception_in_a_dataloader_keeps_its_type_and_message() -> None:
    class Broken(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            if index == 5:
                raise KeyError(f"image {index} missing from the archive")
            return torch.zeros(2), torch.tensor(index)

    with pytest.raises(KeyError, match="image 5 missing from the archive"):
        async for _ in batches(DataLoader(Broken(), batch_size=2)):
            pass


async def test_break_stops_the_thread() -> None:
    loader = Recording()  # endless: only stopping ends it
    async for x in batches(loader):
        if x == 2:
            break
    assert _stopped(loader.thread)
    assert loader.produced <= 3 + 2  # taken 3, then at most prefetch more


async def test_async_with_stops_the_thread_even_when_a_reference_is_kept() -> None:
    loader = Recording()
    async with Prefetcher(loader) as source:
        async for x in source:
            if x == 1:
                break
    assert _stopped(loader.thread)
    assert [x async for x in source] == []  # closed: nothing more


async def test_an_exception_in_the_loop_body_stops_the_thread() -> None:
    loader = Recording()
    with pytest.raises(ZeroDivisionError):
        async for x in batches(loader):
            if x == 1:
                1 / 0
    assert _stopped(loader.thread)


async def test_cancelling_the_consumer_while_it_waits_stops_the_thread() -> None:
    waiting, release = threading.Event(), threading.Event()
    loader = Recording()

    def slow() -> Iterator[int]:
        for i in loader:
            if i == 1:
                waiting.set()
                release.wait(JOIN_S)  # the loader is busy with batch 1 when the consumer is cancelled
            yield i

    got: list[int] = []

    async def consume() -> None:
        async for i in Prefetcher(slow()):
            got.append(i)

    task = asyncio.create_task(consume())
    assert await asyncio.to_thread(waiting.wait, JOIN_S)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()  # the thread finishes the batch it is loading, hands nothing on and exits
    assert _stopped(loader.thread)
    assert got == [0] and loader.produced <= 2


async def test_wait_times_are_recorded_per_batch() -> None:
    release = threading.Event()

    def loader() -> Iterator[int]:
        yield 0
        release.wait(JOIN_S)  # batch 1 is late: the consumer waits for it
        yield from range(1, 5)

    async def release_later() -> None:
        await asyncio.sleep(0.05)
        release.set()

    source = batches(loader())
    waits = []
    helper = None
    async for i in source:
        waits.append(source.last_wait_ms)
        if i == 0:
            helper = asyncio.create_task(release_later())
    await helper
    assert source.count == 5 and len(waits) == 5
    assert all(w >= 0.0 for w in waits)
    assert waits[1] >= 40.0  # it waited at least the 50 ms batch 1 was held back
    assert source.total_wait_ms == pytest.approx(sum(waits))


async def test_prefetch_zero_iterates_on_the_loop_without_a_thread() -> None:
    loader = Recording(4)
    source = Prefetcher(loader, prefetch=0)
    assert [x async for x in source] == [0, 1, 2, 3]
    assert loader.thread is threading.main_thread()
    assert source.count == 4 and source.total_wait_ms >= 0.0


@pytest.mark.parametrize("prefetch", [-1, 1.5, None])
def test_bad_prefetch_is_refused(prefetch: object) -> None:
    with pytest.raises(ValueError, match="prefetch must be an integer of at least 0"):
        Prefetcher([], prefetch)  # type: ignore[arg-type]


async def test_dataloader_with_its_own_workers() -> None:
    x = torch.arange(64.0).view(32, 2)
    loader = DataLoader(TensorDataset(x, torch.arange(32)), batch_size=4, num_workers=2)
    labels = torch.cat([y async for _, y in batches(loader)])
    assert labels.tolist() == list(range(32))
    async for _, y in batches(loader):
        break
    workers = [t for t in threading.enumerate() if t.name == "source"]
    for thread in workers:
        thread.join(JOIN_S)
    assert not any(t.is_alive() for t in workers)
