"""CURVE keys and allow-lists over real processes and sockets; sessions bound to keys; refusals that tell nothing."""
from __future__ import annotations

import asyncio
import json
import contextlib
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from pipelines.digits_cnn import pipeline as digits
from sparse_rt.assembly import server_chain
from sparse_rt.errors import ConfigError
from sparse_rt.model.sides import build_sides
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.server.server import SplitServer
from sparse_rt.server.trust import AllowList, start_authenticator
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.transport.connection import bind_router, connect_dealer, is_local
from sparse_rt.transport.curve import curve_client, curve_server, generate_keys, load_key_pair, load_public_key
from sparse_rt.wire.messages import Activations, ErrorReply, Gradients, Hello, Welcome, decode_message, encode_message

KEYS = ("server", "alice", "bob", "viewer", "mallory", "broker", "replica", "eve")


@pytest.fixture
def keys(tmp_path) -> Path:
    """Key pairs for a server and four clients; alice and bob may train, viewer may infer, mallory is unknown.
    A broker's: the broker, the replica it lets join, and eve, a replica it does not know."""
    folder = tmp_path / "keys"
    for name in KEYS:
        generate_keys(folder, name)
    for name, allowed in (("alice", "train"), ("bob", "train"), ("viewer", "infer")):
        (tmp_path / allowed).mkdir(exist_ok=True)
        shutil.copy(folder / f"{name}.key", tmp_path / allowed)
    return folder


