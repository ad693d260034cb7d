"""Object-store failures said in the words of the depot: which storage option to fix.

``deltalake`` reports a refused request as a chain of causes ending in the store's reply (an S3
XML error). A person needs the cause and the option or variable that sets it, never the secret.
"""

import re

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.redaction import redact

# Store replies that mean "these credentials are not accepted" (S3, GCS and Azure spellings).
_REFUSED = {
    "SignatureDoesNotMatch": "the secret does not match the access key",
    "InvalidAccessKeyId": "the access key is unknown to the store",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
    "AccessDenied": "the credentials may not do this",
    "AuthenticationFailed": "the credentials are not accepted",
    "AuthorizationFailure": "the credentials may not do this",
}
_FORBIDDEN = re.compile(r"\b(401 Unauthorized|403 Forbidden)\b|lacked the necessary privileges")
_CREDENTIAL_OPTION = re.compile(
    r"ACCESS_KEY|SECRET|SESSION_TOKEN|TOKEN|SAS|ACCOUNT_KEY|SERVICE_ACCOUNT|CLIENT_ID|PASSWORD",
    re.IGNORECASE,
)
_ENDPOINT_OPTION = re.compile(r"ENDPOINT", re.IGNORECASE)
_UNREACHABLE = re.compile(
    r"error sending request|tcp connect error|Connection refused|dns error|"
    r"failed to lookup address|timed out",
    re.IGNORECASE,
)
_CODE = re.compile(r"<Code>(?P<code>[^<]+)</Code>(?:<Message>(?P<message>[^<]*)</Message>)?")
_REQUEST_HOST = re.compile(r"Error performing \w+ (?P<host>https?://[^/\s]+)")
_BUCKET = re.compile(r"<BucketName>(?P<bucket>[^<]+)</BucketName>")
# The environment variables object_store reads when the options do not say.
_DEFAULT_CREDENTIALS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    "s3a": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    "gs": ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_KEY"),
    "gcs": ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_KEY"),
}
_AZURE_CREDENTIALS = ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY")


def storage_error(what: str, exc: BaseException, location: TableLocation) -> SinkError | None:
    """The clear error for ``what`` failing because of ``exc``.

    A :class:`SinkError` that says what to fix, or ``None`` when the store's error is not one
    :func:`explain_storage_error` recognises.
    """
    from nilus_dagster.sink.writer import error_text

    text = error_text(exc)
    explained = explain_storage_error(text, location)
    if explained is None:
        return None
    return SinkError(f"{what}: {explained} (the store said: {store_reply(text)})")


def explain_storage_error(text: str, location: TableLocation) -> str | None:
    """What to fix for an object-store error, or ``None`` when the error is not recognised.

    Args:
        text: The store's error, as raised by ``deltalake``.
        location: The table being reached: its storage options' names (never their values)
            and where they are written go into the explanation.

    Returns:
        One redacted sentence naming the cause and the options or variables to check.
    """
    reply = _CODE.search(text)
    code = reply.group("code") if reply else ""
    where = f" in {location.options_source}" if location.options_source else ""
    if code in _REFUSED or (not code and _FORBIDDEN.search(text)):
        cause = _REFUSED.get(code, "the store refused the request")
        names = _credential_names(location)
        said = f"{code}: " if code else ""
        return redact(f"the store refused the credentials ({said}{cause}): check {names}{where}")
    if code == "NoSuchBucket":
        bucket = _BUCKET.search(text)
        name = f" {bucket.group('bucket')!r}" if bucket else ""
        return redact(
            f"the bucket{name} does not exist: create it, or fix the depot's root or the "
            "dest_table location"
        )
    if "URL scheme is not allowed" in text:
        return redact(
            'the endpoint is plain http: set AWS_ALLOW_HTTP: "true" in the storage options'
            f"{where} (or use an https endpoint)"
        )
    if _UNREACHABLE.search(text):
        endpoints = [k for k in location.storage_options if _ENDPOINT_OPTION.search(k)]
        check = " and ".join(endpoints) if endpoints else "the storage options' endpoint"
        host = _REQUEST_HOST.search(text)
        at = f" at {host.group('host')}" if host else ""
        return redact(f"the store{at} cannot be reached: check {check}{where} and the network")
    return None


def store_reply(text: str) -> str:
    """The store's own words (``<Code>: <Message>``).

    When the store's reply is not in ``text``, the innermost cause of the chain.
    """
    reply = _CODE.search(text)
    if reply:
        message = reply.group("message") or ""
        return redact(f"{reply.group('code')}: {message}".rstrip(": "))
    causes = [part.strip() for part in text.split("↳") if part.strip()]
    return redact(causes[-1] if causes else text)


def _credential_names(location: TableLocation) -> str:
    names = [k for k in location.storage_options if _CREDENTIAL_OPTION.search(k)]
    if names:
        return " and ".join(names)
    scheme = location.uri.partition("://")[0].lower() if "://" in location.uri else "file"
    defaults = _DEFAULT_CREDENTIALS.get(scheme, _AZURE_CREDENTIALS)
    return (
        f"the credentials in the environment ({', '.join(defaults)}): the storage options set none"
    )
