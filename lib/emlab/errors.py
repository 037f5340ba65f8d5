"""User-facing errors: one line that says what, where and what to do.

`EmlabError` is raised for every problem the user can fix (bad params, bad data, missing
key, unreachable judge). The CLI prints its message without a traceback unless `--debug`.
"""

from __future__ import annotations


class EmlabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(EmlabError):
    """A params file is malformed, has an unknown key or a wrong type."""


class DataError(EmlabError):
    """A dataset or question file cannot be read as expected."""


class JudgeError(EmlabError):
    """The judge endpoint is unreachable or misconfigured."""
