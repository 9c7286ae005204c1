"""The errors a user can act on. The entry points print their message as one ``error: ...`` line
and exit 2; any other exception is a bug and keeps its traceback (as does every error with
``HYDRA_FULL_ERROR=1``). Every stage's own error class derives from :class:`UserError`."""


class UserError(Exception):
    """Something the user can fix (a setting, an input file, the disk); the message says what."""


class SettingsError(UserError, ValueError):
    """A setting no stage can work with; the message names the key, the value and what to use."""


class MissingFileError(UserError, FileNotFoundError):
    """An input file or folder the run needs is not there; the message names it."""


class OutputExistsError(UserError, FileExistsError):
    """The output would replace an earlier result; the message names the key that allows it."""


class TrainingError(UserError, RuntimeError):
    """Training stopped (non-finite loss, bad config ...); the message says why and what to do."""
