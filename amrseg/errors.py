"""The exception types that reach users as a one-line message."""
from __future__ import annotations

from typing import Any


class AmrsegError(Exception):
    """Bad input or an unrecoverable condition the user can fix: printed as one line, exit 2.

    The message names the file or flag at fault.
    """


class ConfigError(AmrsegError):
    """A config value out of its range or of the wrong type.

    Carries the dotted key and the value, so that the command that resolved the config can name
    what the user typed: `--batch-size 0: ...` for a flag, `--set train.log_every=0: ...` for an
    override, `config key 'train.log_every': ...` for a value from a preset or a saved config.
    """

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"config key '{key}': {problem}, got {value!r}")

    def blamed_on(self, origin: str) -> AmrsegError:
        """The same problem, told as the fault of `origin` (e.g. '--batch-size 0')."""
        return AmrsegError(f"{origin}: {self.problem}")
