"""Exceptions raised by nesta_ray. The CLI maps every ``NestaError`` to one line and exit code 2."""


class NestaError(Exception):
    """Base class: a failure the user can act on, with a message that says how."""


class ConfigError(NestaError):
    """A configuration value is missing, unknown or out of range; the message names the field and the fix."""


class DataError(NestaError):
    """Calibration or evaluation text cannot be read or is too short for the requested windows."""


class NumericalError(NestaError):
    """A decomposition input or result is not finite, or a whitening factor cannot be formed."""


class ModelError(NestaError):
    """The model cannot be found, converted, or has an architecture nesta_ray does not support."""


class CheckpointError(NestaError):
    """A checkpoint is incomplete, fails its manifest checks, or cannot be written."""


class PackageError(NestaError):
    """A registry package cannot be fetched (offline, unknown version, missing client) or fails its pinned sha256."""


class StorageError(NestaError):
    """Object storage is unreachable, refuses the credentials, or the bucket does not exist."""


class PipelineError(NestaError):
    """A worker failed beyond its restarts; finished layers stay staged, so a rerun resumes."""


class ShardStateLost(PipelineError):
    """A restarted layer shard lacks state the driver gave an earlier call (the automatic ratio's prepared SVDs);
    the driver rebuilds it and retries, and reports this only when it cannot."""
