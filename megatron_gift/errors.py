"""Errors a user can fix (a bad value, a missing file, a layout that does not fit), and a run
stopped by a signal before it trained anything.

The launchers print these as one line (no traceback) and exit with :data:`USER_ERROR_EXIT`, or
128 + the signal for :class:`Interrupted`; anything else is a bug and keeps its traceback.
"""

import signal

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """A bad input, named in the message together with the fix."""


class RendezvousError(UserError):
    """A rank could not meet its peers. Every rank says it (rank 0 may be the one missing)."""

    every_rank = True


class ConfigError(UserError):
    """A config value, key, flag or recipe that is not valid."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the run needs does not exist or is not what it should be."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived while the run was setting up: it stops at once (nothing was
    trained, nothing is saved). A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {self.signal_name} while setting up: nothing was trained "
                         "or saved")
