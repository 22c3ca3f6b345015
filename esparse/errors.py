"""Error types: every user-facing failure names the bad value and what is allowed."""


class EsparseError(Exception):
    """Base class for errors that are the user's input, not a bug."""


class ConfigError(EsparseError):
    """A configuration value is invalid."""


class DataError(EsparseError):
    """A data file is missing, corrupt, or has an unexpected layout."""


class ModelError(EsparseError):
    """A model name or model directory cannot be resolved or loaded."""
