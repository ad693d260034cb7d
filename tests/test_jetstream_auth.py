"""Every auth mode of the address against a real server, and the failures that must be fast.

Each failure test asserts the message (what is wrong, what to check), the time it took (a few
seconds, never a reconnect loop) and that no secret appears in it.
"""

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import nkeys
import pytest

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream import JetStreamSource
from nilus_dagster.jetstream.local_server import LocalNatsServer, free_port
from nilus_dagster.manifest.address import NatsAddress, parse_nats_address

STREAM = "ORDERS"
SUBJECT = "orders.created"
PASSWORD = "pa55-Secret-Wd9x"
TOKEN = "tok-Secret-7hQz"

ServerFactory = Callable[..., LocalNatsServer]


def address(text: str, env: dict[str, str] | None = None) -> NatsAddress:
    parsed = parse_nats_address(text)
    return parsed.resolve(env or {}) if parsed.placeholders() else parsed


async def _prepare(url: str, count: int = 3, **connect: object) -> None:
    nc = await nats.connect(url, allow_reconnect=False, **connect)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["orders.>"])
        for i in range(count):
            await js.publish(SUBJECT, json.dumps({"i": i}).encode())
    finally:
        await nc.close()


def prepare(server: LocalNatsServer, **connect: object) -> None:
    """Create the stream and publish three messages, authenticating with ``connect``."""
    asyncio.run(_prepare(server.url, **connect))


def read_all(addr: NatsAddress, **kwargs: object) -> list[int]:
    async def go() -> list[int]:
        seqs: list[int] = []
        async with JetStreamSource(addr, STREAM, **kwargs) as source:  # type: ignore[arg-type]
            async for batch in source.messages(1):
                seqs.extend(batch.sequences)
        return seqs

    return asyncio.run(go())


def failure(addr: NatsAddress, **kwargs: object) -> tuple[str, float]:
    """Open a source that must fail: (message, seconds it took)."""
    began = time.monotonic()
    with pytest.raises(SourceError) as caught:
        read_all(addr, **kwargs)
    return str(caught.value), time.monotonic() - began


