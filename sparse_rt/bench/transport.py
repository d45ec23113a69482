"""`sparse-rt bench transport`: sparse-rt's framed messages vs plain pyzmq, between the same two processes.

The question a user asks of a split runtime's transport is "what does it cost
me over the socket I would have used anyway?". So both variants run in one
run, between the same sender (this process) and the same peer process, over
tcp://127.0.0.1 on random ports, with the same socket types (DEALER ->
ROUTER) and the same number of bytes per message:

- sparse-rt: per message, ``encode_message`` of an ``infer`` Activations whose
  fp32 values total the size, ``Connection.send`` on a DEALER; in the peer,
  ``Connection.recv`` on a ROUTER, ``decode_header`` and ``decode_message``
  (every check, the copy into a tensor), as the server does.
- raw: one prebuilt buffer of the same total bytes, sent as one frame with
  ``socket.send(copy=False)`` on a plain (blocking) pyzmq DEALER; the peer's
  plain ROUTER receives it and does nothing with it.

With ``--curve`` a third variant, sparse-rt over CURVE-encrypted sockets
(the same code, a server key pair and a client key pair), says what
encryption costs on the same messages.

Two measurements per size: streaming (a round of messages, one small ack
at its end, so throughput and the per-message cost when sends overlap) and
ping-pong (every message answered by a small ack, so the round-trip latency
a request/reply step sees).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import torch
import zmq
import zmq.asyncio

from sparse_rt.bench.common import BenchReport, bench_options, emit, pyplot, save_figure
from sparse_rt.transport.connection import Connection, bind_router, connect_dealer, frame_bytes
from sparse_rt.transport.curve import KeyPair, curve_client, curve_server
from sparse_rt.wire.header import decode_header
from sparse_rt.wire.messages import Activations, decode_message, encode_message

DEFAULT_SIZES = "4K,64K,1M,4M,16M"
STREAM_BYTES = 64 << 20  # bytes per streaming round: enough that one ack's round trip is noise
PING_BYTES = 16 << 20  # bytes per ping-pong round
MIN_STREAM, MIN_PING = 4, 2  # fewest messages per round, for the largest sizes
MAX_MESSAGES = 2000  # most messages per streaming round (ping-pong rounds: a tenth)
MAX_SIZE = 256 << 20  # bytes; the protocol allows 1 GiB, but a few such messages in flight would swap a small machine
ACK = b"ok"
ANSWER_TIMEOUT = 60.0  # seconds to wait for the peer before calling it dead
TARGET_RATIO = 0.8  # ratio_vs_raw wanted for 1-16 MiB messages
TARGET_OVERHEAD_US = 100.0  # per small message
CURVE_COLUMNS = ("curve_MB_s", "curve_vs_plain", "rtt_curve_us")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20}


class SizeList(click.ParamType):
    """A comma-separated list of message sizes in bytes: 4096, 4K, 1M (K and M are binary: KiB, MiB)."""

    name = "SIZES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        sizes = []
        for item in str(value).split(","):
            match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", item)
            unit = match.group(2).upper() if match else None
            if match is None or unit not in _UNITS:
                self.fail(f"{item.strip()!r} is not a size; expected e.g. 4096, 4K or 16M", param, ctx)
            size = int(match.group(1)) * _UNITS[unit]
            if size < 4 or size % 4 or size > MAX_SIZE:
                self.fail(f"{item.strip()!r} = {size} bytes; a size must be a multiple of 4 bytes (fp32 values) "
                          f"between 4 and {MAX_SIZE >> 20} MiB", param, ctx)
            sizes.append(size)
        return sizes


@dataclass(frozen=True)
class Phase:
    """What the peer serves next: ``count`` messages of one variant, an ack after every ``every``."""

    variant: str  # "sparse_rt", "sparse_rt_curve" or "raw"
    count: int
    every: int
    answer: int = 0  # raw only: bytes of each reply (bench exchange's gradient or prediction); 0 = ACK


def _peer(pipe, curve: KeyPair | None = None) -> None:
    """The receiving process: one ROUTER per variant, rounds as the sender announces them on ``pipe``."""
    asyncio.run(_serve(pipe, curve))


async def _serve(pipe, curve: KeyPair | None) -> None:
    context, raw_context = zmq.asyncio.Context(), zmq.Context()
    routers = {"sparse_rt": bind_router(context, "tcp://127.0.0.1:*")}
    if curve is not None:  # no ZAP handler: libzmq lets any client key in, as a benchmark wants
        routers["sparse_rt_curve"] = bind_router(context, "tcp://127.0.0.1:*", options=[curve_server(curve)])
    raw = raw_context.socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, 0)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    pipe.send(({variant: router.socket.getsockopt_string(zmq.LAST_ENDPOINT) for variant, router in routers.items()},
               f"tcp://127.0.0.1:{port}"))
    try:
        # Nothing else runs on this loop, so blocking on the pipe or on the raw socket stalls nobody.
        while (phase := pipe.recv()) is not None:
            cpu, answer = time.process_time(), bytes(phase.answer) if phase.answer else ACK
            for i in range(1, phase.count + 1):
                if phase.variant != "raw":
                    router = routers[phase.variant]
                    route, frames = await router.recv()
                    decode_message(frames, decode_header(frames[0].bytes))  # as the server: header parsed once
                    if i % phase.every == 0:
                        await router.send([ACK], route)
                else:
                    route, _ = raw.recv_multipart(copy=False)
                    if i % phase.every == 0:
                        raw.send_multipart([route, answer], copy=False)
            pipe.send(time.process_time() - cpu)  # this process's CPU seconds, I/O thread included
    finally:
        for router in routers.values():
            router.close()
        raw.close(linger=0)
        context.term()
        raw_context.term()


def message_for(size: int) -> Activations:
    """An ``infer`` message whose fp32 values total ``size`` bytes: samples of 16 channels of 4 x 4 when it divides."""
    floats = size // 4
    shape = (floats // 256, 16, 4, 4) if floats % 256 == 0 else (1, 1, 1, floats)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(size))
    return Activations(id=1, session="bench", codec="fp32", lz4=False, channels=shape[1],
                       indices=torch.arange(shape[1]), values=values)


def round_sizes(size: int, max_messages: int) -> tuple[int, int]:
    """Messages per streaming round and per ping-pong round: a fixed number of bytes, within bounds."""
    stream = min(max(STREAM_BYTES // size, MIN_STREAM), max(max_messages, MIN_STREAM))
    ping = min(max(PING_BYTES // size, MIN_PING), max(max_messages // 10, MIN_PING))
    return stream, ping


@dataclass
class Timing:
    """One variant at one size and mode: median seconds per message, and CPU seconds per message."""

    seconds: float
    cpu: float  # both processes, their ZeroMQ I/O threads included, over the timed rounds


class Bench:
    """The sender's side: both variants' sockets to one peer process, and rounds of each.

    Rounds of the two variants alternate (sparse-rt first in even rounds, raw
    first in odd ones), so a burst of load from another job on the machine hits
    both alike; that is why this suite takes its medians itself instead of
    timing one variant's rounds back to back with ``median_time``.
    """

    def __init__(self, curve: bool = False) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.pipe, child = spawn.Pipe()
        server_keys = KeyPair(*zmq.curve_keypair()) if curve else None
        self.peer = spawn.Process(target=_peer, args=(child, server_keys), daemon=True, name="bench-transport-peer")
        self.peer.start()
        child.close()
        addresses, raw_address = self._from_peer("start")
        self.loop = asyncio.new_event_loop()
        self.context, self.raw_context = zmq.asyncio.Context(), zmq.Context()
        self.dealers: dict[str, Connection] = {"sparse_rt": connect_dealer(self.context, addresses["sparse_rt"])}
        if server_keys is not None:
            client = curve_client(KeyPair(*zmq.curve_keypair()), server_keys.public)
            self.dealers["sparse_rt_curve"] = connect_dealer(self.context, addresses["sparse_rt_curve"],
                                                             options=[client])
        self.raw = self.raw_context.socket(zmq.DEALER)
        self.raw.setsockopt(zmq.LINGER, 0)
        self.raw.setsockopt(zmq.RCVTIMEO, int(ANSWER_TIMEOUT * 1000))
        self.raw.connect(raw_address)

    def measure(self, message: Activations, payload: bytes, count: int, every: int, repeats: int,
                warmup: int) -> dict[str, Timing]:
        """Both variants, ``repeats`` rounds of ``count`` messages each after ``warmup`` rounds, interleaved.

        sparse-rt encodes ``message`` for every send; raw sends ``payload``, the same bytes, as one frame.
        """
        runs: dict[str, Callable[[], Any]] = {"raw": lambda: self._raw_round(payload, count, every)}
        for variant, dealer in self.dealers.items():
            runs[variant] = lambda dealer=dealer: self.loop.run_until_complete(
                self._sparse_round(dealer, message, count, every))
        seconds: dict[str, list[float]] = {variant: [] for variant in runs}
        cpu = dict.fromkeys(runs, 0.0)
        for number in range(warmup + repeats):
            for variant in sorted(runs, reverse=number % 2 == 0):  # raw first in odd rounds, last in even ones
                self.pipe.send(Phase(variant, count, every))
                started, cpu_started = time.perf_counter(), time.process_time()
                runs[variant]()
                elapsed, used = time.perf_counter() - started, time.process_time() - cpu_started
                used += self._from_peer("finish a round")
                if number >= warmup:
                    seconds[variant].append(elapsed / count)
                    cpu[variant] += used / count
        return {variant: Timing(statistics.median(seconds[variant]), cpu[variant] / repeats) for variant in runs}

    @contextmanager
    def raw_trips(self, payload: bytes, answer: int, count: int) -> Iterator[Callable[[], None]]:
        """A call that makes one raw round trip (``payload`` up, ``answer`` bytes back); make exactly ``count``.

        For a suite that times single round trips between other work (bench exchange): the peer
        learns of all ``count`` at once, so the pipe to it is inside no timed trip.
        """
        self.pipe.send(Phase("raw", count, 1, answer))
        yield lambda: self._raw_round(payload, 1, 1)
        self._from_peer("finish a round")

    def _from_peer(self, what: str) -> Any:
        if not self.pipe.poll(ANSWER_TIMEOUT):
            raise RuntimeError(f"the transport peer process did not {what} within {ANSWER_TIMEOUT:.0f} s "
                               f"(exit code {self.peer.exitcode})")
        return self.pipe.recv()

    async def _sparse_round(self, dealer: Connection, message: Activations, count: int, every: int) -> None:
        for i in range(1, count + 1):
            await dealer.send(encode_message(message))
            if i % every == 0:
                try:
                    await asyncio.wait_for(dealer.recv(), ANSWER_TIMEOUT)
                except asyncio.TimeoutError:
                    raise RuntimeError(f"the transport peer did not answer within {ANSWER_TIMEOUT:.0f} s "
                                       f"(exit code {self.peer.exitcode})") from None

    def _raw_round(self, payload: bytes, count: int, every: int) -> None:
        for i in range(1, count + 1):
            self.raw.send(payload, copy=False)
            if i % every == 0:
                try:
                    self.raw.recv()
                except zmq.Again:
                    raise RuntimeError(f"the transport peer did not answer within {ANSWER_TIMEOUT:.0f} s "
                                       f"(exit code {self.peer.exitcode})") from None

    def close(self) -> None:
        if self.peer.is_alive():
            self.pipe.send(None)
            self.peer.join(10)
        if self.peer.is_alive():
            self.peer.kill()
            self.peer.join()
        self.pipe.close()
        for dealer in self.dealers.values():
            dealer.close()
        self.raw.close(linger=0)
        self.context.term()
        self.raw_context.term()
        self.loop.close()


def _label(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def run_transport(sizes: list[int], repeats: int, warmup: int, max_messages: int = MAX_MESSAGES,
                  curve: bool = False) -> BenchReport:
    """Measure every variant at every size, streaming and ping-pong, between one pair of processes."""
    report = BenchReport("transport", columns=(
        "size", "sparse_rt_MB_s", "raw_MB_s", "ratio_vs_raw", "sparse_rt_msg_s", "raw_msg_s", "overhead_us",
        "rtt_sparse_rt_us", "rtt_raw_us", "rtt_overhead_us") + (CURVE_COLUMNS if curve else ()))
    bench = Bench(curve)
    try:
        for size in sizes:
            message = message_for(size)
            frames = encode_message(message)
            wire = frame_bytes(frames)  # header + indices + values, what both send
            payload = b"".join(bytes(memoryview(frame)) for frame in frames)
            stream, ping = round_sizes(size, max_messages)
            streaming = bench.measure(message, payload, stream, stream, repeats, warmup)
            pings = bench.measure(message, payload, ping, 1, repeats, warmup)
            sparse, raw = streaming["sparse_rt"].seconds, streaming["raw"].seconds
            report.rows.append({
                "size": _label(size), "bytes": size, "wire_bytes": wire,
                "stream_messages": stream, "ping_messages": ping,
                "sparse_rt_MB_s": wire / sparse / 1e6, "raw_MB_s": wire / raw / 1e6, "ratio_vs_raw": raw / sparse,
                "sparse_rt_msg_s": 1 / sparse, "raw_msg_s": 1 / raw, "overhead_us": (sparse - raw) * 1e6,
                "rtt_sparse_rt_us": pings["sparse_rt"].seconds * 1e6, "rtt_raw_us": pings["raw"].seconds * 1e6,
                "rtt_overhead_us": (pings["sparse_rt"].seconds - pings["raw"].seconds) * 1e6,
                "sparse_rt_cpu_us": streaming["sparse_rt"].cpu * 1e6, "raw_cpu_us": streaming["raw"].cpu * 1e6})
            if curve:
                encrypted = streaming["sparse_rt_curve"].seconds
                report.rows[-1].update({
                    "curve_MB_s": wire / encrypted / 1e6, "curve_vs_plain": sparse / encrypted,
                    "rtt_curve_us": pings["sparse_rt_curve"].seconds * 1e6,
                    "curve_cpu_us": streaming["sparse_rt_curve"].cpu * 1e6})
    finally:
        bench.close()
    report.settings = {"sizes": sizes, "repeats": repeats, "warmup": warmup, "max_messages": max_messages,
                       "curve": curve,
                       "address": "tcp://127.0.0.1 (random ports)",
                       "sockets": "DEALER -> ROUTER", "peer": "one process (multiprocessing spawn) for both variants",
                       "message": "infer Activations, fp32, no lz4; values (N, 16, 4, 4) when size divides by 1 KiB",
                       "targets": {"ratio_vs_raw_1_to_16_MiB": TARGET_RATIO, "overhead_us_small": TARGET_OVERHEAD_US}}
    report.notes += [
        "MB/s = wire bytes (header + indices + values; raw sends the same number of bytes) / seconds, 1 MB = 1e6 B",
        "overhead_us: streaming, sparse-rt minus raw seconds per message, rounds of stream_messages with one ack "
        "at the end (this is what the 100 us target is checked on); rtt_*: ping-pong, mean round trip of "
        "ping_messages request/ack pairs (the ack is one small frame, sent through Connection for sparse-rt); "
        f"medians over {repeats} rounds after {warmup} warm-up, sparse-rt and raw rounds alternating",
        "sparse-rt's time includes encode (NaN/inf check), asyncio send/recv, header parse and decode (every check, "
        "the copy into a tensor); raw sends a prebuilt buffer from blocking sockets and never reads what it receives",
        "JSON rows also hold sparse_rt_cpu_us / raw_cpu_us: CPU seconds per streamed message in both processes "
        "(I/O threads included), which a busy machine distorts less than wall time",
        *_verdicts(report.rows)]
    if curve:
        report.notes.append("curve_*: the same sparse-rt code over CURVE sockets (encrypted and authenticated, "
                            "no ZAP handler); curve_vs_plain = its throughput / sparse-rt's without CURVE")
    return report


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target, with the numbers that decide it."""
    large = [row for row in rows if (1 << 20) <= row["bytes"] <= (16 << 20)]
    small = [row for row in rows if row["bytes"] <= (4 << 10)]
    lines = []
    if large:
        worst = min(large, key=lambda row: row["ratio_vs_raw"])
        met = "met" if worst["ratio_vs_raw"] >= TARGET_RATIO else "MISSED"
        lines.append(f"target ratio_vs_raw >= {TARGET_RATIO} for 1-16 MiB: {met} (lowest {worst['ratio_vs_raw']:.2f} "
                     f"at {worst['size']})")
    if small:
        worst = max(small, key=lambda row: row["overhead_us"])
        lines.append(f"target overhead <= {TARGET_OVERHEAD_US:.0f} us per small message (streaming): "
                     f"{'met' if worst['overhead_us'] <= TARGET_OVERHEAD_US else 'MISSED'} "
                     f"({worst['overhead_us']:.0f} us at {worst['size']}); as round-trip latency: "
                     f"{'met' if worst['rtt_overhead_us'] <= TARGET_OVERHEAD_US else 'MISSED'} "
                     f"({worst['rtt_overhead_us']:.0f} us)")
    return lines


