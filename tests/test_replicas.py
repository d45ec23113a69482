"""Inference replicas behind a broker: the broker's table on its own, then real processes (kill -9 included).

The processes are a `sparse-rt node --role broker`, `sparse-rt node --role
server --join` replicas serving conftest's digits model set, and EdgeClients
connected to the broker as to any server.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from sparse_rt.cluster.replicas import ReplicaTable, request_id
from sparse_rt.data.datasets import load_digits
from sparse_rt.edge.client import EdgeClient
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.wire.header import encode_header


def _request(rid: int) -> list[bytes]:
    return [encode_header({"kind": "infer", "id": rid}), b"indices", b"data"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_edges_spread_over_the_replicas_and_each_stays_with_its_own():
    table = ReplicaTable(clock=Clock())
    table.heard(b"A"), table.heard(b"B")
    first = [table.route(edge, _request(1)) for edge in (b"e1", b"e2", b"e3", b"e4")]
    assert sorted(first) == [b"A", b"A", b"B", b"B"]
    again = [table.route(edge, _request(2)) for edge in (b"e1", b"e2", b"e3", b"e4")]
    assert again == first  # a session lives on the replica that opened it


def test_a_silent_replica_is_gone_and_what_it_had_in_flight_goes_to_the_others():
    clock = Clock()
    table = ReplicaTable(liveness_s=1.5, clock=clock)
    table.heard(b"A"), table.heard(b"B")
    edges = {edge: table.route(edge, _request(7)) for edge in (b"e1", b"e2")}
    on_a = next(edge for edge, replica in edges.items() if replica == b"A")
    table.answered(b"B", next(e for e in edges if e != on_a), _request(7))  # B answered its edge
    clock.now = 1.0
    table.heard(b"B")
    assert table.expire() == []  # A is late, not yet gone
    clock.now = 2.0
    table.heard(b"B")
    again = table.expire()
    assert [edge for edge, _ in again] == [on_a] and request_id(again[0][1]) == 7
    assert set(table.replicas) == {b"B"} and table.stats.lost == 1 and table.stats.resent == 1
    assert table.route(on_a, again[0][1]) == b"B"  # its edge moved


def test_requests_wait_for_a_replica_a_while_and_everything_is_bounded():
    clock = Clock()
    table = ReplicaTable(max_pending=2, pending_s=5.0, max_in_flight=2, max_edges=3, clock=clock)
    for rid in range(3):
        assert table.route(b"e", _request(rid)) is None  # no replica yet: held
    assert len(table.pending) == 2 and table.stats.dropped == 1  # the oldest went
    assert table.heard(b"A")
    assert not table.can_take_pending()  # back from an outage: it waits a moment for its peers
    clock.now += table.rejoin_s
    assert table.can_take_pending()
    assert [request_id(frames) for _, frames in table.take_pending()] == [1, 2]
    for rid in range(5):
        table.route(b"e", _request(rid))
    assert len(table.replicas[b"A"].in_flight) == 2  # tracked up to the bound, forwarded beyond it
    table.route(b"x", [b"not json"])
    assert table.stats.untracked == 1
    for edge in (b"f", b"g", b"h"):
        table.route(edge, _request(0))
    assert len(table.edges) == 3 and b"e" not in table.edges  # the least recently seen edge is forgotten
    clock.now = 100.0
    assert table.route(b"e", _request(9)) == b"A"  # a replica still answering (heard below) keeps serving
    table.heard(b"A")
    table.pending.append((0.0, b"old", _request(1)))
    table.expire()
    assert not table.pending  # held too long


# -- real processes -------------------------------------------------------------------------------------------

@pytest.fixture
def broker():
    node = NodeProcess("broker", {"bind": "tcp://127.0.0.1:*", "backend": "tcp://127.0.0.1:*", "json": True})
    node.wait_ready()
    yield node
    node.stop()
    node.finish(timeout=30)


def _replica(broker: NodeProcess, model_set) -> NodeProcess:
    return NodeProcess("server", {"pipeline": "digits_cnn", "join": broker.backend, "models": model_set})


def _stop(*nodes: NodeProcess) -> None:
    for node in nodes:
        if node.process.poll() is None:
            node.stop()
    for node in nodes:
        node.finish(timeout=30)


async def _stream(address: str, model_set, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    async with EdgeClient("digits_cnn", address, model_set=model_set, budget=8, timeout=10, retries=3) as edge:
        return [await edge.infer(x) for x in batches]


def _batches(count: int, size: int = 16) -> list[torch.Tensor]:
    x = load_digits(seed=0).x_test
    return [x[(i * size) % (len(x) - size):][:size] for i in range(count)]


def _summary(broker: NodeProcess) -> dict:
    broker.stop()
    return broker.result(timeout=30)


async def test_requests_spread_over_two_replicas_and_every_answer_is_the_models(broker, model_set, served_set):
    replicas = [_replica(broker, model_set) for _ in range(2)]
    try:
        broker.wait_for("joined", count=2)
        batches = _batches(6)
        answers = await asyncio.gather(*(_stream(broker.address, model_set, batches) for _ in range(4)))
        expected = await _stream(served_set, model_set, batches)  # one server, no broker: the same model
    finally:
        _stop(*replicas)
    for edge in answers:
        for got, want in zip(edge, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    summary = _summary(broker)
    assert summary["replies"] == summary["requests"] >= 4 * (6 + 1)  # each edge's hello and requests
    assert len(summary["per_replica"]) == 2 and all(n >= 4 for n in summary["per_replica"].values())


async def _stream_until(address: str, model_set, stop: asyncio.Event) -> int:
    """Requests one after another until ``stop``; how many were answered (each must be)."""
    batches, answered = _batches(8), 0
    async with EdgeClient("digits_cnn", address, model_set=model_set, budget=8, timeout=10, retries=3) as edge:
        while not stop.is_set():
            logits = await edge.infer(batches[answered % len(batches)])
            assert logits.shape == (16, 10)
            answered += 1
    return answered


async def test_a_replica_killed_mid_stream_loses_no_request_and_a_new_one_joins(broker, model_set):
    first, second = _replica(broker, model_set), _replica(broker, model_set)
    third = None
    try:
        broker.wait_for("joined", count=2)
        stop = asyncio.Event()
        streams = [asyncio.create_task(_stream_until(broker.address, model_set, stop)) for _ in range(4)]
        await asyncio.sleep(1.5)  # the edges are mid-stream, two on each replica
        first.process.kill()  # kill -9: no goodbye, requests in flight
        await asyncio.sleep(4.0)  # the broker sees it gone within its liveness; the edges go on meanwhile
        stop.set()
        answered = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)  # each request was answered
        broker.wait_for("went silent")
        third = _replica(broker, model_set)  # joins with nothing restarted
        broker.wait_for("joined", count=3)
        late = await _stream(broker.address, model_set, _batches(3))
        assert len(late) == 3
    finally:
        _stop(*(node for node in (first, second, third) if node is not None))
    summary = _summary(broker)
    assert summary["lost"] == 1 and summary["joined"] == 3 and summary["dropped"] == 0, summary
    assert summary["replies"] >= sum(answered) + 3
    survivor, newcomer = sorted(summary["per_replica"].values())[-1], sorted(summary["per_replica"].values())[0]
    # The survivor served all four edges after the kill (it answered more than its two edges' share), and the
    # new replica the new edge (the fewest edges: none).
    assert len(summary["per_replica"]) == 3 and newcomer >= 5 and survivor > sum(answered) / 2, (summary, answered)


def test_replicas_back_from_an_outage_together_share_its_edges():
    """A training group restarted by torchrun comes back within a moment: the first back must not take every edge."""
    clock = Clock()
    table = ReplicaTable(clock=clock)
    edges = [b"e%d" % i for i in range(4)]
    for edge in edges:
        assert table.route(edge, _request(1)) is None  # no replica: held
    table.heard(b"A")
    clock.now += table.rejoin_s / 2
    assert table.route(edges[0], _request(2)) is None  # A waits for its peers; so does a resend meanwhile
    table.heard(b"B")
    clock.now += table.rejoin_s / 2
    assert table.can_take_pending()
    routed = [table.route(edge, frames) for edge, frames in table.take_pending()]
    assert sorted(routed) == [b"A", b"A", b"B", b"B", b"B"] or sorted(routed) == [b"A", b"A", b"A", b"B", b"B"]
    assert {len(table.replicas[r].edges) for r in (b"A", b"B")} == {2}
    table.heard(b"C")  # a replica joining live ones serves at once
    assert table.route(b"new", _request(1)) == b"C"


async def test_a_replica_reads_each_requests_key_from_its_own_envelope():
    """Two requests under one routing id (an edge's connection taken over) keep the keys the broker stated for
    each: the server's owner of a message is never whoever used the routing id last."""
    import zmq
    import zmq.asyncio

    from sparse_rt.transport.connection import bind_router, join_broker

    context = zmq.asyncio.Context()
    broker = bind_router(context, "tcp://127.0.0.1:*")
    replica = join_broker(context, broker.socket.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        await replica.send([b"\x01"])  # a heartbeat: the broker learns the replica's id
        replica_id, _ = await asyncio.wait_for(broker.recv(), 10)
        for key in (b"key-of-victim", b"key-of-attacker"):
            await broker.send([b"edge-1", key, encode_header({"kind": "infer", "id": 1})], replica_id)
        routes = [(await asyncio.wait_for(replica.recv(), 10))[0] for _ in range(2)]
        assert [replica.peer_key(route, []) for route in routes] == ["key-of-victim", "key-of-attacker"]
        await replica.send([b"reply"], routes[1])
        _, frames = await asyncio.wait_for(broker.recv(), 10)
        assert [frame.bytes for frame in frames] == [b"edge-1", b"reply"]  # back to the edge's own id
    finally:
        replica.close()
        broker.close()
        context.term()
