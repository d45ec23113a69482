"""Who may use the server: public keys in allow-list folders, checked by ZeroMQ's ZAP handler at the handshake.

Two folders of zmq.auth public-key files: keys in ``train`` may open
training and inference sessions, keys in ``infer`` inference only. A
connection whose key is in neither never completes its CURVE handshake, so
it cannot send the server a single message. The folders are read again
whenever one of them changes, so an operator allows or revokes a key by
adding or removing a file, without a restart (a revoked key's open
connections keep working until they reconnect, as in ZeroMQ itself).

pyzmq's :class:`~zmq.auth.asyncio.AsyncioAuthenticator` runs the ZAP
protocol; this module only answers its question (is this key allowed?),
remembers each key's role, and counts and logs refusals.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from sparse_rt.errors import ConfigError

log = logging.getLogger("sparse_rt.server")

TRAIN, INFER = "train", "infer"


@dataclass
class AllowList:
    """The keys allowed in, each with its role; a credentials provider for zmq.auth."""

    train_dir: Path | None = None
    infer_dir: Path | None = None
    refused: int = 0  # handshakes refused since start
    _roles: dict[str, str] = field(default_factory=dict)
    _stamp: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for folder in (self.train_dir, self.infer_dir):
            if folder is not None and not folder.is_dir():
                raise ConfigError(f"{folder}: no such folder of allowed public keys")
        self._reload()
        if not self._roles:
            log.warning("no allowed keys yet in %s: every client is refused until a .key file is added",
                        " or ".join(str(d) for d in (self.train_dir, self.infer_dir) if d is not None))

    def role(self, user_id: str) -> str | None:
        """TRAIN, INFER, or None for a key not (or no longer) allowed."""
        self._reload()
        return self._roles.get(user_id)

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's question for each CURVE handshake: let this (z85) key in?"""
        user_id = key.decode("ascii", "replace")
        if self.role(user_id) is not None:
            return True
        self.refused += 1
        log.warning("refused a CURVE handshake from key %s: not in the allow-list (%d refused so far)",
                    user_id, self.refused)
        return False

    def _reload(self) -> None:
        folders = [d for d in (self.infer_dir, self.train_dir) if d is not None]
        stamp = tuple(os.stat(d).st_mtime_ns for d in folders)
        if stamp == self._stamp:
            return
        roles: dict[str, str] = {}
        try:
            for folder, role in ((self.infer_dir, INFER), (self.train_dir, TRAIN)):  # train wins if in both
                if folder is not None:
                    roles.update({key.decode("ascii"): role for key in zmq.auth.load_certificates(str(folder))})
        except (OSError, ValueError) as exc:  # a half-written or foreign file: keep the keys we had
            log.error("cannot read the allow-list (%s); keeping the %d keys read before", exc, len(self._roles))
            return
        self._roles, self._stamp = roles, stamp


def start_authenticator(context: zmq.asyncio.Context, allow: AllowList | Mapping[str, AllowList]
                        ) -> AsyncioAuthenticator:
    """ZAP for the CURVE sockets of ``context``, answered by ``allow``; stop() it before the context ends.

    A mapping gives each ZAP domain its own list (a broker's edges and its
    replicas: sockets name theirs with ZAP_DOMAIN); one list answers all.
    """
    authenticator = AsyncioAuthenticator(context, log=logging.getLogger("sparse_rt.server.zap"))
    authenticator.start()
    for domain, keys in (allow.items() if isinstance(allow, Mapping) else [("*", allow)]):
        authenticator.configure_curve_callback(domain=domain, credentials_provider=keys)
    return authenticator
