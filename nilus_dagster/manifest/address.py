"""Parsing of ``nats+jetstream://`` source addresses and sink addresses.

Addresses are parsed once, at load time, with their ``{PLACEHOLDER}`` tokens left in place; the
tokens are filled component by component at run time (:meth:`NatsAddress.resolve`), so a password
holding ``@`` or ``/`` never breaks the parse and no secret is read before a run needs it.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from difflib import get_close_matches
from typing import Literal
from urllib.parse import parse_qsl, unquote

from nilus_dagster.manifest.placeholders import fill, placeholders_in
from nilus_dagster.manifest.postgres_url import POSTGRES_SCHEMES, PostgresUrl, parse_postgres_url
from nilus_dagster.redaction import register_secret

NATS_SCHEME = "nats+jetstream"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 4222
DEFAULT_BATCH_SIZE = 100
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_FAILOVER_TIMEOUT_SECONDS = 30.0

AckPolicy = Literal["none", "all", "explicit"]
PayloadFormat = Literal["json", "raw"]

NATS_OPTIONS: dict[str, str] = {
    "subject": "NATS subject the consumer filters on (required)",
    "durable": "durable consumer name",
    "batch_size": "messages per pull (default 100)",
    "timeout": "seconds to wait for a pull to fill, and the sensor interval (default 10)",
    "failover_timeout": "seconds a run waits for NATS to come back (a new stream leader, "
    "another server) before it fails (default 30)",
    "start_sequence": "stream sequence of the first run (default: the beginning)",
    "start_time": "ISO-8601 time of the first run",
    "ack_policy": "none | all | explicit (default none)",
    "format": "json | raw (default json)",
    "token": "static token",
    "nkeys_seed": "NKEYS user seed",
    "creds": "path of a NATS credentials file",
    "tls": "true to require TLS",
    "tls_ca": "path of the CA certificate",
    "tls_cert": "path of the client certificate",
    "tls_key": "path of the client key",
}


class AddressError(ValueError):
    """A problem in one part of an address; ``part`` names it (``batch_size``, ``host``…)."""

    def __init__(self, part: str, message: str):
        self.part = part
        super().__init__(message)


@dataclass(frozen=True)
class NatsAddress:
    """A parsed ``nats+jetstream://`` address.

    Credential fields hold the text as written (often a ``{PLACEHOLDER}``); call
    :meth:`resolve` at run time to fill them.
    """

    servers: tuple[str, ...]
    subject: str
    durable: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT_SECONDS
    start_sequence: int | None = None
    start_time: datetime | None = None
    ack_policy: AckPolicy = "none"
    format: PayloadFormat = "json"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkeys_seed: str | None = field(default=None, repr=False)
    creds: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    raw: str = field(default="", compare=False, repr=False)

    @property
    def auth_mode(self) -> str:
        """``user/password``, ``token``, ``nkeys``, ``creds`` or ``none``."""
        if self.creds:
            return "creds"
        if self.nkeys_seed:
            return "nkeys"
        if self.token:
            return "token"
        if self.user is not None:
            return "user/password"
        return "none"

    def placeholders(self) -> list[str]:
        """Names of every ``{PLACEHOLDER}`` the address needs at run time."""
        names: list[str] = []
        for value in (
            *self.servers,
            self.user,
            self.password,
            self.token,
            self.nkeys_seed,
            self.creds,
            self.tls_ca,
            self.tls_cert,
            self.tls_key,
        ):
            names.extend(placeholders_in(value))
        return list(dict.fromkeys(names))

    def resolve(self, env: Mapping[str, str], *, where: str = "source.address") -> "NatsAddress":
        """Return a copy with every placeholder filled from ``env``.

        Secret parts (password, token, seed) are registered for redaction as they are filled.

        Raises:
            PlaceholderError: A placeholder has no value in ``env``.
        """

        def opt(value: str | None, secret: bool = False) -> str | None:
            if value is None:
                return None
            return fill(value, env, where=where, secret=secret)

        resolved = replace(
            self,
            servers=tuple(fill(s, env, where=where) for s in self.servers),
            user=opt(self.user),
            password=opt(self.password, secret=True),
            token=opt(self.token, secret=True),
            nkeys_seed=opt(self.nkeys_seed, secret=True),
            creds=opt(self.creds),
            tls_ca=opt(self.tls_ca),
            tls_cert=opt(self.tls_cert),
            tls_key=opt(self.tls_key),
        )
        for secret in (resolved.password, resolved.token, resolved.nkeys_seed):
            register_secret(secret)
        return resolved

    def redacted(self) -> str:
        """The address as written, safe to show: secrets masked, placeholders kept."""
        from nilus_dagster.redaction import redact

        return redact(self.raw)


def _parse_positive_int(part: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise AddressError(part, f"must be a positive whole number, got {value!r}") from None
    if number <= 0:
        raise AddressError(part, f"must be a positive whole number, got {value!r}")
    return number


def _parse_positive_float(part: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise AddressError(part, f"must be a positive number of seconds, got {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise AddressError(part, f"must be a positive number of seconds, got {value!r}")
    return number


def _parse_time(part: str, value: str) -> datetime:
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        # Converting can leave the calendar (0001-01-01T00:00+01:00): same message.
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise AddressError(
            part, f"must be an ISO-8601 time such as 2025-01-31T00:00:00Z, got {value!r}"
        ) from None


def _parse_bool(part: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise AddressError(part, f"must be true or false, got {value!r}")


def _split_servers(hostlist: str) -> tuple[str, ...]:
    servers = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise AddressError("host", "has an empty entry in the comma-separated server list")
        if item.startswith("["):  # IPv6 literal
            end = item.find("]")
            if end < 0:
                raise AddressError("host", f"has an unclosed IPv6 bracket in {item!r}")
            host, rest = item[: end + 1], item[end + 1 :]
            if rest and not rest.startswith(":"):
                raise AddressError("host", f"{item!r} is not [IPv6]:port")
            port = rest[1:]
        elif item.count(":") == 1:
            host, port = item.split(":")
        elif ":" in item:
            raise AddressError("host", f"{item!r} is not host:port")
        else:
            host, port = item, ""
        host = host or DEFAULT_HOST
        if port == "":
            port_text = str(DEFAULT_PORT)
        elif placeholders_in(port) and port.startswith("{") and port.endswith("}"):
            port_text = port
        else:
            number = int(port) if port.isascii() and port.isdigit() else 0
            if not 0 < number < 65536:
                raise AddressError("port", f"must be a number from 1 to 65535, got {port!r}")
            port_text = str(number)
        if any(c in host for c in " /?#"):
            raise AddressError("host", f"{host!r} is not a valid host name")
        servers.append(f"{host}:{port_text}")
    return tuple(servers)


def _check_subject(subject: str) -> None:
    # The server accepts a bad filter subject and then matches nothing: refuse it here.
    tokens = subject.split(".")
    bad = (
        any(c.isspace() for c in subject)
        or any(not t for t in tokens)
        or any(("*" in t or ">" in t) and len(t) > 1 for t in tokens)
        or ">" in tokens[:-1]
    )
    if bad:
        raise AddressError(
            "subject",
            f"{subject!r} is not a valid NATS subject: dot-separated non-empty tokens without "
            "spaces, '*' as a whole token, '>' only as the last token (e.g. orders.created)",
        )


def _suggest(key: str, known: list[str]) -> str:
    close = get_close_matches(key, known, n=1)
    return f"did you mean {close[0]}? " if close else ""


def parse_nats_address(raw: str) -> NatsAddress:
    """Parse a ``nats+jetstream://`` address.

    Args:
        raw: The address as written in the manifest, placeholders included.

    Returns:
        The parsed address, with defaults filled in.

    Raises:
        AddressError: The first problem found; ``part`` names the offending part.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise AddressError("address", "is empty: write nats+jetstream://HOST:PORT?subject=SUBJECT")
    text = raw.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise AddressError(
            "address", f"is not a URI: write {NATS_SCHEME}://HOST:PORT?subject=SUBJECT"
        )
    if scheme.lower() != NATS_SCHEME:
        raise AddressError(
            "scheme",
            f"{scheme!r} is not supported: the NATS source address starts with {NATS_SCHEME}://",
        )
    rest, _, fragment = rest.partition("#")
    authority_and_path, _, query = rest.partition("?")
    authority, _, path = authority_and_path.partition("/")
    if path.strip("/"):
        raise AddressError(
            "address",
            f"has a path {('/' + path)!r}; the subject goes in the query: ?subject=orders.created",
        )
    userinfo, at, hostlist = authority.rpartition("@")
    if not at:
        userinfo, hostlist = "", authority
    user = password = token = None
    if at:
        if ":" in userinfo:
            u, p = userinfo.split(":", 1)
            user, password = unquote(u), unquote(p)
            if not user:
                raise AddressError("user", "is empty before ':' in the address credentials")
        elif userinfo:
            token = unquote(userinfo)
        else:
            raise AddressError("user", "the address has '@' but no credentials before it")
    servers = _split_servers(hostlist) if hostlist else (f"{DEFAULT_HOST}:{DEFAULT_PORT}",)

    params: dict[str, str] = {}
    # A literal '+' in a token or seed is a '+', not a space as in HTML forms.
    for key, value in parse_qsl(query.replace("+", "%2B"), keep_blank_values=True):
        if not key:
            raise AddressError("address", "has an option without a name (=value) in its query")
        if key not in NATS_OPTIONS:
            known = ", ".join(NATS_OPTIONS)
            raise AddressError(
                key,
                f"is not a known address option; {_suggest(key, list(NATS_OPTIONS))}"
                f"known options: {known}",
            )
        if key in params:
            raise AddressError(key, "is given twice in the address; keep one")
        params[key] = value

    subject = params.get("subject", "").strip()
    if not subject:
        raise AddressError(
            "subject",
            "is required: add ?subject=<subject> to the address (e.g. ?subject=orders.created)",
        )
    _check_subject(subject)

    if "token" in params:
        if token is not None:
            raise AddressError(
                "token",
                "is given both before '@' and as ?token=; keep one (?token={NATS_TOKEN})",
            )
        token = params["token"] or None
        if token is None:
            raise AddressError("token", "is empty: write token={NATS_TOKEN} or remove it")
    nkeys_seed = params.get("nkeys_seed")
    if nkeys_seed is not None and not nkeys_seed:
        raise AddressError(
            "nkeys_seed", "is empty: write nkeys_seed={NATS_NKEYS_SEED} or remove it"
        )
    modes = [
        m
        for m, v in (
            ("user/password", user),
            ("token", token),
            ("nkeys_seed", nkeys_seed),
            ("creds", params.get("creds")),
        )
        if v
    ]
    if len(modes) > 1:
        raise AddressError(
            "auth",
            f"gives several auth modes ({', '.join(modes)}); NATS takes one: keep one of them",
        )

    ack_policy = params.get("ack_policy", "none").lower()
    if ack_policy not in ("none", "all", "explicit"):
        raise AddressError("ack_policy", f"must be none, all or explicit, got {ack_policy!r}")
    payload_format = params.get("format", "json").lower()
    if payload_format not in ("json", "raw"):
        raise AddressError("format", f"must be json or raw, got {payload_format!r}")
    durable = params.get("durable")
    if durable is not None and (
        not durable or any(c in durable for c in ".*>/\\") or any(c.isspace() for c in durable)
    ):
        raise AddressError(
            "durable",
            f"{durable!r} is not a valid consumer name: use letters, digits, '-' or '_' "
            "(no spaces, '.', '*', '>', '/' or '\\')",
        )
    if ack_policy != "none" and not durable:
        raise AddressError(
            "ack_policy",
            f"ack_policy={ack_policy} needs a durable consumer: add &durable=<name>",
        )
    start_sequence = (
        _parse_positive_int("start_sequence", params["start_sequence"])
        if "start_sequence" in params
        else None
    )
    start_time = _parse_time("start_time", params["start_time"]) if "start_time" in params else None
    if start_sequence is not None and start_time is not None:
        raise AddressError(
            "start_time",
            "and start_sequence are both given; keep one of them (they both set "
            "where the first run starts)",
        )
    tls_cert, tls_key = params.get("tls_cert"), params.get("tls_key")
    if bool(tls_cert) != bool(tls_key):
        missing = "tls_key" if tls_cert else "tls_cert"
        raise AddressError(
            missing,
            f"is missing: tls_cert and tls_key go together; add &{missing}=<path> "
            "or remove the other",
        )

    return NatsAddress(
        servers=servers,
        subject=subject,
        durable=durable,
        batch_size=(
            _parse_positive_int("batch_size", params["batch_size"])
            if "batch_size" in params
            else DEFAULT_BATCH_SIZE
        ),
        timeout=(
            _parse_positive_float("timeout", params["timeout"])
            if "timeout" in params
            else DEFAULT_TIMEOUT_SECONDS
        ),
        failover_timeout=(
            _parse_positive_float("failover_timeout", params["failover_timeout"])
            if "failover_timeout" in params
            else DEFAULT_FAILOVER_TIMEOUT_SECONDS
        ),
        start_sequence=start_sequence,
        start_time=start_time,
        ack_policy=ack_policy,  # type: ignore[arg-type]
        format=payload_format,  # type: ignore[arg-type]
        user=user,
        password=password,
        token=token,
        nkeys_seed=nkeys_seed,
        creds=params.get("creds") or None,
        tls=_parse_bool("tls", params["tls"]) if "tls" in params else False,
        tls_ca=params.get("tls_ca") or None,
        tls_cert=tls_cert or None,
        tls_key=tls_key or None,
        raw=raw.strip() + (f"#{fragment}" if fragment else ""),
    )


