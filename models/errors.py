"""Errors shared by every layer.

`UserError` is anything the user can fix (bad spec, missing file, incompatible checkpoint): the CLI
prints its message once and exits with code 2 before any work starts. It lives in `models` because
that is the lowest layer and every other layer may raise it.
"""


class UserError(Exception):
    """A problem with the user's input; the message must say what and where."""


class UnsafeCheckpointError(UserError):
    """A checkpoint asked for something we refuse to do (a global outside the allow-list, ...)."""


class JobFailed(Exception):
    """A job ran but could not produce its result (e.g. no candidate passed the filters)."""
