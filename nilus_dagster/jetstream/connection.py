"""Connecting to NATS: every auth mode of the address, bounded attempts, errors that say why.

nats-py keeps reconnecting on a wrong password or an unreachable server unless told otherwise,
so connections here are made with ``allow_reconnect=False`` and an overall deadline; the source
reconnects by itself, within its own time budget, when a connection is lost later.
"""

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream.errors import (
    NATS_CONNECTION_GONE,
    ConnectionLost,
    JsApiError,
    NoResponders,
    PermissionViolation,
    RequestTimeout,
    parse_violation,
)
from nilus_dagster.manifest.address import NatsAddress, parse_nats_address
from nilus_dagster.manifest.placeholders import placeholders_in
from nilus_dagster.redaction import redact, register_secret

DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
"""Seconds for one connection attempt (and one API request) unless told otherwise."""


def server_urls(address: NatsAddress, servers: Sequence[str] | None = None) -> list[str]:
    """``nats://``/``tls://`` URLs for ``servers`` (a deployment override) or the address's.

    Items may be ``host:port`` or URLs; ``nats+jetstream://`` URLs are accepted too.
    """
    tls = address.tls or bool(address.tls_ca or address.tls_cert)
    scheme = "tls" if tls else "nats"
    urls = []
    for item in servers or address.servers:
        item = item.strip()
        if not item:
            continue
        if "://" in item:
            given, rest = item.split("://", 1)
            rest = rest.split("?", 1)[0].rstrip("/")
            urls.append(f"{scheme if given.lower() == 'nats+jetstream' else given}://{rest}")
        else:
            urls.append(f"{scheme}://{item}")
    if not urls:
        raise SourceError("no NATS server to connect to: the address lists no host")
    return urls


def hosts_text(urls: Sequence[str]) -> str:
    """``host:port`` of each URL, credentials dropped: for messages."""
    hosts = []
    for url in urls:
        rest = url.split("://", 1)[-1]
        hosts.append(rest.rsplit("@", 1)[-1])
    return ", ".join(hosts)


def _unresolved(address: NatsAddress) -> NatsAddress | None:
    # The address as written (placeholders kept): the resolved one no longer knows them.
    if not address.raw:
        return None
    try:
        return parse_nats_address(address.raw)
    except ValueError:
        return None


def credential_names(address: NatsAddress) -> str:
    """What a person should check when the server refuses the credentials."""
    written = _unresolved(address)
    mode = address.auth_mode

    def names(*values: str | None) -> list[str]:
        found: list[str] = []
        for value in values:
            found.extend(placeholders_in(value))
        return list(dict.fromkeys(found))

    if mode == "user/password":
        used = names(written.user, written.password) if written else []
        return f"check {'/'.join(used)}" if used else "check the user name and password"
    if mode == "token":
        used = names(written.token) if written else []
        return f"check {'/'.join(used)} (the token)" if used else "check the token"
    if mode == "nkeys":
        used = names(written.nkeys_seed) if written else []
        what = f"{'/'.join(used)} (the nkeys seed)" if used else "the nkeys seed"
        return f"check {what}: its public key must be a user the server knows"
    if mode == "creds":
        return f"check the credentials file {address.creds}"
    return (
        "the server requires credentials: add them to the address "
        "(user:password@host, or the token, nkeys_seed or creds option)"
    )


def _check_file(option: str, path: str) -> None:
    # Retryable: a mounted secret that is being replaced is back a moment later.
    if not os.path.isfile(path):
        raise SourceError(f"{option} file {path} does not exist (or is not a file)", retryable=True)
    if not os.access(path, os.R_OK):
        raise SourceError(f"{option} file {path} is not readable", retryable=True)


