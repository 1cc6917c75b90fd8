"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class TunelabError(Exception):
    """A bad input (config key, file, data row, model path) or a failed run.

    The message names what went wrong and where (file:line, config key), so the CLI prints it
    as-is, without a traceback.
    """


class TrainingDiverged(TunelabError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is left intact."""
