"""One place that keeps secrets out of logs, errors, metadata and the UI.

Every secret value filled in at run time is registered here; :func:`redact` replaces registered
values and anything that looks like a credential inside an address.
"""

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()

# Userinfo in any URI (scheme://user:pass@host). Greedy up to the last '@' of the authority, so
# that an unencoded '@' inside a password is masked with the rest of it.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s?#]+)@")
# Credential-bearing query parameters (token=, nkeys_seed=, password=, AWS/Azure keys...).
_SECRET_PARAMS = re.compile(
    r"(?P<key>\b(?:\w*(?:token|seed|password|passwd|secret)|pass|pwd|access_key|"
    r"access_key_id|secret_key|account_key|sas|sig)=)(?P<value>[^&\s'\"]+)",
    re.IGNORECASE,
)
# NKEY seeds are recognisable on their own: 'S' + a key type letter + base32.
_NKEY_SEED = re.compile(r"\bS[UOANCPX][A-Z2-7]{40,}\b")


def register_secret(value: str | None) -> None:
    """Remember a secret value so that :func:`redact` masks it wherever it appears."""
    if value and len(value) >= 3:
        with _lock:
            _secrets.add(value)


@contextmanager
def isolated_secret_registry() -> Iterator[None]:
    """Forget, on exit, every secret registered inside the block.

    The registry is process-wide; tests that fill arbitrary values use this so that one test's
    "secrets" (a user name, a fuzzed word) do not mask text in the tests that follow.
    """
    with _lock:
        before = set(_secrets)
    try:
        yield
    finally:
        with _lock:
            _secrets.intersection_update(before)


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


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:
        # Bad %-args: logging reports that itself at emit time; mask what is there.
        message = f"{record.msg} {record.args}"
    record.msg = redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        # Formatters reuse exc_text, so the traceback is masked too.
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message, traceback and stack.

    A filter on a logger sees only the records logged through that very logger, not those of its
    children; :func:`install_log_redaction` covers a whole logger tree.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always keep it."""
        _redact_record(record)
        return True


_installed: set[str] = set()


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Redact every record of ``logger`` and of its children (``nilus_dagster`` by default).

    Records are redacted as they are created, so that every handler (Dagster's, pytest's, a
    file) sees the masked text, whichever logger of the tree they are attached to.
    """
    target = logger or logging.getLogger("nilus_dagster")
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(RedactingFilter())
    with _lock:
        if not _installed:
            previous = logging.getLogRecordFactory()

            def factory(*args: object, **kwargs: object) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                # logging.makeLogRecord({}) makes a record without a name; Dagster's log
                # manager does that for every record it handles.
                name = record.name or ""
                if any(n == "root" or name == n or name.startswith(n + ".") for n in _installed):
                    _redact_record(record)
                return record

            logging.setLogRecordFactory(factory)
        _installed.add(target.name)
