"""The server under pressure: oversize frames, slow steps, hostile checkpoint files."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch
import zmq
import zmq.asyncio

from pipelines.digits_cnn import pipeline as digits
from sparse_rt.errors import DataError
from sparse_rt.model.sides import build_sides
from sparse_rt.assembly import largest_frame
from sparse_rt.store.checkpoint import read_checkpoint, save_checkpoint
from sparse_rt.server.server import SplitServer
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.assembly import server_chain
from sparse_rt.stages.base import Stage
from sparse_rt.transport.connection import bind_router
from sparse_rt.wire.messages import Activations, Gradients, Hello, Welcome, decode_message, encode_message


class SlowStep(Stage):
    """A server stage that makes every training step take a while, as a big model's tail would."""

    name = "slow"

    def forward(self, cut, ctx):
        if ctx.training:
            time.sleep(1.0)
        return cut


@pytest.fixture
async def slow_server(tmp_path):
    torch.manual_seed(0)
    _, server_model, cut = build_sides(digits.build_model(), digits.cut, digits.input_shape)
    tail = server_chain(server_model, build_optimizer(server_model.parameters(), "adam", 1e-3), stages=[SlowStep()])
    context = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/{uuid.uuid4().hex[:8]}.sock"
    limit = largest_frame(cut, max_batch=8)
    server = SplitServer(digits.name, tail, cut, digits.num_classes, bind_router(context, address, limit))
    task = asyncio.create_task(server.serve())
    sockets = []

    def dealer() -> zmq.asyncio.Socket:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        sockets.append(socket)
        return socket

    yield server, dealer, cut, limit
    for socket in sockets:
        socket.close(linger=0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    server.connection.close()
    context.term()


async def _welcome(socket, mode="train") -> str:
    await socket.send_multipart(encode_message(Hello(1, "digits_cnn", 32, 32, "fp32", False, mode)))
    reply = decode_message(await asyncio.wait_for(socket.recv_multipart(), 10))
    assert isinstance(reply, Welcome)
    return reply.session


def _step(session: str, n: int = 4, labels: bool = True) -> list:
    y = torch.zeros(n, dtype=torch.long) if labels else None
    return encode_message(Activations(2, session, "fp32", False, 32, torch.arange(32), torch.randn(n, 32, 4, 4), y))


async def test_handshakes_and_other_edges_are_answered_while_a_step_computes(slow_server):
    _, dealer, *_ = slow_server
    trainer, newcomer = dealer(), dealer()
    session = await _welcome(trainer)
    await trainer.send_multipart(_step(session))
    await asyncio.sleep(0.2)  # the slow step is now running in the tail's worker thread
    started = time.perf_counter()
    await _welcome(newcomer, mode="infer")
    assert time.perf_counter() - started < 0.5, "the handshake waited for the step"
    reply = decode_message(await asyncio.wait_for(trainer.recv_multipart(), 10))
    assert isinstance(reply, Gradients)


async def test_an_oversize_frame_drops_only_its_sender(slow_server):
    server, dealer, cut, limit = slow_server
    flooder, honest = dealer(), dealer()
    await flooder.send_multipart([b"x" * (limit + 1)])
    await asyncio.sleep(0.3)
    session = await _welcome(honest, mode="infer")
    await honest.send_multipart(_step(session, labels=False))
    assert decode_message(await asyncio.wait_for(honest.recv_multipart(), 10)).logits.shape == (4, 10)
    assert server.stats.errors == 0  # ZeroMQ dropped the oversize frame before any decoding
    assert await flooder.poll(200) == 0  # and sent nothing back for it


def test_checkpoints_are_atomic_and_checked(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, step=7)
    assert not list(tmp_path.glob(".*.tmp"))
    other = torch.nn.Linear(3, 2)
    assert read_checkpoint(path).restore(other) == {"step": 7}
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(DataError, match="does not fit this model"):
        read_checkpoint(path).restore(torch.nn.Linear(4, 2))
    with pytest.raises(DataError, match="no checkpoint there"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


class _Trap:
    """Unpickling this would create a file: proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"format": "sparse-rt-checkpoint/1", "model": {"w": _Trap(marker)}}, path)
    with pytest.raises(DataError, match="not a readable checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()