def assert_clean(message: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message


# -- user / password ---------------------------------------------------------------------------

USERS = f"""
authorization {{
  users = [
    {{ user: alice, password: "{PASSWORD}" }}
  ]
}}
"""


def test_user_password_from_placeholders_reads(nats_server_factory: ServerFactory) -> None:
    server = nats_server_factory(USERS)
    prepare(server, user="alice", password=PASSWORD)
    addr = address(
        f"nats+jetstream://{{NATS_USERNAME}}:{{NATS_PASSWORD}}@{server.hostport}?subject={SUBJECT}",
        {"NATS_USERNAME": "alice", "NATS_PASSWORD": PASSWORD},
    )
    assert read_all(addr) == [1, 2, 3]


def test_wrong_password_fails_fast_naming_the_variables(
    nats_server_factory: ServerFactory,
) -> None:
    server = nats_server_factory(USERS)
    wrong = "wrong-Secret-Pq81"
    addr = address(
        f"nats+jetstream://{{NATS_USERNAME}}:{{NATS_PASSWORD}}@{server.hostport}?subject={SUBJECT}",
        {"NATS_USERNAME": "alice", "NATS_PASSWORD": wrong},
    )
    message, seconds = failure(addr)
    assert message.startswith("authorization violation")
    assert "check NATS_USERNAME/NATS_PASSWORD" in message
    assert server.hostport in message
    assert seconds < 3
    assert_clean(message, wrong, PASSWORD)


def test_a_refused_password_is_not_retryable(nats_server_factory: ServerFactory) -> None:
    """A source recovering from a lost connection gives up at once on this, not after its
    reconnect budget: the decision is SourceError.retryable, not the message's wording."""
    server = nats_server_factory(USERS)
    with pytest.raises(SourceError) as caught:
        read_all(address(f"nats+jetstream://alice:wrong@{server.hostport}?subject={SUBJECT}"))
    assert str(caught.value).startswith("authorization violation")
    assert not caught.value.retryable


def test_literal_wrong_password_is_not_printed(nats_server_factory: ServerFactory) -> None:
    server = nats_server_factory(USERS)
    addr = address(f"nats+jetstream://alice:Lit3ral-Secret@{server.hostport}?subject={SUBJECT}")
    message, seconds = failure(addr)
    assert "authorization violation" in message
    assert "check the user name and password" in message
    assert seconds < 3
    assert_clean(message, "Lit3ral-Secret")


def test_no_credentials_on_a_server_that_wants_them(nats_server_factory: ServerFactory) -> None:
    server = nats_server_factory(USERS)
    message, seconds = failure(address(f"nats+jetstream://{server.hostport}?subject={SUBJECT}"))
    assert message.startswith("authorization violation")
    assert "requires credentials" in message
    assert "***" not in message
    assert seconds < 3


# -- token -------------------------------------------------------------------------------------

TOKEN_FORMS = {
    "userinfo": "nats+jetstream://{{NATS_TOKEN}}@{hostport}?subject=" + SUBJECT,
    "query": "nats+jetstream://{hostport}?subject=" + SUBJECT + "&token={{NATS_TOKEN}}",
}


@pytest.mark.parametrize("form", sorted(TOKEN_FORMS))
def test_token_in_either_form_reads(nats_server_factory: ServerFactory, form: str) -> None:
    server = nats_server_factory(f'authorization {{ token: "{TOKEN}" }}')
    prepare(server, token=TOKEN)
    text = TOKEN_FORMS[form].format(hostport=server.hostport)
    assert read_all(address(text, {"NATS_TOKEN": TOKEN})) == [1, 2, 3]


@pytest.mark.parametrize("form", sorted(TOKEN_FORMS))
def test_wrong_token_fails_fast(nats_server_factory: ServerFactory, form: str) -> None:
    server = nats_server_factory(f'authorization {{ token: "{TOKEN}" }}')
    wrong = "bad-Token-Secret-3"
    text = TOKEN_FORMS[form].format(hostport=server.hostport)
    message, seconds = failure(address(text, {"NATS_TOKEN": wrong}))
    assert message.startswith("authorization violation")
    assert "check NATS_TOKEN" in message
    assert seconds < 3
    assert_clean(message, wrong, TOKEN)


# -- nkeys -------------------------------------------------------------------------------------


def new_keys(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def nkey_server(factory: ServerFactory, user: nkeys.KeyPair) -> LocalNatsServer:
    return factory(f'authorization {{ users = [ {{ nkey: "{user.public_key.decode()}" }} ] }}')


def test_nkeys_seed_reads(nats_server_factory: ServerFactory) -> None:
    user = new_keys(nkeys.PREFIX_BYTE_USER)
    server = nkey_server(nats_server_factory, user)
    seed = user.seed.decode()
    prepare(server, nkeys_seed_str=seed)
    text = f"nats+jetstream://{server.hostport}?subject={SUBJECT}&nkeys_seed={{NATS_NKEYS_SEED}}"
    assert read_all(address(text, {"NATS_NKEYS_SEED": seed})) == [1, 2, 3]


def test_unknown_nkey_fails_fast(nats_server_factory: ServerFactory) -> None:
    server = nkey_server(nats_server_factory, new_keys(nkeys.PREFIX_BYTE_USER))
    other = new_keys(nkeys.PREFIX_BYTE_USER).seed.decode()
    text = f"nats+jetstream://{server.hostport}?subject={SUBJECT}&nkeys_seed={{NATS_NKEYS_SEED}}"
    message, seconds = failure(address(text, {"NATS_NKEYS_SEED": other}))
    assert message.startswith("authorization violation")
    assert "check NATS_NKEYS_SEED (the nkeys seed)" in message
    assert seconds < 3
    assert_clean(message, other)


def test_malformed_nkeys_seed_is_refused_before_connecting() -> None:
    bogus = "SUNOTAREALSEEDATALLXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
    text = f"nats+jetstream://127.0.0.1:{free_port()}?subject={SUBJECT}&nkeys_seed={{SEED}}"
    message, seconds = failure(address(text, {"SEED": bogus}))
    assert (
        message == "nkeys_seed is not a valid NKEYS seed (a user seed starts with 'SU'): check SEED"
    )
    assert seconds < 1
    assert_clean(message, bogus)


# -- credentials file (operator mode) ----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(subject: str, issuer: nkeys.KeyPair, name: str, claims: dict[str, object]) -> str:
    body: dict[str, object] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {"version": 2, **claims},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


NO_LIMITS = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


def operator_setup(folder: Path) -> tuple[str, Path, Path]:
    """(server config, a user's creds file, an unknown user's creds file) in operator mode."""
    operator = new_keys(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    op_jwt = _jwt(operator.public_key.decode(), operator, "op", {"type": "operator"})
    js_limits = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    acc_jwt = _jwt(
        account.public_key.decode(),
        operator,
        "app",
        {"type": "account", "limits": {**NO_LIMITS, **js_limits}},
    )
    sys_jwt = _jwt(
        system.public_key.decode(), operator, "SYS", {"type": "account", "limits": NO_LIMITS}
    )

    def creds(issuer: nkeys.KeyPair, name: str) -> Path:
        user = new_keys(nkeys.PREFIX_BYTE_USER)
        user_jwt = _jwt(
            user.public_key.decode(),
            issuer,
            name,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        path = folder / f"{name}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        return path

    acc, sys_ = account.public_key.decode(), system.public_key.decode()
    config = (
        f'operator: "{op_jwt}"\nresolver: MEMORY\nsystem_account: {sys_}\n'
        f'resolver_preload: {{ {acc}: "{acc_jwt}", {sys_}: "{sys_jwt}" }}\n'
    )
    # A user signed by an account the server does not know.
    stranger = creds(new_keys(nkeys.PREFIX_BYTE_ACCOUNT), "stranger")
    return config, creds(account, "app"), stranger


def test_creds_file_reads_in_operator_mode(
    nats_server_factory: ServerFactory, tmp_path: Path
) -> None:
    config, creds, _ = operator_setup(tmp_path)
    server = nats_server_factory(config)
    prepare(server, user_credentials=str(creds))
    text = f"nats+jetstream://{server.hostport}?subject={SUBJECT}&creds={{NATS_CREDS}}"
    assert read_all(address(text, {"NATS_CREDS": str(creds)})) == [1, 2, 3]


def test_creds_of_an_unknown_account_fail_fast(
    nats_server_factory: ServerFactory, tmp_path: Path
) -> None:
    config, _, stranger = operator_setup(tmp_path)
    server = nats_server_factory(config)
    seed = stranger.read_text().split("SEED-----\n")[1].split("\n")[0]
    message, seconds = failure(
        address(f"nats+jetstream://{server.hostport}?subject={SUBJECT}&creds={stranger}")
    )
    assert message.startswith("authorization violation")
    assert f"check the credentials file {stranger}" in message
    assert seconds < 3
    assert_clean(message, seed)


def test_missing_creds_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.creds"
    text = f"nats+jetstream://127.0.0.1:{free_port()}?subject={SUBJECT}&creds={missing}"
    message, seconds = failure(address(text))
    assert message == f"creds file {missing} does not exist (or is not a file)"
    assert seconds < 1


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    folder = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=nilus test CA",
        cwd=folder,
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "req",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=nilus {name}",
            cwd=folder,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=folder,
        )
    return folder


def tls_config(certs: Path, *, verify: bool) -> str:
    return (
        f'tls {{ cert_file: "{certs / "server.pem"}", key_file: "{certs / "server.key"}", '
        f'ca_file: "{certs / "ca.pem"}", verify: {str(verify).lower()}, timeout: 2 }}'
    )


def _tls_connect(certs: Path, client: bool) -> dict[str, object]:
    import ssl

    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client:
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return {"tls": context}


def test_tls_with_a_ca_reads(nats_server_factory: ServerFactory, certs: Path) -> None:
    server = nats_server_factory(tls_config(certs, verify=False))
    asyncio.run(_prepare(f"tls://{server.hostport}", **_tls_connect(certs, client=False)))
    text = f"nats+jetstream://{server.hostport}?subject={SUBJECT}&tls_ca={certs / 'ca.pem'}"
    assert read_all(address(text)) == [1, 2, 3]


def test_tls_without_the_ca_says_how_to_fix(
    nats_server_factory: ServerFactory, certs: Path
) -> None:
    server = nats_server_factory(tls_config(certs, verify=False))
    message, seconds = failure(
        address(f"nats+jetstream://{server.hostport}?subject={SUBJECT}&tls=true")
    )
    assert message.startswith(f"TLS with NATS at {server.hostport} failed")
    assert "certificate verify failed" in message
    assert "set tls_ca" in message
    assert seconds < 3


def test_tls_client_certificate(nats_server_factory: ServerFactory, certs: Path) -> None:
    server = nats_server_factory(tls_config(certs, verify=True))
    asyncio.run(_prepare(f"tls://{server.hostport}", **_tls_connect(certs, client=True)))
    base = f"nats+jetstream://{server.hostport}?subject={SUBJECT}&tls_ca={certs / 'ca.pem'}"
    with_cert = f"{base}&tls_cert={certs / 'client.pem'}&tls_key={certs / 'client.key'}"
    assert read_all(address(with_cert)) == [1, 2, 3]
    message, seconds = failure(address(base))
    assert message.startswith(f"TLS with NATS at {server.hostport} failed")
    # The TLS alert, or (TLS 1.3) a reset right after the handshake, depending on timing.
    assert "set tls_cert and tls_key" in message or "check tls_cert and tls_key" in message
    assert seconds < 3


def test_plain_client_against_a_tls_server(nats_server_factory: ServerFactory, certs: Path) -> None:
    server = nats_server_factory(tls_config(certs, verify=False))
    message, seconds = failure(address(f"nats+jetstream://{server.hostport}?subject={SUBJECT}"))
    # The server asks for TLS, so the client tries it, and cannot trust the server's certificate.
    assert message.startswith(f"TLS with NATS at {server.hostport} failed")
    assert "set tls_ca" in message
    assert seconds < 3


# -- unreachable servers -----------------------------------------------------------------------


def test_server_down_fails_fast() -> None:
    port = free_port()
    addr = address(
        f"nats+jetstream://{{NATS_USERNAME}}:{{NATS_PASSWORD}}@127.0.0.1:{port}?subject={SUBJECT}",
        {"NATS_USERNAME": "u", "NATS_PASSWORD": PASSWORD},
    )
    message, seconds = failure(addr)
    assert message.startswith(f"cannot reach NATS at 127.0.0.1:{port}: connection refused")
    assert seconds < 3
    assert_clean(message, PASSWORD)


def test_servers_override_replaces_the_address_hosts(nats_server: LocalNatsServer) -> None:
    dead = free_port()
    addr = address(f"nats+jetstream://127.0.0.1:{dead}?subject={SUBJECT}")
    message, _ = failure(addr)
    assert f"127.0.0.1:{dead}" in message

    async def go() -> str:
        async with JetStreamSource(addr, "ANY", servers=[nats_server.url]) as source:
            return source.hosts

    assert asyncio.run(go()) == nats_server.hostport


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says anything (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_silent_server_fails_within_the_connect_timeout(silent_port: int) -> None:
    addr = address(f"nats+jetstream://127.0.0.1:{silent_port}?subject={SUBJECT}")
    message, seconds = failure(addr, connect_timeout=1.0)
    assert message.startswith(f"cannot reach NATS at 127.0.0.1:{silent_port}: no answer within 1s")
    assert seconds < 2.5
