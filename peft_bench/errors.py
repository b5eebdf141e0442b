"""Errors a user can act on.

`UserError` is raised for bad input (names, options, paths): the CLI prints its message on one line and
exits with status 2.  `UnsupportedError` marks a method/model combination that cannot work; the suite
records it as an explained `unsupported` row instead of crashing.
"""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what is allowed."""


class UnsupportedError(UserError):
    """A method cannot serve this model or task; the message names the reason."""
