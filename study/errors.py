"""The user mistakes every command reports as one line with exit status 2 (the CLI catches these).

`ConfigError` names the file and the dotted key of a bad value; `UserError` is anything else the user can
fix by changing a command line, a file or a folder; `study.trial.data.DataError` (missing data files) is
the third kind. `did_you_mean` is the one spelling hint of every "unknown key" and "unknown value" message.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable


class ConfigError(ValueError):
    """A user mistake in a config: names the file and the dotted key."""

    def __init__(self, key: str, message: str, source: str | Path | None = None):
        self.key, self.message, self.source = key, message, str(source) if source else None
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")

    def with_source(self, source: str | Path) -> "ConfigError":
        return ConfigError(self.key, self.message, source)


class UserError(Exception):
    """Anything the user can fix by changing a command line, a file or a folder."""


def did_you_mean(given: object, valid: Iterable[object], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    near = difflib.get_close_matches(str(given), [str(v) for v in valid], n=1)
    return f" (did you mean '{prefix}{near[0]}'?)" if near else ""


def unknown_key(key: str, given: object, valid: Iterable[object]) -> ConfigError:
    valid = list(valid)
    return ConfigError(key, f"unknown key{did_you_mean(given, valid)}; valid keys: {', '.join(map(str, valid))}")


def unknown_value(key: str, given: object, valid: Iterable[object], what: str = "value") -> ConfigError:
    valid = list(valid)
    return ConfigError(key, f"unknown {what} {given!r}{did_you_mean(given, valid)}; valid choices: "
                            f"{', '.join(map(str, valid))}")
