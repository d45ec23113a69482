"""Source stage: batches (x, y) from a DataLoader or from an app."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Iterable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


async def batches(loader: Iterable[Batch]) -> AsyncIterator[Batch]:
    """Yield the loader's batches, letting the event loop run between them.

    A DataLoader over in-memory tensors is fast enough to iterate on the loop;
    the await gives the sockets a turn even when every batch is ready at once.
    """
    for x, y in loader:
        yield x, y
        await asyncio.sleep(0)
