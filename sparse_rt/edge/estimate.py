"""What an edge knows of its link and its server, learned from its own requests.

Every reply gives one observation: how long the request took on the wire
and, when the server reports its own time (`server_ms`, protocol `timing`),
how much of that the server held it. What is left is the network's share,
modelled as a round-trip time plus a time per byte: one medium carrying both
directions in turn, as the shaper models a Wi-Fi link. Small messages (the
handshake, tiny batches) measure the round trip; large ones the time per byte.

Both are exponential averages, so noise is smoothed, with change detection
on top, so a real change is followed within a few requests rather than the
average's slow drift: an observation far from the prediction is held as a
suspect, and a second one the same way in a row replaces the estimate (the
first is never enough: one slow reply is not a slower link).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Messages up to this size (both ways) are sized by their round trip, not by their bytes.
SMALL_BYTES = 4096
# ... unless their transfer, at the rate last seen, takes at least this long (and a tenth of the round trip).
MIN_TRANSFER_MS = 1.0


@dataclass
class Ewma:
    """An exponential average that forgets in a few samples; ``None`` until the first."""

    alpha: float
    value: float | None = None

    def add(self, sample: float) -> float:
        self.value = sample if self.value is None else (1 - self.alpha) * self.value + self.alpha * sample
        return self.value


class LinkEstimate:
    """Round-trip time, transfer rate and server time, from each request's bytes and times.

    ``change_ratio``: how far off (as a ratio, either way) an observation must
    be from the prediction to count as a change; ``confirm``: how many such in
    a row, in the same direction, make the estimate jump to them.
    """

    def __init__(self, alpha: float = 0.3, change_ratio: float = 1.5, confirm: int = 2) -> None:
        if not 0 < alpha <= 1 or change_ratio <= 1 or confirm < 1:
            raise ValueError("alpha must be in (0, 1], change_ratio above 1 and confirm at least 1")
        self.change_ratio, self.confirm = change_ratio, confirm
        self._rtt = Ewma(alpha)
        self._ms_per_byte = Ewma(alpha)
        self._server = Ewma(alpha)
        self._suspects: list[float] = []  # ms-per-byte samples far from the estimate, all on one side of it
        self._suspect_side = 0
        self.samples = 0
        self.rate_age = 0  # observations since the last one that measured the rate (too small ones do not)
        self.changes = 0  # times change detection replaced the rate estimate

    @classmethod
    def known(cls, rtt_ms: float, rate_bps: float, server_ms: float | None = None) -> "LinkEstimate":
        """An estimate that is simply right: what a policy that knows the link (a benchmark's oracle) sees."""
        estimate = cls()
        estimate._rtt.value, estimate._ms_per_byte.value, estimate._server.value = rtt_ms, 8e3 / rate_bps, server_ms
        return estimate

    @property
    def rtt_ms(self) -> float | None:
        return self._rtt.value

    @property
    def server_ms(self) -> float | None:
        """The server's own time per request (queue + compute), as it reports it."""
        return self._server.value

    @property
    def rate_bps(self) -> float | None:
        """Bits per second the link carries beyond its round trip (both directions together)."""
        per_byte = self._ms_per_byte.value
        return None if per_byte is None or per_byte <= 0 else 8e3 / per_byte

    def observe_round_trip(self, ms: float) -> None:
        """A small exchange's time (the handshake): the round trip alone."""
        if math.isfinite(ms) and ms >= 0:
            self._rtt.add(ms)

    def observe(self, bytes_up: int, bytes_down: int, wait_ms: float, server_ms: float | None = None) -> None:
        """One request: bytes each way, the time from its send to its reply, and the server's share of it."""
        if not (math.isfinite(wait_ms) and wait_ms >= 0):
            return
        self.samples += 1
        if server_ms is not None and math.isfinite(server_ms):
            # A server's word is not trusted past what the edge saw itself: it cannot claim more than the wait.
            server_ms = min(max(server_ms, 0.0), wait_ms)
            self._server.add(server_ms)
            wait_ms -= server_ms
        total, per_byte, rtt = bytes_up + bytes_down, self._ms_per_byte.value, self._rtt.value
        # A small message shows the rate too where its transfer takes long enough to see (1 KiB at 1 Mbit/s: 8 ms).
        visible = per_byte is not None and rtt is not None and per_byte * total >= max(MIN_TRANSFER_MS, 0.1 * rtt)
        if rtt is None or (total <= SMALL_BYTES and not visible):
            # The round trip, less the transfer time once the rate is known (4 KiB is 33 ms at 1 Mbit/s).
            self._rtt.add(max(wait_ms - (per_byte or 0.0) * total, 0.0))
            self.rate_age += 1
            return
        # The transfer time is what the round trip leaves. For a large message never less than a tenth of the
        # whole, so a round-trip estimate a little high cannot make it look free. Not for a small one: that floor
        # would cap the rate it can show at its bytes per tenth of the wait (1.5 KiB in 21 ms: 6 Mbit/s), and a
        # link that got faster would be held at its old rate by the very requests chosen for it.
        floor = 0.1 * wait_ms if total > SMALL_BYTES else 1e-3
        per_byte = max(wait_ms - rtt, floor) / total
        if per_byte > 0:  # a zero wait (a clock's resolution) says nothing of the rate
            self.rate_age = 0
            self._add_rate_sample(per_byte)

    def _add_rate_sample(self, per_byte: float) -> None:
        current = self._ms_per_byte.value
        if current is None or current <= 0:
            self._ms_per_byte.value = per_byte
            return
        ratio = per_byte / current
        side = 1 if ratio > self.change_ratio else -1 if ratio < 1 / self.change_ratio else 0
        if side == 0:
            self._suspects, self._suspect_side = [], 0
            self._ms_per_byte.add(per_byte)
            return
        if side != self._suspect_side:
            self._suspects, self._suspect_side = [], side
        self._suspects.append(per_byte)
        if len(self._suspects) >= self.confirm:  # a change, not noise: start again from what it looks like now
            self._ms_per_byte.value = sum(self._suspects) / len(self._suspects)
            self._suspects, self._suspect_side = [], 0
            self.changes += 1

    def predict_ms(self, bytes_up: int, bytes_down: int) -> float | None:
        """The network's time for a request of these sizes (server time not included); None until measured."""
        rtt = self._rtt.value
        if rtt is None:
            return None
        total, per_byte = bytes_up + bytes_down, self._ms_per_byte.value
        if per_byte is None:  # a small message is about its round trip; a large one is not known yet
            return rtt if total <= SMALL_BYTES else None
        return rtt + per_byte * total

    def snapshot(self) -> dict[str, Any]:
        """The estimates, for a metrics record."""
        rate = self.rate_bps
        return {"rtt_ms": self.rtt_ms, "rate_mbps": None if rate is None else rate / 1e6,
                "server_ms": self.server_ms, "link_changes": self.changes}
