"""The one exception type that the CLI turns into a single line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config field, a file line, a model spec.

    The message must be one line that names what was wrong (field, file and line, metric...).
    The CLI prints ``error: <message>`` and exits with code 2, without a traceback.
    """


class ConfigError(UserError, ValueError):
    """An invalid DecodingConfig field. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
