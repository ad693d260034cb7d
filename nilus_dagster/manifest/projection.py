"""``spec.use.projection``: the environment a pipeline runs with.

In DataOS the projection turns secrets into environment variables. Locally the environment *is*
the projection: a variable already set wins. A key that is not set is rendered from its
``template`` (Jinja, with ``secrets['<alias>'].<field>`` and the ``base64_decode`` filter) when a
local secrets file is available (``NILUS_SECRETS``), or taken from its literal ``value``.

The secrets file is YAML, one mapping per secret alias (the ``contextAlias``, or the secret ``id``):

.. code-block:: yaml

    natssecret:
      username: nilus
      password: c2VjcmV0          # base64, as DataOS stores it
"""

import base64
import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from nilus_dagster.errors import PlaceholderError
from nilus_dagster.manifest.model import PipelineManifest
from nilus_dagster.redaction import register_secret

SECRETS_ENV = "NILUS_SECRETS"


def _base64_decode(value: object) -> str:
    return base64.b64decode(str(value)).decode("utf-8")


def _load_secrets(path: Path) -> dict[str, object]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PlaceholderError(f"{path}: cannot read the secrets file: {exc}") from None
    if not isinstance(data, dict):
        raise PlaceholderError(f"{path}: the secrets file must map secret aliases to fields")
    return data


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
        secrets = _load_secrets(Path(secrets_file))
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
                raise PlaceholderError(
                    f"{where}: envVars {projection.key}: cannot render its template from "
                    f"{SECRETS_ENV} ({type(exc).__name__}: {exc}); check the secret alias and "
                    "field names"
                ) from None
            register_secret(rendered)
            base[projection.key] = rendered
    return base
