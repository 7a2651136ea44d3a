"""Typed errors. Each message says what is allowed or what to do; only the CLI prints them."""


class HybridExitError(Exception):
    """Base class of every error hybridexit raises on purpose."""


class ConfigError(HybridExitError, ValueError):
    """An invalid network, exit or energy configuration."""


class TargetUnreachableError(ConfigError):
    """A valid calibration target that no threshold meets on the validation split."""


class InputShapeError(HybridExitError, ValueError):
    """A tensor given to a network does not have the shape the network was built for."""


class DatasetError(HybridExitError):
    """A dataset is missing, unreadable, corrupted or unsafe."""


class CheckpointError(HybridExitError):
    """A checkpoint is missing, incomplete, or does not fit the requested architecture."""


class EngineError(HybridExitError):
    """An inference engine cannot run this network here (unsupported layers, missing compiler or runtime)."""


class SweepError(HybridExitError):
    """A design-space sweep cannot go on as asked (a point failed, a worker died, a run cannot be adopted)."""
