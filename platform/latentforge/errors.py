"""User-facing errors.

Every error a user can cause (bad config, bad data, bad checkpoint, bad request) is a
`LatentForgeError`: the CLI prints its message to standard error and exits non-zero, without a
traceback. Messages name the problem, the bad value, what is allowed and what to do.
"""


class LatentForgeError(Exception):
    """Base class for errors caused by user input; the message is shown as is."""


class ConfigError(LatentForgeError):
    """A preset, YAML file or override is invalid."""


class DataError(LatentForgeError):
    """A data source or prepared dataset is missing, unreadable or malformed."""


class CheckpointError(LatentForgeError):
    """A checkpoint folder is missing, incomplete or was written by an incompatible version."""
