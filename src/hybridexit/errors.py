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


# ---------------------------------------------------------------- optional dependencies
EXTRAS = {  # an optional dependency -> the extra of pyproject.toml that installs it
    "constriction": "codecs", "zstandard": "codecs", "onnx": "onnx", "onnxruntime": "onnx", "fastapi": "runtime",
    "uvicorn": "runtime", "httpx": "runtime", "starlette": "runtime", "h11": "runtime", "ray": "ray", "ninja": "packed",
}


class MissingExtra(HybridExitError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_extra(module: str, what: str = "this", extra: str | None = None) -> MissingExtra:
    """The one-line error for an optional ``module`` that ``what`` needs (``extra``, default ``EXTRAS``' entry)."""
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top)
    how = f"pip install 'hybridexit[{extra}]'" if extra else f"pip install {top}"
    return MissingExtra(f"{what} needs {top}, which is not installed: {how}", name=top)


def need(module: str, what: str = "this", extra: str | None = None):
    """``import module`` for an optional dependency; when it is not installed, ``missing_extra`` (one line, the
    extra named) instead of a ModuleNotFoundError traceback."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there but something it imports is missing: not ours to name
        raise missing_extra(module, what, extra) from None