def plot(report: BenchReport, path: Path) -> None:
    """Throughput of both variants against message size (log-x), and their ratio with the target line."""
    plt = pyplot()
    sizes = [row["bytes"] for row in report.rows]
    figure, (speed, ratio) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, height_ratios=(2, 1))
    speed.plot(sizes, [row["sparse_rt_MB_s"] for row in report.rows], "o-",
               label="sparse-rt (encode, send, recv, decode)")
    speed.plot(sizes, [row["raw_MB_s"] for row in report.rows], "s--", label="plain pyzmq, one frame")
    speed.set_ylabel("throughput (MB/s)")
    speed.set_title("transport: DEALER -> ROUTER over tcp://127.0.0.1, streaming")
    speed.legend()
    speed.grid(True, which="both", alpha=0.3)
    ratio.plot(sizes, [row["ratio_vs_raw"] for row in report.rows], "o-")
    ratio.axhline(TARGET_RATIO, color="red", linestyle=":", label=f"target {TARGET_RATIO} (1-16 MiB)")
    ratio.set_xscale("log", base=2)
    ratio.set_xticks(sizes, [row["size"] for row in report.rows])
    ratio.minorticks_off()
    ratio.set_xlabel("message size (bytes)")
    ratio.set_ylabel("sparse-rt / raw")
    ratio.legend()
    ratio.grid(True, which="both", alpha=0.3)
    save_figure(figure, path, dpi=100)


@click.command("transport")
@bench_options
@click.option("--sizes", type=SizeList(), default=DEFAULT_SIZES, show_default=True,
              help="Comma-separated message sizes (fp32 value bytes); K = KiB, M = MiB.")
@click.option("--max-messages", type=click.IntRange(min=1), default=MAX_MESSAGES, show_default=True,
              help="Most messages per streaming round (a tenth per ping-pong round); rounds carry 64 MiB "
                   "(16 MiB ping-pong) up to this.")
@click.option("--curve", is_flag=True, help="Also sparse-rt over CURVE (encrypted) sockets: what encryption costs.")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, sizes: list[int], max_messages: int,
            curve: bool) -> None:
    """sparse-rt's messages vs plain pyzmq between the same two processes.

    Per size: throughput of each (MB/s, messages/s), ratio_vs_raw, and the
    per-message overhead in microseconds, streaming and as round-trip latency.
    Targets: ratio_vs_raw >= 0.8 for 1-16 MiB; overhead <= 100 us for 4 KiB.
    """
    emit(run_transport(sizes, repeats, warmup, max_messages, curve), as_json, out, plot)
