"""The exceptions the CLI turns into a clear message and a non-zero exit, without a traceback."""


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
