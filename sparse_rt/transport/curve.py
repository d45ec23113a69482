"""CURVE: every connection encrypted, and the server told who is at the other end, by ZeroMQ itself.

Keys are files in zmq.auth's certificate format (``NAME.key`` holds the
public key, ``NAME.key_secret`` both), made by ``sparse-rt keys generate``.
A server socket gets its key pair; a client socket its own pair and the
server's public key. Authentication (which client keys are let in) is the
server's ZAP handler, server/trust.py. Nothing here is our own cryptography:
libzmq's CurveZMQ does the handshake and the encryption.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from sparse_rt.errors import ConfigError
from sparse_rt.transport.connection import SocketOption

PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"


class AuthenticationFailed(ConfigError, ConnectionError):
    """The handshake with the server failed: this key is refused, or a key is wrong or missing.

    A ConfigError (something the operator fixes; the CLI's exit code 2), not an outage.
    """


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes

    @property
    def user_id(self) -> str:
        """What the server sees for this key (ZeroMQ's User-Id: the z85 public key)."""
        return self.public.decode("ascii")


def generate_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``directory/name.key`` and ``directory/name.key_secret``; refuses to overwrite either."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"a key name is a plain file name, got {name!r}")
    public, secret = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} exists already; remove it first or pick another name")
    directory.mkdir(parents=True, exist_ok=True)
    written = zmq.auth.create_certificates(str(directory), name)
    Path(written[1]).chmod(0o600)  # the secret is readable by its owner only
    return Path(written[0]), Path(written[1])


def load_key_pair(path: Path) -> KeyPair:
    """This node's own keys, from a ``.key_secret`` file; a one-line ConfigError if it is not one."""
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(f"{path} holds only a public key; give this node's {SECRET_SUFFIX} file")
    return KeyPair(public, secret)


def load_public_key(path: Path) -> bytes:
    """A peer's public key, from its ``.key`` (or ``.key_secret``) file."""
    return _load(path)[0]


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a key file ({exc}); make one with `sparse-rt keys generate`") from None
    if public is None or len(public) != 40:
        raise ConfigError(f"{path}: no 40-character public-key line; make one with `sparse-rt keys generate`")
    return public, secret


def curve_server(keys: KeyPair) -> SocketOption:
    """A server socket that accepts only CURVE clients (which of them, the ZAP handler decides)."""
    def apply(socket: zmq.Socket) -> None:
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_server = True
    return apply


def curve_client(keys: KeyPair, server_public: bytes) -> SocketOption:
    """A client socket that talks only to the server holding ``server_public``'s secret."""
    def apply(socket: zmq.Socket) -> None:
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_serverkey = server_public
    return apply


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class HandshakeWatch:
    """A socket option that watches the connection's handshake, so a failed one is an error, not a silence.

    Without it a refused or misconfigured client only ever times out:
    ZeroMQ retries the connection quietly. Applied before the socket
    connects (no event can be missed); :meth:`verdict` then raises
    AuthenticationFailed with the likely cause, or returns once the
    handshake succeeded (or after ``timeout`` with no verdict: no server
    there yet, and the request's own timeout and resends take it from there).
    """

    def __init__(self, curve: bool) -> None:
        self.curve = curve
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    def __call__(self, socket: zmq.Socket) -> None:
        self._socket = socket  # type: ignore[assignment]
        self._monitor = socket.get_monitor_socket(HANDSHAKE_EVENTS)  # type: ignore[assignment]

    async def verdict(self, address: str, timeout: float) -> None:
        assert self._socket is not None and self._monitor is not None, "apply the watch to a socket first"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                if not await self._monitor.poll(int(left * 1000) + 1):
                    return
                event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return
                raise AuthenticationFailed(self._cause(event, address))
        finally:
            self.close()

    def _cause(self, event: int, address: str) -> str:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the server at {address} refused this key: its operator must put this node's "
                    f"{PUBLIC_SUFFIX} file in the server's --allow-keys folder")
        if not self.curve:
            return (f"the handshake with {address} failed: that server requires CURVE; give --curve-key "
                    f"(this node's {SECRET_SUFFIX}) and --server-key (the server's {PUBLIC_SUFFIX})")
        return (f"the CURVE handshake with {address} failed: --server-key is not that server's public key, "
                "or the server does not use CURVE")

    def close(self) -> None:
        if self._monitor is not None and self._socket is not None:
            if not self._socket.closed:
                self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
