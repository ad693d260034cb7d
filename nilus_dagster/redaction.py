"""One place that keeps secrets out of logs, errors, metadata and the UI.

Every secret value filled in at run time is registered here; :func:`redact` replaces registered
values and anything that looks like a credential inside an address.
"""

import logging
import re
import threading

_MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()

# Userinfo in any URI (scheme://user:pass@host) and credential-bearing query parameters.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^@/\s?#]+)@")
_SECRET_PARAMS = re.compile(
    r"(?P<key>\b(?:token|nkeys_seed|password|pass|secret|auth_token|access_key|secret_key|"
    r"account_key|sas_token|client_secret)=)(?P<value>[^&\s'\"]+)",
    re.IGNORECASE,
)
# NKEY seeds are recognisable on their own: 'S' + a key type letter + base32.
_NKEY_SEED = re.compile(r"\bS[UOANCPX][A-Z2-7]{40,}\b")


def register_secret(value: str | None) -> None:
    """Remember a secret value so that :func:`redact` masks it wherever it appears."""
    if value and len(value) >= 3:
        with _lock:
            _secrets.add(value)


def redact(text: object) -> str:
    """Return ``text`` as a string with every known secret and credential masked."""
    out = str(text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in out:
            out = out.replace(secret, _MASK)
    out = _USERINFO.sub(_mask_userinfo, out)
    out = _SECRET_PARAMS.sub(_mask_param, out)
    return _NKEY_SEED.sub(_MASK, out)


def _is_placeholder(value: str) -> bool:
    # A {NAME} placeholder names a variable, which is useful to show and is not a secret.
    return value.startswith("{") and value.endswith("}")


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if ":" in userinfo:
        user, password = userinfo.split(":", 1)
        if _is_placeholder(password):
            return match.group(0)
        return f"{match.group('scheme')}{user}:{_MASK}@"
    # A lone userinfo is a token (nats+jetstream://TOKEN@host).
    if _is_placeholder(userinfo):
        return match.group(0)
    return f"{match.group('scheme')}{_MASK}@"


def _mask_param(match: re.Match[str]) -> str:
    if _is_placeholder(match.group("value")):
        return match.group(0)
    return match.group("key") + _MASK


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = redact(record.getMessage())
            record.args = None
        else:
            record.msg = redact(record.msg)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach :class:`RedactingFilter` to ``logger`` (the package logger by default)."""
    target = logger or logging.getLogger("nilus_dagster")
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(RedactingFilter())
