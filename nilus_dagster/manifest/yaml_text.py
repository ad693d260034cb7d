"""Reading YAML text with problems that point at a line and column, never at a traceback."""

import re

import yaml

from nilus_dagster.errors import ManifestError, Problem

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def field_key(part: object) -> str:
    """One part of a problem's field path; odd keys are quoted so the problem stays one line."""
    text = str(part)
    return text if _PLAIN_KEY.fullmatch(text) else repr(text)


def yaml_problem(file: str, exc: BaseException) -> Problem:
    """Describe why ``file`` could not be read as YAML.

    Only the position and the parser's reason are kept: PyYAML's full text quotes the offending
    line, which may hold a secret.
    """
    if isinstance(exc, RecursionError):
        return Problem(file, "(file)", "is not valid YAML: it nests too deeply")
    if not isinstance(exc, yaml.YAMLError):
        # PyYAML's constructors let some errors through: an impossible date (2001-02-30) taken
        # for a timestamp, a tagged empty value (!!int). Their text may quote the value.
        return Problem(
            file,
            "(file)",
            f"is not valid YAML: a value cannot be read as its type ({type(exc).__name__}); "
            "quote dates that are not real dates (2001-02-30) and check explicit !!tags",
        )
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
    except Exception as exc:
        # Parsing text has no side effects; whatever PyYAML raises means "not valid YAML".
        raise ManifestError([yaml_problem(file, exc)]) from None
