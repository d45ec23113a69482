"""What the edge proposes comes from its chain, and what the server answers is checked against what was sent."""
from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
import zmq
import zmq.asyncio

from pipelines.digits_cnn import pipeline as digits
from sparse_rt import EdgeClient
from sparse_rt.assembly import edge_chain, edge_side
from sparse_rt.edge.protocol import SessionSettings
from sparse_rt.errors import WireError
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.wire.header import decode_header
from sparse_rt.wire.messages import Predictions, Welcome, encode_message

LIMITS = {"max_batch": 1024, "max_frame_bytes": 0, "max_lr_scale": 10.0, "session_idle_s": 600.0,
          "sessions_per_peer": 64}


def _chain(**codecs):
    model, _ = edge_side(digits, 0, 4, 0)
    return edge_chain(model, lambda params: build_optimizer(params, "adam", 1e-3), **codecs)


@pytest.mark.parametrize("codecs, expected", [
    (dict(), ("fp32", False, None, None)),
    (dict(codec="int8", lz4=True), ("int8", True, None, None)),
    (dict(codec="int8", grad_codec="fp16"), ("int8", False, "fp16", False)),
    (dict(codec="fp16", lz4=True, grad_lz4=False), ("fp16", True, "fp16", False)),
])
def test_the_handshake_proposes_what_the_chain_will_send(codecs, expected):
    settings = SessionSettings.of_chain(_chain(**codecs), "digits_cnn", "train")
    assert (settings.codec, settings.lz4, settings.grad_codec, settings.grad_lz4) == expected
    assert (settings.channels, settings.budget) == (32, 4)


async def test_a_prediction_with_other_rows_than_were_sent_is_refused(tmp_path):
    """A server (here a raw ROUTER) answering 3 rows for 8 must not reach the caller as 8 rows' logits."""
    context = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/fake-{uuid.uuid4().hex[:8]}.sock"
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)

    async def fake_server() -> None:
        while True:
            route, *frames = await router.recv_multipart()
            header = decode_header(frames[0])
            if header["kind"] == "hello":
                reply = encode_message(Welcome(header["id"], "s1", 32, 4, 4, 10, LIMITS))
            else:
                reply = encode_message(Predictions(header["id"], "s1", torch.zeros(3, 10)))
            await router.send_multipart([route, *[bytes(memoryview(f)) for f in reply]])

    task = asyncio.create_task(fake_server())
    try:
        async with EdgeClient(digits, address, budget=4, timeout=5, retries=0) as client:
            with pytest.raises(WireError, match="3 rows for the 8 sent"):
                await client.infer(torch.randn(8, *digits.input_shape))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        router.close(linger=0)
        context.term()



def test_a_chain_whose_transport_uses_another_link_is_refused(tmp_path):
    from sparse_rt.edge.session import EdgeSession
    from sparse_rt.errors import ConfigError
    from sparse_rt.stages.chain import EdgeChain
    from sparse_rt.stages.compressor import CompressorStage
    from sparse_rt.stages.transport import TransportStage
    from sparse_rt.transport.connection import connect_dealer
    from sparse_rt.transport.link import RequestLink

    context = zmq.asyncio.Context()
    try:
        links = [RequestLink(connect_dealer(context, f"ipc://{tmp_path}/{name}.sock"), name) for name in "ab"]
        model, _ = edge_side(digits, 0, 4, 0)
        chain = EdgeChain([model.head, CompressorStage(model.compressor), TransportStage(links[0])])
        settings = SessionSettings.of_chain(chain, "digits_cnn")
        with pytest.raises(ConfigError, match="another link"):
            EdgeSession(chain, links[1], settings)
        EdgeSession(chain, links[0], settings).close()
    finally:
        for link in links:
            link.connection.close()
        context.term()
