"""Errors a user can fix: a bad value, a missing file, a layout that does not fit.

The launchers print these as one line ``error: ...`` (no traceback) and exit with
:data:`USER_ERROR_EXIT`; anything else is a bug and keeps its traceback.
"""

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """A bad input, named in the message together with the fix."""


class ConfigError(UserError):
    """A config value, key, flag or recipe that is not valid."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the run needs does not exist or is not what it should be."""
