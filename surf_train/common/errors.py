"""Errors that the command-line entry points turn into one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A setting, a file or a value given by the user is not acceptable."""


def known_keys(d: dict, cls, what: str) -> dict:
    """`d` as a dict when every key is a field of the dataclass `cls`; otherwise one ConfigError naming the rest."""
    from dataclasses import fields

    d = dict(d or {})
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{what}: unknown settings {unknown}")
    return d
