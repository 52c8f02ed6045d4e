"""The exception types that reach users as a one-line message, and how a message becomes one line.

AmrsegError is for what the user can fix: a flag, a config value, a file or folder they named.
A caller's mistake (a tensor of the wrong shape, an unknown mode passed by code) is a ValueError:
it shows a traceback, because the fix is in the code.
"""
from __future__ import annotations

import re
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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


def one_line(exc: BaseException) -> str:
    """The message the CLI prints for an error: its last non-blank line.

    An AmrsegError re-raised from a DataLoader worker carries the worker's traceback before the
    message; the `AmrsegError: ` prefix of that traceback's last line is dropped.
    """
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    for prefix in ("amrseg.errors.AmrsegError: ", "AmrsegError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


def brief(err: BaseException, limit: int = 200) -> str:
    """Another library's error message, to quote inside a one-line AmrsegError.

    White space folded to single spaces, terminal escape codes removed; a message longer than
    `limit` characters is cut to its first sentence when that fits, else to `limit` characters.
    The exception's type name when it has no message.
    """
    text = " ".join(_ANSI.sub("", str(err)).split()) or type(err).__name__
    if len(text) > limit and ". " in text[:limit]:
        text = text[: text.index(". ") + 1]
    return text[:limit]
