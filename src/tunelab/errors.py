"""The exceptions the CLI turns into a clear message and a non-zero exit, without a traceback, and
how such a message quotes a bad value."""

import reprlib
from typing import Any

# How much of a bad value a message shows: enough to recognize it, and a message stays one line.
SHOWN_VALUE_CHARS = 60


class TunelabError(Exception):
    """A bad input (config key, file, data row, model path) or a failed run.

    The message names what went wrong and where (file:line, config key), so the CLI prints it
    as-is, without a traceback.
    """


class TrainingDiverged(TunelabError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is left intact."""


class RunStopped(Exception):
    """A run stopped on a signal after writing a checkpoint; the CLI exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def shown(value: Any) -> str:
    """`value` as an error message quotes it: its repr, at most SHOWN_VALUE_CHARS characters however
    big the value (reprlib builds no more of it than that)."""
    brief = reprlib.Repr()
    brief.maxstring = brief.maxother = SHOWN_VALUE_CHARS
    text = brief.repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


class RankLost(TunelabError):
    """A process of a multi-process run found another one gone (exited, or silent past the
    collective timeout): every surviving rank says so, naming the rank where it can."""
