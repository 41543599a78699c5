"""CURVE on real sockets: who an inbox and the client ROUTER let in, `fastserve keys`, and an ingress process."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import sys

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from common import sockets
from common.client import AsyncClient, RequestTimeout, Unavailable
from common.config import ConfigError, SecurityConfig
from common.curve import CLIENTS_DIR, ClientKeys, make_keys
from common.messages import Ready
from common.protocol import StatsQuery
from services import cli
from test_ingress_harness import bounded

QUIET_S = 0.5  # a refused peer's message must not arrive within this


@pytest.fixture
def keys_dir(tmp_path):
    folder = tmp_path / "keys"
    make_keys(folder)
    zmq.auth.create_certificates(folder / CLIENTS_DIR, "alice")  # a further client, allowed by its public key
    return folder


@pytest.fixture(autouse=True)
def plain_afterwards():
    """Every test leaves this process's sockets plain, as every other test expects them, however it ends."""
    yield
    sockets.secure(SecurityConfig())


@pytest.fixture
def secured(keys_dir):
    """This process with CURVE on; yields a list of sockets to close at the end."""
    sockets.secure(SecurityConfig(curve=True, keys_dir=str(keys_dir)))
    made: list = []
    yield made
    for sock in made:
        sock.close(linger=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_keys(server: bytes) -> ClientKeys:
    public, secret = zmq.curve_keypair()
    return ClientKeys(public, secret, server)


def raw_push(address: str, keys: ClientKeys | None, made: list) -> zmq.Socket:
    """A PUSH that is not one of the stack's: plain, or CURVE with keys of the test's choosing."""
    sock = sockets.context().socket(zmq.PUSH)
    sock.linger = 0
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys.server, keys.public, keys.secret
    sock.connect(address)
    made.append(sock)
    return sock


async def offer(sock, msg) -> None:
    """Send if ZeroMQ takes it: a DEALER whose handshake was refused has no pipe left, and a send would wait."""
    try:
        await asyncio.wait_for(sockets.send(sock, msg), QUIET_S)
    except asyncio.TimeoutError:
        pass


async def nothing_arrives(sock, recv=sockets.recv) -> bool:
    try:
        await asyncio.wait_for(recv(sock), QUIET_S)
    except asyncio.TimeoutError:
        return True
    return False


def bound(bind, secured: list, keys_dir):
    """(context, a socket `bind` made on a wildcard port, its address, the client keypair)."""
    ctx = sockets.context()
    sock = bind(ctx, "tcp://127.0.0.1:*")
    secured.append(sock)
    return ctx, sock, sockets.bound_address(sock), ClientKeys.load(keys_dir)


async def test_an_inbox_takes_only_the_stack_key(secured, keys_dir):
    ctx, inbox, address, client = bound(sockets.bind_inbox, secured, keys_dir)
    for keys in (None, random_keys(client.server), client):  # plain, unknown, and a client's (not an internal) key
        await offer(raw_push(address, keys, secured), Ready("forged", 0))
    assert await nothing_arrives(inbox)
    peer = sockets.connect_push(ctx, address)
    secured.append(peer)
    await sockets.send(peer, Ready("kvcache", -1))
    assert await bounded(sockets.recv(inbox)) == Ready("kvcache", -1)


async def test_the_client_router_takes_client_keys_and_refuses_others(secured, keys_dir):
    ctx, router, address, client = bound(sockets.bind_router, secured, keys_dir)
    alice = ClientKeys(*zmq.auth.load_certificate(keys_dir / CLIENTS_DIR / "alice.key_secret"), client.server)
    stranger = sockets.connect_dealer(ctx, address, random_keys(client.server))
    secured.append(stranger)
    await offer(stranger, StatsQuery("stranger"))
    assert await nothing_arrives(router, sockets.recv_routed)
    for name, keys in (("client", client), ("alice", alice), ("default", None)):  # None: the process's client keys
        dealer = sockets.connect_dealer(ctx, address, keys)
        secured.append(dealer)
        await sockets.send(dealer, StatsQuery(name))
        _, msg, _ = await bounded(sockets.recv_routed(router))
        assert msg == StatsQuery(name)


async def test_servers_must_live_where_the_authenticator_answers(secured):
    other = zmq.asyncio.Context()
    try:
        with pytest.raises(RuntimeError, match="sockets.context"):
            sockets.bind_inbox(other, "tcp://127.0.0.1:*")
    finally:
        other.term()


async def test_a_host_with_only_client_keys_connects_but_binds_no_inbox(tmp_path, keys_dir):
    folder = tmp_path / "client-only"
    folder.mkdir()
    for name in ("stack.key", "client.key", "client.key_secret"):
        (folder / name).write_bytes((keys_dir / name).read_bytes())
    sockets.secure(SecurityConfig(curve=True, keys_dir=str(folder)))
    sockets.connect_dealer(sockets.context(), "tcp://127.0.0.1:1").close(linger=0)
    with pytest.raises(ConfigError, match="stack.key_secret"):
        sockets.bind_inbox(sockets.context(), "tcp://127.0.0.1:*")


def test_fastserve_keys_writes_private_secrets_and_keeps_existing_ones(tmp_path, capsys):
    folder = tmp_path / "k"
    assert cli.main(["keys", str(folder)]) == 0
    for name in ("stack", "client"):
        assert stat.S_IMODE((folder / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / f"{name}.key").stat().st_mode) == 0o644
        public, secret = zmq.auth.load_certificate(folder / f"{name}.key_secret")
        assert zmq.curve_public(secret) == public == zmq.auth.load_certificate(folder / f"{name}.key")[0]
    assert (folder / CLIENTS_DIR).is_dir()
    before = (folder / "stack.key_secret").read_bytes()
    assert cli.main(["keys", str(folder)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (folder / "stack.key_secret").read_bytes() == before
    assert cli.main(["keys", str(folder), "--force"]) == 0
    assert (folder / "stack.key_secret").read_bytes() != before


async def test_an_ingress_process_answers_only_clients_with_keys(tmp_path, keys_dir):
    client_addr = f"tcp://127.0.0.1:{free_port()}"
    overrides = [f"endpoints.client={client_addr}", f"endpoints.ingress=tcp://127.0.0.1:{free_port()}",
                 f"endpoints.scheduler=tcp://127.0.0.1:{free_port()}", "model.path=tiny", "model.max_context=128",
                 "security.curve=true", f"security.keys_dir={keys_dir}"]
    args = [sys.executable, "-m", "services.ingress", *sum((["--set", o] for o in overrides), [])]
    proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)
    try:
        async with AsyncClient(client_addr, timeout=20, keys=ClientKeys.load(keys_dir)) as keyed:
            with pytest.raises(Unavailable):  # no scheduler: the stack is not ready, and ingress says so
                await keyed.stats()  # the request waits in the DEALER until the process has bound its port
        async with AsyncClient(client_addr, timeout=1) as plain:
            with pytest.raises(RequestTimeout):
                await plain.stats()
        stranger = random_keys(ClientKeys.load(keys_dir).server)
        async with AsyncClient(client_addr, timeout=1, keys=stranger) as refused:
            for _ in range(2):  # the second send finds the connection gone (refused): it still times out
                with pytest.raises(RequestTimeout):
                    await bounded(refused.stats())
        proc.send_signal(signal.SIGINT)
        assert await bounded(proc.wait(), 10) == 0  # the authenticator's thread does not hold the process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
