"""One exception type per kind of user mistake; the CLI prints them without a traceback."""


class TunebenchError(Exception):
    """Base class: a problem the user can act on."""


class ConfigError(TunebenchError):
    """A config file or --set override is wrong."""


class DataError(TunebenchError):
    """An input data file or record is wrong."""


class ModelError(TunebenchError):
    """A model cannot be loaded or a method cannot run on this hardware."""


class JudgeError(TunebenchError):
    """A judge backend is misconfigured or failed for good."""
