"""One exception type per kind of user mistake; the CLI prints them without a traceback. And failure_reason,
which words a library's exception for a one-line warning."""


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


def failure_reason(exc: BaseException) -> str:
    """The error under dynamo's wrapping (BackendCompilerFailed holds the backend's own), on one line:
    the warning of a fallback (train.compile, generate.cuda_graphs under auto)."""
    root = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = [line for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0][:200] if lines else ''}"
