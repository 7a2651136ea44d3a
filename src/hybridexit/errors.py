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


# ---------------------------------------------------------------- the wire format and its codecs
class WireError(HybridExitError, ValueError):
    """A frame that cannot be accepted. ``code`` names the problem, ``http_status`` is the answer to give."""

    code = "bad_frame"
    http_status = 400


class TruncatedFrame(WireError):
    code = "truncated"


class BadMagic(WireError):
    code = "bad_magic"


class UnsupportedVersion(WireError):
    code = "unsupported_version"


class UnknownCodec(WireError):
    code = "unknown_codec"


class WrongDtype(WireError):
    code = "wrong_dtype"


class WrongShape(WireError):
    code = "wrong_shape"


class CorruptPayload(WireError):
    code = "corrupt_payload"


class FingerprintMismatch(WireError):
    code = "wrong_fingerprint"
    http_status = 409


class CodecMismatch(WireError):
    """The frame's codec is not one this side accepts (another learned codec, or not the checkpoint's own)."""

    code = "wrong_codec"
    http_status = 409


class FrameTooLarge(WireError):
    code = "too_large"
    http_status = 413