def test_keys_generate_writes_a_pair_with_a_private_secret_and_never_overwrites(tmp_path):
    command = [sys.executable, "-m", "sparse_rt", "keys", "generate", "--out", str(tmp_path), "edge-1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    secret = tmp_path / "edge-1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = load_key_pair(secret)
    assert load_public_key(tmp_path / "edge-1.key") == pair.public and len(pair.secret) == 40
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists already" in again.stderr
    with pytest.raises(ConfigError, match="holds only a public key"):
        load_key_pair(tmp_path / "edge-1.key")


# -- real processes ------------------------------------------------------------------------------------


def _secure_server(start, keys: Path):
    server = start("server", bind="tcp://127.0.0.1:*", json=True, curve_key=keys / "server.key_secret",
                   allow_keys=keys.parent / "train", allow_infer_keys=keys.parent / "infer")
    return server, server.wait_ready()


def _edge(start, keys: Path, address: str, name: str, server_key: str = "server", **options) -> NodeProcess:
    return start("edge", connect=address, curve_key=keys / f"{name}.key_secret",
                 server_key=keys / f"{server_key}.key", epochs=1, timeout=60, retries=1, **options)


def test_only_allowed_keys_get_in_and_each_refusal_is_a_clear_error(start, keys):
    server, address = _secure_server(start, keys)
    alice = _edge(start, keys, address, "alice", json=True)
    stranger = _edge(start, keys, address, "mallory")
    impostor = _edge(start, keys, address, "alice", server_key="mallory")  # wrong server public key
    plain = start("edge", connect=address, epochs=1, timeout=60, retries=1)  # no CURVE at all
    viewer_training = _edge(start, keys, address, "viewer")
    viewer = _edge(start, keys, address, "viewer", mode="infer", json=True)
    # Each is told at the handshake: waiting out its request timeout and resend (120 s) would make finish()
    # kill it (exit code -9), and a timeout is exit code 1.
    failures = {name: node.finish(timeout=100) for name, node in
                (("stranger", stranger), ("impostor", impostor), ("plain", plain))}
    for name, (code, _) in failures.items():
        assert code == 2, (name, code)
    assert "refused this key" in "".join(stranger.log)
    assert "--server-key is not that server's public key" in "".join(impostor.log)
    assert "requires CURVE" in "".join(plain.log)
    code, _ = viewer_training.finish(timeout=120)
    assert code == 2 and "this key is allowed inference only" in "".join(viewer_training.log)
    trained, inferred = alice.result(timeout=300), viewer.result(timeout=300)
    assert trained["test_accuracy"] > 0.5 and trained["steps"] > 0
    assert inferred["test_accuracy"] >= 0.0 and inferred["steps"] == 0
    server.stop()
    summary = server.result(timeout=60)
    assert summary["steps_applied"] == trained["steps"]
    assert summary["keys_refused"] >= 1
    assert "refused a CURVE handshake from key" in "".join(server.log)


def test_through_a_broker_edges_and_replicas_are_authenticated_and_roles_follow_the_edges_keys(start, keys):
    """The edge's key reaches the replica in the broker's envelope: its role and its sessions follow it."""
    (keys.parent / "replicas").mkdir()
    shutil.copy(keys / "replica.key", keys.parent / "replicas")
    allow = {"allow_keys": keys.parent / "train", "allow_infer_keys": keys.parent / "infer"}
    broker = start("broker", bind="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", json=True,
                   curve_key=keys / "broker.key_secret", allow_replica_keys=keys.parent / "replicas", **allow)
    broker.wait_ready()
    replica = start("server", join=broker.backend, curve_key=keys / "replica.key_secret",
                    server_key=keys / "broker.key", json=True, **allow)
    rogue = start("server", join=broker.backend, curve_key=keys / "eve.key_secret", server_key=keys / "broker.key",
                  **allow)
    broker.wait_for("joined", count=1)
    alice = _edge(start, keys, broker.address, "alice", server_key="broker", json=True)
    stranger = _edge(start, keys, broker.address, "mallory", server_key="broker")
    viewer_training = _edge(start, keys, broker.address, "viewer", server_key="broker")
    code, _ = stranger.finish(timeout=100)
    assert code == 2 and "refused this key" in "".join(stranger.log)
    code, _ = viewer_training.finish(timeout=120)
    assert code == 2 and "this key is allowed inference only" in "".join(viewer_training.log)  # the replica's check
    trained = alice.result(timeout=300)
    assert trained["test_accuracy"] > 0.5 and trained["steps"] > 0
    broker.stop()
    summary = broker.result(timeout=60)
    assert summary["joined"] == 1  # eve never got in
    assert "refused a CURVE handshake from key" in "".join(broker.log)
    replica.stop()
    assert replica.result(timeout=60)["steps_applied"] == trained["steps"]
    rogue.stop()


# -- sessions belong to keys ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def secure_server(tmp_path, keys: Path, reveal: bool = True):
    torch.manual_seed(0)
    _, server_model, cut = build_sides(digits.build_model(), digits.cut, digits.input_shape, budget=4)
    chain = server_chain(server_model, build_optimizer(server_model.parameters(), "adam", 1e-3))
    context = zmq.asyncio.Context()
    allow = AllowList(keys.parent / "train", keys.parent / "infer")
    authenticator = start_authenticator(context, allow)
    address = f"ipc://{tmp_path}/secure-{uuid.uuid4().hex[:8]}.sock"
    connection = bind_router(context, address, options=[curve_server(load_key_pair(keys / "server.key_secret"))])
    server = SplitServer(digits.name, chain, cut, digits.num_classes, connection, allow=allow, reveal=reveal)
    task = asyncio.create_task(server.serve())

    def client(name: str):
        pair, server_public = load_key_pair(keys / f"{name}.key_secret"), load_public_key(keys / "server.key")
        return connect_dealer(context, address, options=[curve_client(pair, server_public)])

    try:
        yield server, client, cut
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        connection.close()
        authenticator.stop()
        context.term()


async def _ask(connection, message, timeout=10.0):
    await connection.send(encode_message(message))
    _, frames = await asyncio.wait_for(connection.recv(), timeout)
    return decode_message(frames)


def _step(cut, session: str, step: int) -> Activations:
    values = torch.randn(8, 4, cut.sent_height, cut.sent_width)
    return Activations(3, session, "fp32", False, cut.channels, torch.arange(4), values, torch.randint(0, 10, (8,)),
                       step)


async def test_a_session_belongs_to_its_key_across_reconnects_and_no_other_key_can_use_it(tmp_path, keys):
    async with secure_server(tmp_path, keys) as (server, client, cut):
        first = client("alice")
        welcome = await _ask(first, Hello(1, digits.name, 32, 4, "fp32", False, "train"))
        assert isinstance(welcome, Welcome)
        assert isinstance(await _ask(first, _step(cut, welcome.session, 0)), Gradients)
        first.close()
        again = client("alice")  # a new socket, so a new routing id: the same key
        assert isinstance(await _ask(again, _step(cut, welcome.session, 1)), Gradients)
        other = client("bob")
        taken = await _ask(other, _step(cut, welcome.session, 2))
        assert isinstance(taken, ErrorReply) and taken.code == "unknown_session"
        assert server.stats.steps_applied == 2
        assert server.sessions[welcome.session].owner == load_key_pair(keys / "alice.key_secret").public
        for connection in (again, other):
            connection.close()


async def test_a_key_removed_from_the_allow_list_is_refused_at_its_next_connection(tmp_path, keys):
    async with secure_server(tmp_path, keys) as (server, client, cut):
        (keys.parent / "train" / "bob.key").unlink()
        time.sleep(0.01)  # a new folder mtime
        refused = client("bob")
        await refused.send(encode_message(Hello(1, digits.name, 32, 4, "fp32", False, "train")))
        assert not await refused.socket.poll(1500)  # the handshake never completes: no message reaches the server
        assert server.allow.refused >= 1
        refused.close()


async def test_refusals_reveal_nothing_about_the_model_unless_allowed(tmp_path, keys):
    async with secure_server(tmp_path, keys, reveal=False) as (server, client, cut):
        connection = client("alice")
        reply = await _ask(connection, Hello(1, "guess", 32, 4, "fp32", False, "train"))
        assert isinstance(reply, ErrorReply) and reply.code == "handshake_refused"
        assert "digits_cnn" not in reply.message and "32" not in reply.message
        connection.close()


@pytest.mark.parametrize("address, local", [("tcp://127.0.0.1:5555", True), ("tcp://localhost:*", True),
                                            ("ipc:///tmp/x.sock", True), ("inproc://x", True),
                                            ("tcp://[::1]:5555", True), ("tcp://0.0.0.0:5555", False),
                                            ("tcp://192.168.1.10:5555", False), ("tcp://*:5555", False)])
def test_which_addresses_only_this_machine_can_reach(address, local):
    assert is_local(address) is local


async def test_a_peers_text_cannot_forge_a_line_in_the_servers_log(tmp_path, caplog):
    from tests.test_server_chain import ask, batch, serving

    forged = "x\n2026-12-02 00:00:00 server INFO session granted to attacker"
    async with serving(tmp_path) as (server, raw, cut, _):
        with caplog.at_level("INFO", logger="sparse_rt.server"):
            reply = await ask(raw, batch(cut, forged))
            assert isinstance(reply, ErrorReply) and reply.code == "unknown_session"
            hello = await ask(raw, Hello(1, "evil\r\npipeline", 32, 4, "fp32", False, "train"))
            assert isinstance(hello, ErrorReply)
    lines = [record.getMessage() for record in caplog.records if record.name == "sparse_rt.server"]
    assert any("x\\n2026-12-02" in line for line in lines), lines
    assert any("evil\\r\\npipeline" in line for line in lines), lines
    assert not any("\n" in line or "\r" in line for line in lines)


# -- disk faults ------------------------------------------------------------------------------------------


def test_a_checkpoint_that_cannot_be_written_is_refused_at_start(start, tmp_path):
    (tmp_path / "not-a-folder").write_text("a file")
    server = start("server", bind="tcp://127.0.0.1:*", checkpoint=tmp_path / "not-a-folder" / "tail.pt")
    code, _ = server.finish(timeout=120)
    assert code == 2 and "cannot write a checkpoint there" in "".join(server.log)


def test_a_disk_that_fails_mid_run_is_a_warning_then_an_exit_code_not_a_crash(start, tmp_path):
    folder = tmp_path / "ckpt"
    server = start("server", bind="tcp://127.0.0.1:*", json=True, checkpoint=folder / "tail.pt", checkpoint_every=5)
    address = server.wait_ready()
    edge = start("edge", connect=address, epochs=2, json=True, checkpoint=folder / "head.pt", checkpoint_every=5)
    deadline = time.monotonic() + 120
    while not (folder / "tail.pt").exists() and time.monotonic() < deadline:  # the first periodic save worked
        time.sleep(0.05)
    shutil.rmtree(folder)
    folder.write_text("the disk is gone")  # every later save fails (even for root, unlike a read-only folder)
    code, stdout = edge.finish(timeout=300)  # the edge trained on and printed its summary, with its own exit code
    trained = json.loads(stdout)
    assert code == 3 and trained["steps"] > 20 and trained["test_accuracy"] > 0.5
    assert "could not save the head" in "".join(edge.log) and "Traceback" not in "".join(edge.log)
    assert sum("could not save the head" in line for line in edge.log) < 10  # not one line per failed step
    server.stop()
    code, stdout = server.finish(timeout=60)
    summary = json.loads(stdout)
    assert code == 3 and summary["checkpoint_saved"] is False and summary["checkpoint_failures"] >= 2
    assert summary["steps_applied"] == trained["steps"] and summary["errors"] == 0
    assert "could not save the tail" in "".join(server.log) and "Traceback" not in "".join(server.log)


def test_a_failed_periodic_save_is_retried_every_step_until_the_disk_is_back(tmp_path):
    from sparse_rt.store.checkpoint import Checkpointer

    written: list[int] = []
    broken = {"now": False}
    step = {"n": 0}

    def write(path: Path) -> None:
        if broken["now"]:
            raise OSError(28, "No space left on device")
        written.append(step["n"])

    saver = Checkpointer(tmp_path / "x.pt", every=10, write=write, what="tail")
    for step["n"] in range(1, 41):
        broken["now"] = 10 <= step["n"] < 25
        saver.after_step(step["n"])
    assert written == [25, 30, 40] and saver.failures == 15  # failed at 10, then every step 11..24, back at 25
    broken["now"] = True
    assert saver.final() is False
