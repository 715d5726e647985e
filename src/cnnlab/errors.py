"""User-facing errors and warnings.

Every exception derived from `CnnlabError` carries a message written for the user: what went
wrong, where (a file, a layer, a field) and how to fix it. The CLI prints it as one line and
exits non-zero; anything else is a programming error and keeps its traceback.
"""


class CnnlabError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    exit_code = 2


class DataError(CnnlabError):
    """Missing, corrupt or unverifiable dataset files."""


class SpecError(CnnlabError):
    """A model spec that cannot be parsed, validated or built."""


class ConfigError(CnnlabError):
    """An impossible option or combination of options (device, precision, sizes, paths)."""


class RunError(CnnlabError):
    """A run folder that is missing, incomplete or cannot be written."""


class DataWarning(UserWarning):
    """Data loaded but not verified against the canonical checksums."""
