"""Errors that the command-line entry points turn into one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A setting, a file or a value given by the user is not acceptable."""
