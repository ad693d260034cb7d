"""``{NAME}`` placeholders: found at load time, filled from the environment at run time."""

import re
from collections.abc import Mapping

from nilus_dagster.errors import PlaceholderError
from nilus_dagster.redaction import register_secret

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders_in(text: str | None) -> list[str]:
    """Return the placeholder names in ``text``, in order of first appearance."""
    if not text:
        return []
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def fill(
    text: str,
    env: Mapping[str, str],
    *,
    where: str,
    secret: bool = False,
) -> str:
    """Replace every ``{NAME}`` in ``text`` with ``env[NAME]``.

    Args:
        text: The template, as written in the manifest.
        env: The run-time environment (usually ``os.environ`` plus the projection).
        where: ``file: field`` words for the error, so a person knows where to look.
        secret: Register the filled values so that redaction masks them everywhere.

    Raises:
        PlaceholderError: A placeholder has no value; the message names the variable.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        value = env.get(name)
        if value is None or value == "":
            raise PlaceholderError(
                f"{where}: environment variable {name} is not set: export {name}, or project "
                f"it through spec.use.projection (envVars key {name}, rendered from the "
                "NILUS_SECRETS file when run locally)"
            )
        if secret:
            register_secret(value)
        return value

    return PLACEHOLDER.sub(substitute, text)
