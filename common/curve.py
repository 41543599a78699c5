"""CURVE keys on disk (what `fastserve keys` writes) and the ZAP authenticator that says who may connect.

A keys directory holds ZeroMQ certificate files (`NAME.key` public, `NAME.key_secret` secret):

    stack.key, stack.key_secret    every internal socket of the stack, servers and clients alike
    client.key, client.key_secret  the client library, the HTTP front door, the load-test driver
    clients/*.key                  further client public keys the client ROUTER accepts

Every server socket presents the stack keypair, so the stack's public key is the one server key every
peer needs. Which client keys a server accepts depends on its ZAP domain: internal inboxes only the stack
key (a client key cannot forge an internal message), the client ROUTER the client keys and the stack key.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.config import ConfigError

STACK = "stack"  # keypair name of the stack's own sockets
CLIENT = "client"  # keypair name of the clients
CLIENTS_DIR = "clients"  # subfolder of further allowed client public keys
PUBLIC, SECRET = ".key", ".key_secret"  # ZeroMQ's (and czmq's) certificate file suffixes

STACK_DOMAIN = "stack"  # ZAP domain of internal inboxes: the stack key only
CLIENT_DOMAIN = "clients"  # ZAP domain of the client ROUTER: client keys and the stack key


@dataclass(frozen=True)
class ClientKeys:
    """The keys of one CURVE client socket: its own keypair and the server's public key (z85, 40 bytes each)."""

    public: bytes
    secret: bytes
    server: bytes  # the stack's public key: every server of the stack presents it

    @classmethod
    def load(cls, keys_dir: str | Path, name: str = CLIENT) -> "ClientKeys":
        """The `name` keypair of a keys directory and its stack's public key."""
        public, secret = read_keypair(keys_dir, name)
        return cls(public, secret, read_public(Path(keys_dir) / f"{STACK}{PUBLIC}"))


def client_keys(security: Any) -> ClientKeys | None:
    """The client keys a config's [security] section asks for; None when CURVE is off."""
    return ClientKeys.load(security.keys_dir) if security.curve else None


@dataclass(frozen=True)
class StackKeys:
    """What a process of the stack loads from its keys directory."""

    public: bytes  # the stack's public key
    secret: bytes | None  # None where only client keys are kept (a front door apart from the stack): no internal sockets
    client: ClientKeys | None  # for this process's DEALERs; None when the directory has no client keypair
    clients: frozenset[bytes]  # client public keys the client ROUTER accepts

    @classmethod
    def load(cls, keys_dir: str | Path) -> "StackKeys":
        folder = Path(keys_dir)
        public = read_public(folder / f"{STACK}{PUBLIC}")
        secret = read_keypair(folder, STACK)[1] if (folder / f"{STACK}{SECRET}").is_file() else None
        client = ClientKeys.load(folder) if (folder / f"{CLIENT}{SECRET}").is_file() else None
        extra = sorted((folder / CLIENTS_DIR).glob(f"*{PUBLIC}"))
        clients = {read_public(p) for p in extra} | ({client.public} if client else set())
        return cls(public, secret, client, frozenset(clients))

    def internal(self) -> ClientKeys:
        """The keys of an internal client socket (a PUSH to a peer's inbox): the stack keypair."""
        if self.secret is None:
            raise ConfigError(f"this process makes internal sockets but its keys directory has no {STACK}{SECRET}; "
                              "give it the stack keypair (only clients may go without it)")
        return ClientKeys(self.public, self.secret, self.public)


def read_public(path: Path) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CURVE public key {str(path)!r} ({e}); make keys with `fastserve keys DIR`") from None


def read_keypair(keys_dir: str | Path, name: str) -> tuple[bytes, bytes]:
    path = Path(keys_dir) / f"{name}{SECRET}"
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CURVE keypair {str(path)!r} ({e}); make keys with `fastserve keys DIR`") from None
    if secret is None:
        raise ConfigError(f"{str(path)!r} holds no secret key; it must be the {SECRET} file `fastserve keys` wrote")
    return public, secret


class _Allowed:
    """A ZAP credentials provider: pyzmq calls callback(domain, z85 key) in the authenticator's thread."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_authenticator(ctx: zmq.Context, keys: StackKeys) -> ThreadAuthenticator:
    """The ZAP handler of `ctx`. A thread rather than an asyncio task: it answers handshakes from the
    moment it starts, before any event loop runs, and whatever loop the process runs later."""
    auth = ThreadAuthenticator(ctx)
    auth.configure_curve_callback(STACK_DOMAIN, _Allowed(frozenset({keys.public})))
    auth.configure_curve_callback(CLIENT_DOMAIN, _Allowed(keys.clients | {keys.public}))
    auth.start()
    return auth


def make_keys(keys_dir: str | Path, force: bool = False) -> list[Path]:
    """Write the stack and client keypairs (secret files 0600) and an empty clients/ folder; returns the
    files written. Existing key files are kept (FileExistsError) unless `force`."""
    folder = Path(keys_dir)
    targets = [folder / f"{name}{suffix}" for name in (STACK, CLIENT) for suffix in (PUBLIC, SECRET)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --force to replace them "
                              "(every process and client holding the old keys must then get the new ones)")
    (folder / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    # Written in a private (0700) folder and moved into place: a secret is never readable by others, even
    # for the moment between its creation and its chmod.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for name in (STACK, CLIENT):
            public, secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(public, 0o644)
            os.chmod(secret, 0o600)
            os.replace(public, folder / f"{name}{PUBLIC}")
            os.replace(secret, folder / f"{name}{SECRET}")
    return targets
