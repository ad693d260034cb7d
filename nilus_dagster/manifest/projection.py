"""``spec.use.projection``: the environment a pipeline runs with.

In DataOS the projection turns secrets into environment variables. Locally the environment *is*
the projection: a variable already set wins. A key that is not set is rendered from its
``template`` (Jinja, with ``secrets['<alias>'].<field>`` and the ``base64_decode`` filter) when a
local secrets file is available (``NILUS_SECRETS``), or taken from its literal ``value``.

The secrets file is YAML, one mapping of fields per secret, keyed by the secret's
``contextAlias`` or by its ``id`` (``<tenant>:<secret>``, which is then reachable under its alias):

.. code-block:: yaml

    natssecret:                   # or "engineering:natssecret"
      username: nilus
      password: c2VjcmV0          # base64, as DataOS stores it

Every rendered value is registered for redaction.
"""

import base64
import os
import re
from collections.abc import Mapping
from pathlib import Path

from nilus_dagster.errors import ManifestError, PlaceholderError
from nilus_dagster.manifest.model import PipelineManifest
from nilus_dagster.manifest.yaml_text import load_yaml
from nilus_dagster.redaction import register_secret

SECRETS_ENV = "NILUS_SECRETS"
_USER_KEY = re.compile(r"(^|_)USER(NAME)?$", re.IGNORECASE)


def _base64_decode(value: object) -> str:
    return base64.b64decode(str(value)).decode("utf-8")


def _load_secrets(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise PlaceholderError(
            f"{path}: cannot read the secrets file ({reason}); fix {SECRETS_ENV}"
        ) from None
    try:
        # load_yaml's problems give a position only: the offending line may hold a secret.
        data = load_yaml(text, str(path)) or {}
    except ManifestError as exc:
        raise PlaceholderError(str(exc)) from None
    if not isinstance(data, dict):
        raise PlaceholderError(
            f"{path}: the secrets file must map secret aliases to fields "
            "(natssecret: {username: ..., password: ...})"
        )
    return data


def _by_alias(manifest: PipelineManifest, secrets: dict[str, object]) -> dict[str, object]:
    # A file keyed by secret id serves templates that use the alias, as in DataOS.
    by_alias = dict(secrets)
    for secret in manifest.spec.use.projection.secrets:
        if secret.contextAlias and secret.contextAlias not in by_alias and secret.id in secrets:
            by_alias[secret.contextAlias] = secrets[secret.id]
    return by_alias


def projected_environment(
    manifest: PipelineManifest,
    env: Mapping[str, str] | None = None,
    *,
    where: str = "spec.use.projection",
) -> dict[str, str]:
    """Return ``env`` (``os.environ`` by default) completed with the manifest's projection.

    Raises:
        PlaceholderError: A template cannot be rendered (unknown secret, bad base64).
    """
    base = dict(os.environ if env is None else env)
    projections = manifest.spec.use.projection.projections.envVars
    pending = [p for p in projections if not base.get(p.key)]
    if not pending:
        return base
    secrets: dict[str, object] = {}
    secrets_file = base.get(SECRETS_ENV)
    if secrets_file:
        secrets = _by_alias(manifest, _load_secrets(Path(secrets_file)))
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    jinja = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
    jinja.filters["base64_decode"] = _base64_decode
    for projection in pending:
        if projection.value is not None:
            base[projection.key] = projection.value
        elif projection.template is not None and secrets:
            try:
                rendered = jinja.from_string(projection.template).render(secrets=secrets)
            except Exception as exc:
                # Jinja's messages name keys and filters, never the values.
                known = ", ".join(sorted(map(str, secrets))) or "none"
                raise PlaceholderError(
                    f"{where}: envVars {projection.key}: cannot render its template "
                    f"{projection.template!r} from the secrets file {secrets_file} "
                    f"({SECRETS_ENV}): {type(exc).__name__}: {exc}; the file has secrets: "
                    f"{known}; check the secret alias and field names"
                ) from None
            # Everything from the secrets file is masked except user names: masking a short
            # name like "nilus" would garble every log line that mentions the product.
            if not _USER_KEY.search(projection.key):
                register_secret(rendered)
            base[projection.key] = rendered
    return base
