"""CURVE: every connection encrypted, and the server told who is at the other end, by ZeroMQ itself.

Keys are files in zmq.auth's certificate format (``NAME.key`` holds the
public key, ``NAME.key_secret`` both), made by ``sparse-rt keys generate``.
A server socket gets its key pair; a client socket its own pair and the
server's public key. Authentication (which client keys are let in) is the
server's ZAP handler, server/trust.py; a failed handshake is told by transport/events.py. Nothing here is our own cryptography:
libzmq's CurveZMQ does the handshake and the encryption.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from sparse_rt.errors import ConfigError
from sparse_rt.transport.connection import SocketOption

PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"


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