def tls_context(address: NatsAddress) -> ssl.SSLContext | None:
    """An SSL context for the address's TLS options, or ``None`` when it uses none."""
    if not (address.tls or address.tls_ca or address.tls_cert):
        return None
    if address.tls_ca:
        _check_file("tls_ca", address.tls_ca)
    for option, path in (("tls_cert", address.tls_cert), ("tls_key", address.tls_key)):
        if path:
            _check_file(option, path)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=address.tls_ca)
        if address.tls_cert and address.tls_key:
            context.load_cert_chain(address.tls_cert, address.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise SourceError(
            redact(f"cannot load the TLS files of the address: {exc}"), retryable=True
        ) from None
    return context


def connect_options(address: NatsAddress) -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for the address's credentials and TLS.

    Credentials are passed as options, never inside server URLs, so no URL carries a secret.
    """
    options: dict[str, Any] = {}
    for secret in (address.password, address.token, address.nkeys_seed):
        register_secret(secret)
    if address.creds:
        _check_file("creds", address.creds)
        options["user_credentials"] = address.creds
    elif address.nkeys_seed:
        seed = address.nkeys_seed.strip()
        try:
            import nkeys

            nkeys.from_seed(seed.encode())
        except ModuleNotFoundError:
            raise SourceError(
                "nkeys_seed needs the nkeys package: pip install 'nats-py[nkeys]'"
            ) from None
        except Exception:
            written = _unresolved(address)
            names = placeholders_in(written.nkeys_seed) if written else []
            where = f": check {'/'.join(names)}" if names else ""
            raise SourceError(
                f"nkeys_seed is not a valid NKEYS seed (a user seed starts with 'SU'){where}"
            ) from None
        options["nkeys_seed_str"] = seed
    elif address.token:
        options["token"] = address.token
    elif address.user is not None:
        options["user"] = address.user
        options["password"] = address.password or ""
    context = tls_context(address)
    if context is not None:
        options["tls"] = context
    return options


class Link:
    """One nats-py connection and what the server told it (closure, permission refusals).

    Requests made through :meth:`request` fail fast with :class:`PermissionViolation` when the
    server refuses them, instead of waiting for their timeout.
    """

    def __init__(self, urls: Sequence[str], request_timeout: float):
        self.urls = list(urls)
        self.hosts = hosts_text(urls)
        self.request_timeout = request_timeout
        self.nc: Client = Client()
        self.errors: list[BaseException] = []
        self.violations: list[PermissionViolation] = []
        self.closed = asyncio.Event()
        self._listeners: set[Callable[[str, BaseException | None], None]] = set()
        self._changed = asyncio.Event()

    # nats-py callbacks ---------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(exc)
        violation = parse_violation(str(exc))
        if violation is not None:
            self.violations.append(violation)
            self._notify("violation", violation)

    async def _on_closed(self) -> None:
        self.closed.set()
        self._notify("closed", self.nc.last_error)

    def _notify(self, what: str, detail: BaseException | None) -> None:
        self._changed.set()
        for listener in list(self._listeners):
            listener(what, detail)

    def listen(self, listener: Callable[[str, BaseException | None], None]) -> None:
        """Call ``listener(what, detail)`` on ``closed`` and ``violation`` events."""
        self._listeners.add(listener)

    def unlisten(self, listener: Callable[[str, BaseException | None], None]) -> None:
        """Stop calling ``listener``."""
        self._listeners.discard(listener)

    @property
    def is_open(self) -> bool:
        """Whether the connection is up (not closed, by us or by nats-py)."""
        return not self.nc.is_closed and not self.closed.is_set()

    @property
    def server_version(self) -> tuple[int, int, int]:
        """The connected server's version, ``(major, minor, patch)``."""
        version = self.nc.connected_server_version
        return (version.major, version.minor, version.patch)

    # connecting ----------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], *, connect_timeout: float, name: str) -> None:
        """Connect once, without nats-py's own reconnect loop, within a bounded time."""
        attempt = self.nc.connect(
            self.urls,
            name=name,
            error_cb=self._on_error,
            closed_cb=self._on_closed,
            allow_reconnect=False,
            # nats-py tries every server twice even so; keep the pause between tries short.
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            connect_timeout=connect_timeout,
            dont_randomize=True,
            **options,
        )
        # One attempt per server is what we want; the second try nats-py makes is cut short.
        bound = connect_timeout * len(self.urls) + 0.5
        try:
            await asyncio.wait_for(attempt, bound)
        except BaseException:
            await self.close(timeout=0.2)
            raise

    async def close(self, timeout: float = 2.0) -> None:
        """Close the connection, within ``timeout``.

        Bounded: nats-py can wait forever for a socket whose TLS handshake failed to close.
        """
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(self.nc.close(), timeout)

    # requests -------------------------------------------------------------------------------

    async def request(
        self, subject: str, payload: bytes = b"", timeout: float | None = None
    ) -> Msg:
        """A request that fails fast on a permission refusal or a closed connection.

        Raises:
            PermissionViolation: The server refused to let us publish the request or subscribe
                to the reply inbox.
            NoResponders: Nobody listens on ``subject``.
            RequestTimeout: No answer in time.
            ConnectionLost: The connection is (or became) closed.
        """
        timeout = self.request_timeout if timeout is None else timeout
        if not self.is_open:
            raise ConnectionLost(f"the connection to NATS at {self.hosts} is closed")
        for violation in self.violations:
            # nats-py reuses one reply subscription for every request: once refused, it stays
            # refused, and every answer would be lost.
            if violation.on_inbox:
                raise violation
        seen = len(self.violations)
        task = asyncio.ensure_future(self.nc.request(subject, payload, timeout=timeout))
        while not task.done():
            self._changed.clear()
            watcher = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            for violation in self.violations[seen:]:
                if violation.on_inbox:
                    task.cancel()
                    raise violation
                if violation.kind == "publish" and violation.about(subject):
                    task.cancel()
                    raise PermissionViolation("publish", subject)
            seen = len(self.violations)
            if not task.done() and not self.is_open:
                task.cancel()
                raise ConnectionLost(f"the connection to NATS at {self.hosts} closed")
        try:
            return task.result()
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            if not self.is_open:
                raise ConnectionLost(f"the connection to NATS at {self.hosts} closed") from None
            raise RequestTimeout(subject, timeout) from None
        except (*NATS_CONNECTION_GONE, asyncio.CancelledError):
            raise ConnectionLost(f"the connection to NATS at {self.hosts} closed") from None

    async def api(
        self, subject: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """A JetStream API request; returns the JSON answer.

        Raises:
            JsApiError: The API answered with an error.
            PermissionViolation, NoResponders, RequestTimeout, ConnectionLost: see
                :meth:`request`.
        """
        payload = json.dumps(body).encode() if body is not None else b""
        msg = await self.request(subject, payload, timeout)
        try:
            answer = json.loads(msg.data)
        except ValueError:
            raise JsApiError(subject, 500, 0, f"unreadable answer {msg.data[:80]!r}") from None
        error = answer.get("error")
        if error:
            raise JsApiError(
                subject,
                int(error.get("code", 0) or 0),
                int(error.get("err_code", 0) or 0),
                str(error.get("description", "")),
            )
        return answer

    async def check_subscribe(self, subject: str, timeout: float | None = None) -> None:
        """Subscribe to ``subject`` and back out, raising if the server refuses it.

        Raises:
            PermissionViolation: The user may not subscribe to ``subject``.
        """
        seen = len(self.violations)
        try:
            sub = await self.nc.subscribe(subject)
        except NATS_CONNECTION_GONE:
            raise ConnectionLost(f"the connection to NATS at {self.hosts} closed") from None
        try:
            # A round trip normally brings any -ERR the SUB caused before its PONG; nats-server
            # 2.9 sometimes sends it just after, so make a second one.
            for _ in range(2):
                await self.nc.flush(timeout=timeout or self.request_timeout)
                if len(self.violations) > seen:
                    break
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise RequestTimeout("PING", timeout or self.request_timeout) from None
        except NATS_CONNECTION_GONE:
            raise ConnectionLost(f"the connection to NATS at {self.hosts} closed") from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await asyncio.sleep(0)
        for violation in self.violations[seen:]:
            if violation.kind == "subscribe" and violation.about(subject):
                raise PermissionViolation("subscribe", subject)


_DROPPED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def connect_failure(
    exc: BaseException, link: Link, address: NatsAddress, connect_timeout: float
) -> SourceError:
    """Why a connection attempt failed, in words a person can act on (no secrets).

    Refused credentials, TLS and a missing nkeys package are not retryable; a server that
    cannot be reached is (it may be restarting).
    """
    seen = [*link.errors, exc]
    # The distinct errors, first one first (nats-py reports the same one per attempt).
    shown = " | ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in seen))
    # nats-py raises some refusals as plain errors: their text is all there is to go on.
    refused = _refusal_text(exc, seen, shown, link.hosts, address)
    if refused is not None:
        return SourceError(redact(refused))
    return SourceError(
        redact(_unreachable_text(exc, seen, shown, link.hosts, connect_timeout)), retryable=True
    )


def _refusal_text(
    exc: BaseException,
    seen: list[BaseException],
    shown: str,
    hosts: str,
    address: NatsAddress,
) -> str | None:
    """What the server or the client refused (credentials, TLS), or ``None``."""
    texts = shown.lower()
    uses_tls = address.tls or bool(address.tls_ca or address.tls_cert)
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in texts:
        return f"authorization violation at {hosts}: {credential_names(address)}"
    if "authentication expired" in texts or "authentication revoked" in texts:
        return f"the credentials were refused at {hosts} ({shown}): {credential_names(address)}"
    if "user authentication" in texts:
        return f"authorization violation at {hosts}: {credential_names(address)}"
    if isinstance(exc, ModuleNotFoundError) and "nkeys" in str(exc):
        return "nkeys_seed and creds need the nkeys package: pip install 'nats-py[nkeys]'"
    if any(isinstance(e, ssl.SSLError) for e in seen) or "ssl" in texts or "tls" in texts:
        detail = next((str(e) for e in seen if isinstance(e, ssl.SSLError)), shown)
        lowered = detail.lower()
        if "certificate verify failed" in lowered:
            hint = "set tls_ca to the CA that signed the server certificate"
        elif "certificate required" in lowered or "handshake failure" in lowered:
            hint = "the server wants a client certificate: set tls_cert and tls_key"
        else:
            hint = "check tls, tls_ca, tls_cert and tls_key in the address and the server's TLS"
            hint += " settings"
        return f"TLS with NATS at {hosts} failed ({detail}): {hint}"
    if uses_tls and any(isinstance(e, _DROPPED) for e in seen):
        # With TLS 1.3 a server that rejects the client certificate may just drop the
        # connection after the handshake; the client sees a reset or, when it was writing
        # at that moment, a broken pipe.
        return (
            f"TLS with NATS at {hosts} failed (the server dropped the connection after the "
            "handshake): the server may want a client certificate, or refuse the one given: "
            "check tls_cert and tls_key"
        )
    return None


def _unreachable_text(
    exc: BaseException,
    seen: list[BaseException],
    shown: str,
    hosts: str,
    connect_timeout: float,
) -> str:
    """Why the server could not be reached."""
    texts = shown.lower()
    if any(isinstance(e, socket.gaierror) for e in seen):
        return f"cannot reach NATS at {hosts}: the host name does not resolve; check the address"
    if any(isinstance(e, ConnectionRefusedError) for e in seen) or "refused" in texts:
        return (
            f"cannot reach NATS at {hosts}: connection refused; is nats-server running "
            "there, and are host and port right?"
        )
    if isinstance(exc, asyncio.TimeoutError) or any(
        isinstance(e, asyncio.TimeoutError | TimeoutError) for e in seen
    ):
        return (
            f"cannot reach NATS at {hosts}: no answer within {connect_timeout:g}s; check host, "
            "port and firewalls"
        )
    if isinstance(exc, OSError | nats.errors.NoServersError):
        return f"cannot reach NATS at {hosts}: {shown}"
    return f"cannot connect to NATS at {hosts}: {shown}"


async def connect(
    address: NatsAddress,
    urls: Sequence[str],
    *,
    connect_timeout: float,
    request_timeout: float,
    name: str,
) -> Link:
    """Open a connection, or raise :class:`SourceError` saying why not (within seconds)."""
    options = connect_options(address)
    link = Link(urls, request_timeout)
    try:
        await link.open(options, connect_timeout=connect_timeout, name=name)
    except (Exception, asyncio.TimeoutError) as exc:
        raise connect_failure(exc, link, address, connect_timeout) from None
    return link
