"""Transport stage (edge): the encoded request onto the socket, the reply's frames back.

The socket work itself is transport/link.py (ids, resends, one reader for
every request in flight); this stage is where a chain meets it. It is the
only stage that awaits.
"""
from __future__ import annotations

from typing import Any

from sparse_rt.stages.base import Stage, StepContext
from sparse_rt.transport.link import Reply, RequestLink


class TransportStage(Stage):
    """Sends one request and awaits its reply: ``(validated header, frames)``."""

    name = "transport"

    def __init__(self, link: RequestLink) -> None:
        self.link = link

    async def forward(self, frames: list[Any], ctx: StepContext) -> Reply:  # type: ignore[override]
        return await self.link.request(ctx.meta["request_id"], frames)
