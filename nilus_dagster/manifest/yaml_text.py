"""Reading YAML text with problems that point at a line and column, never at a traceback."""

import yaml

from nilus_dagster.errors import ManifestError, Problem


def yaml_problem(file: str, exc: BaseException) -> Problem:
    """Describe why ``file`` could not be read as YAML.

    Only the position and the parser's reason are kept: PyYAML's full text quotes the offending
    line, which may hold a secret.
    """
    if isinstance(exc, RecursionError):
        return Problem(file, "(file)", "is not valid YAML: it nests too deeply")
    if not isinstance(exc, yaml.YAMLError):
        # PyYAML lets a few constructor errors through as plain ValueError (2001-02-30).
        return Problem(file, "(file)", f"is not valid YAML: {exc}; quote the value")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    position = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
    reason = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    return Problem(file, position, f"is not valid YAML: {reason}; fix the indentation or quoting")


def load_yaml(text: str, file: str) -> object:
    """Parse ``text`` (the content of ``file``) with ``yaml.safe_load``.

    Raises:
        ManifestError: The text is not YAML; the problem names the line and column.
    """
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ManifestError([yaml_problem(file, exc)]) from None