@dataclass(frozen=True)
class SinkAddress:
    """A parsed sink address: a depot, a storage root URI, or a ``postgresql://`` database.

    ``postgres`` holds the database's address as written (placeholders unfilled).
    """

    raw: str
    depot: str | None = None
    root: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    postgres: PostgresUrl | None = None

    @property
    def is_depot(self) -> bool:
        """Whether the address names a depot (``dataos://``)."""
        return self.depot is not None


DIRECT_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "azure")


def parse_sink_address(raw: str) -> SinkAddress:
    """Parse a sink address: ``dataos://DEPOT?purpose=rw``, a storage URI, or a local path.

    Raises:
        AddressError: The address is of no supported form.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise AddressError("address", "is empty: write dataos://<depot>?purpose=rw")
    text = raw.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        # A plain local folder is a storage root of its own.
        return SinkAddress(raw=text, root=text)
    scheme = scheme.lower()
    if scheme == "dataos":
        depot, _, query = rest.partition("?")
        depot = depot.strip("/")
        if not depot or "/" in depot:
            raise AddressError(
                "depot", f"{depot!r} is not a depot name: write dataos://<depot>?purpose=rw"
            )
        params = tuple(parse_qsl(query, keep_blank_values=True))
        for key, value in params:
            if key != "purpose":
                raise AddressError(key, "is not a known dataos address option (only purpose=)")
            if value not in ("r", "rw", "w"):
                raise AddressError("purpose", f"must be r, w or rw, got {value!r}")
            if value == "r":
                raise AddressError("purpose", "is r (read-only); a sink needs purpose=rw")
        return SinkAddress(raw=text, depot=depot, params=params)
    if scheme in DIRECT_SCHEMES:
        return SinkAddress(raw=text, root=text.rstrip("/"))
    if scheme in POSTGRES_SCHEMES:
        return SinkAddress(raw=text, postgres=parse_postgres_url(text))
    raise AddressError(
        "scheme",
        f"{scheme!r} is not a supported sink; use dataos://<depot>, s3://, gs://, az://, "
        "file://, a local folder or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB",
    )
