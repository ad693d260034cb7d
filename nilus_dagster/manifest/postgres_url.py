"""``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`` sink addresses, placeholders filled at run time.

The address is parsed as written (with its ``{PLACEHOLDER}``s) when a manifest or depots file is
loaded, and filled part by part only when a run connects: the password is registered as a secret
so that redaction masks it everywhere, the other parts are not (a host name is no secret).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote

from nilus_dagster.manifest.placeholders import PLACEHOLDER, fill, placeholders_in
from nilus_dagster.redaction import register_secret

POSTGRES_SCHEMES = ("postgresql", "postgres")
DEFAULT_PORT = "5432"


@dataclass(frozen=True)
class PostgresUrl:
    """A parsed PostgreSQL address, as written (placeholders unfilled)."""

    host: str
    dbname: str
    port: str = DEFAULT_PORT
    user: str | None = None
    password: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    def placeholders(self) -> list[str]:
        """The placeholder names of every part, in order of first appearance."""
        parts = [self.user, self.password, self.host, self.port, self.dbname]
        parts += [value for _, value in self.params]
        return list(dict.fromkeys(name for part in parts for name in placeholders_in(part)))

    def display(self, replaced: Mapping[str, str] | None = None) -> str:
        """The address without its password: ``postgresql://USER@HOST:PORT/DB``.

        Args:
            replaced: Connection parameters that replace the address's (a deployment's).
        """
        parts = {**self.template_options(), **(replaced or {})}
        user = f"{parts['user']}@" if parts.get("user") else ""
        return f"postgresql://{user}{parts['host']}:{parts['port']}/{parts['dbname']}"

    def connection_options(
        self,
        env: Mapping[str, str],
        *,
        where: str,
        replaced: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The libpq connection parameters, placeholders filled from ``env``.

        Args:
            env: The run-time environment.
            where: ``file: field`` words for errors.
            replaced: Parameters that replace the address's, taken as they are: the address's
                placeholders in those parts are not filled, so they need no variable.

        Raises:
            PlaceholderError: A placeholder's variable is not set (named in the message).
        """
        replaced = replaced or {}
        written = [("host", self.host), ("port", self.port), ("dbname", self.dbname)]
        written += [("user", self.user), ("password", self.password), *self.params]
        options = {
            key: fill(value, env, where=where, secret="password" in key.lower())
            for key, value in written
            if value and key not in replaced
        }
        for key, value in options.items():
            if "password" in key.lower():
                register_secret(value)  # written in the address as it is, not only filled
        return {**options, **replaced}

    def template_options(self) -> dict[str, str]:
        """The connection parameters as written (for display; placeholders left in)."""
        options = {"host": self.host, "port": self.port, "dbname": self.dbname}
        if self.user:
            options["user"] = self.user
        return options


def is_postgres_url(raw: str) -> bool:
    """Whether ``raw`` is a ``postgresql://`` (or ``postgres://``) address."""
    scheme, sep, _ = raw.strip().partition("://")
    return bool(sep) and scheme.lower() in POSTGRES_SCHEMES


def parse_postgres_url(raw: str) -> PostgresUrl:
    """Parse ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?param=value...]``.

    Raises:
        AddressError: A part is missing or malformed; the message says what to write.
    """
    # address.py imports this module for its sink addresses: its error class is read here.
    from nilus_dagster.manifest.address import AddressError

    text = raw.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in POSTGRES_SCHEMES:
        raise AddressError("scheme", "must be postgresql://USER[:PASSWORD]@HOST[:PORT]/DB")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        hostport, userinfo = authority, ""
    user, colon, password = userinfo.partition(":")
    host, port = _split_port(hostport)
    dbname = unquote(path.strip("/"))
    if not host:
        raise AddressError("host", "is missing: write postgresql://USER[:PASSWORD]@HOST[:PORT]/DB")
    if not slash or not dbname or "/" in dbname:
        raise AddressError(
            "database",
            "is missing or not one name: write postgresql://USER[:PASSWORD]@HOST[:PORT]/DB",
        )
    if port and not (port.isdigit() or PLACEHOLDER.fullmatch(port)):
        raise AddressError("port", f"must be a number, got {port!r}")
    params = tuple(parse_qsl(query, keep_blank_values=True))
    return PostgresUrl(
        host=host,
        dbname=dbname,
        port=port or DEFAULT_PORT,
        user=unquote(user) or None,
        password=unquote(password) if colon and password else None,
        params=params,
    )


def _split_port(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):  # [IPv6]:port
        host, _, after = hostport[1:].partition("]")
        return host, after.lstrip(":")
    if hostport.count(":") == 1 or (hostport.count(":") > 1 and "{" in hostport):
        host, _, port = hostport.rpartition(":")
        return host, port
    return hostport, ""


def connection_uri(options: Mapping[str, str]) -> str:
    """A libpq URI for filled connection parameters (user and password percent-encoded)."""
    user = quote(options.get("user", ""), safe="")
    password = quote(options.get("password", ""), safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = options.get("host", "localhost")
    if ":" in host:
        host = f"[{host}]"
    port = options.get("port", DEFAULT_PORT)
    named = ("user", "password", "host", "port", "dbname")
    extra = [(k, v) for k, v in options.items() if k not in named]
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in extra)
    dbname = quote(options.get("dbname", ""), safe="")
    return f"postgresql://{auth}{host}:{port}/{dbname}" + (f"?{query}" if query else "")
